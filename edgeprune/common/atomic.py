"""Writing outputs without losing anything: temporary names renamed into place, and `--out` folders that are only
ever replaced when they hold a previous edgeprune output.

    out = OutputDir("release/net", force=False)      # checks before the job starts: exit 2 on a user's folder
    with out:
        write(out.tmp / "model.onnx")                 # the job writes into a hidden sibling folder
        out.commit()                                  # renamed into place (a failed build: out.commit(failed=True))

    atomic_write_text(path, text)                     # one file, via a sibling temporary name (or _bytes)
    with scratch_dir("build") as work:                # a work folder in TMPDIR (named with this process's PID)
    with atomic_path("model.onnx") as tmp:            # a library writes the file: onnx.save(model, str(tmp))
        ...

Rules (README, "Outputs"): a new folder is created (with its parents); an existing folder is replaced only if it holds
nothing but edgeprune's artifacts (recognised by its report.json or plan.json), unless `force`; a file is never
replaced by a folder; the current folder and its ancestors are refused. A failed build goes to `OUT.failed/`, so the
last good release in `OUT/` stays as it was. A process killed outright (kill -9) cleans nothing up: the next job
removes what it left, recognised by the PID in the names (`remove_stale`, `scratch_dir`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from edgeprune.errors import EdgePruneError

# Every file a `prune` or `build` output folder can hold.
ARTIFACTS = frozenset({"model.onnx", "model.fp32.onnx", "pruned.pt", "plan.json", "report.json", "report.md",
                       "search.png", "widths.png"})
FAILED_SUFFIX = ".failed"


def tmp_path_for(path: Path) -> Path:
    """A sibling temporary name: same filesystem, so the final rename is atomic."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


# What a process killed with SIGKILL leaves: a sibling temporary (`.NAME.tmp-PID`), a replaced output not yet removed
# (`.NAME.old-PID`), and a work folder in the temporary folder (`edgeprune-KIND-PID-XXXXXXXX`, `scratch_dir`).
_LEFT_BEHIND = re.compile(r"\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)")
_WORK_DIR = re.compile(r"edgeprune-[a-z0-9]+-(?P<pid>\d+)-[a-z0-9_]+")


def pid_alive(pid: int) -> bool:
    """Whether a process `pid` runs on this machine (one of another user counts: it may be an edgeprune job)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def remove_stale(folder: Path, depth: int = 0, names: tuple[str, ...] | None = None) -> list[Path]:
    """Remove what killed edgeprune processes left in `folder` (and `depth` levels below it): `.NAME.tmp-PID` of a
    dead PID, and `.NAME.old-PID` of a dead PID once NAME is back in place (before that it is the only copy of the
    previous output); only for these NAMEs when `names` is given. Returns what it removed."""
    removed: list[Path] = []
    try:
        children = list(folder.iterdir())
    except OSError:
        return removed
    for p in children:
        m = _LEFT_BEHIND.fullmatch(p.name)
        if m is not None and (names is None or m["name"] in names) and not pid_alive(int(m["pid"])):
            if m["kind"] == "tmp" or (folder / m["name"]).exists():
                _remove(p)
                removed.append(p)
        elif depth > 0 and p.is_dir() and not p.is_symlink() and not p.name.startswith("."):
            removed += remove_stale(p, depth - 1, names)
    return removed


def scratch_dir(kind: str) -> tempfile.TemporaryDirectory:
    """A work folder `edgeprune-KIND-PID-XXXXXXXX` in the temporary folder, removed when its `with` block ends; one a
    killed process (kill -9) left is removed by the next job that makes one."""
    tmp = Path(tempfile.gettempdir())
    try:
        for p in tmp.iterdir():
            m = _WORK_DIR.fullmatch(p.name)
            if m is not None and p.is_dir() and not pid_alive(int(m["pid"])):
                shutil.rmtree(p, ignore_errors=True)
    except OSError:
        pass
    return tempfile.TemporaryDirectory(prefix=f"edgeprune-{kind}-{os.getpid()}-")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A sibling temporary path to write `path` through: renamed onto `path` when the block ends normally, removed when
    it raises, so readers see the old file or the whole new one, never half a file. Parent folders are created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path_for(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write `text` to `path` through a sibling temporary file: readers never see half a file."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` through a sibling temporary file: readers never see half a file."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def _marked(path: Path) -> bool:
    """Whether `path` is a JSON file edgeprune wrote: a report ({"edgeprune": version, ...}) or a plan."""
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(d, dict) and ("edgeprune" in d or str(d.get("format", "")).startswith("edgeprune."))


def is_edgeprune_output(folder: Path) -> bool:
    """Whether `folder` holds nothing but a previous edgeprune output (or nothing at all)."""
    names = {p.name for p in folder.iterdir()}
    if not names:
        return True
    return names <= ARTIFACTS and any(_marked(folder / n) for n in ("report.json", "plan.json") if n in names)


def _foreign(folder: Path) -> str:
    names = sorted(p.name for p in folder.iterdir() if p.name not in ARTIFACTS)
    if not names:
        return "edgeprune's file names but no edgeprune report or plan"
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def _refuse_cwd(out: Path, flag: str) -> None:
    here = Path.cwd().resolve()
    resolved = out.resolve()
    if resolved == here or resolved in here.parents:
        raise EdgePruneError(f"{flag} {out} is the current folder{'' if resolved == here else ' or one above it'}; "
                             f"edgeprune replaces its output folder as a whole: name a new subfolder such as out/")


def check_replaceable(out: Path, force: bool, flag: str = "--out") -> None:
    """Raise unless writing an output folder at `out` loses nothing the user made (or `force` says to replace it)."""
    _refuse_cwd(out, flag)
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise EdgePruneError(f"{flag} {out} exists and is {'a link' if out.is_symlink() else 'a file'}; edgeprune "
                             f"writes a folder there and never replaces a file with one: choose another {flag}")
    if out.is_dir() and not force and not is_edgeprune_output(out):
        raise EdgePruneError(f"{flag} {out} is a folder that holds files edgeprune did not write ({_foreign(out)}); "
                             f"choose a new or empty folder, or pass --force to replace it and everything in it")


def _file_in_the_way(path: Path) -> Path | None:
    """The nearest existing ancestor of `path`, when it is a file (so nothing can be made below it)."""
    for p in path.parents:
        if p.exists():
            return None if p.is_dir() else p
    return None


def _make_dir(path: Path, flag: str, out: Path) -> None:
    if (blocker := _file_in_the_way(out)) is not None:
        raise EdgePruneError(f"cannot write {flag} {out}: {blocker} is a file, not a folder")
    try:
        path.mkdir(parents=True)
    except OSError as e:
        raise EdgePruneError(f"cannot write {flag} {out}: {e.strerror or e}; check that its parent folder is "
                             f"writable and has free space") from None


class OutputDir:
    """An output folder written as a whole: checked when made, filled under a temporary name, renamed into place.

    The checks run in `__init__`, before any work; `commit` renames the temporary folder to `out` (or, for a failed
    build, to `out.failed`), replacing a previous edgeprune output there; leaving the `with` block without a commit
    removes the temporary folder.
    """

    def __init__(self, out: str | Path, force: bool = False, flag: str = "--out") -> None:
        self.out = Path(out)
        self.force, self.flag = force, flag
        if not self.out.name or self.out.name in (".", ".."):
            _refuse_cwd(self.out, flag)
            raise EdgePruneError(f"{flag} {out} names no folder; give a folder name such as out/")
        self.failed_out = self.out.with_name(self.out.name + FAILED_SUFFIX)
        check_replaceable(self.out, force, flag)
        check_replaceable(self.failed_out, force, flag)
        self.tmp = tmp_path_for(self.out)
        shutil.rmtree(self.tmp, ignore_errors=True)
        if self.out.parent.is_dir():
            # what a killed run (kill -9: no clean-up ran) left of this output
            remove_stale(self.out.parent, names=(self.out.name, self.failed_out.name))
        # the parents this creates are removed again if the job writes nothing
        self._made = [p for p in self.out.parents if not p.exists()]
        _make_dir(self.tmp, flag, self.out)  # proves the parent is writable before the job starts
        self.committed: Path | None = None

    def __enter__(self) -> OutputDir:
        return self

    def __exit__(self, kind: object, exc: BaseException | None, tb: object) -> None:
        self.discard()
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise self.disk_full(exc) from exc

    def disk_full(self, e: OSError) -> EdgePruneError:
        """A full disk (or quota) met while writing the job's files: the user's to fix, not a bug."""
        where = Path(os.path.abspath(str(e.filename2 or e.filename or self.tmp)))
        tmp = Path(os.path.abspath(self.tmp))
        on_out = where.is_relative_to(tmp)
        what = (f"{where.name} into " if where != tmp else "the artifacts into ") + str(self.out) if on_out else \
            f"{where}"
        fix = f"free space there or choose another {self.flag}" if on_out else \
            "free space there or point TMPDIR at a disk with room"
        return EdgePruneError(f"no space left on the device writing {what} ({e.strerror}); {fix} (nothing of this "
                              f"run was kept; {self.out} is left as it was)")

    def discard(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)
        if self.committed is None:
            for p in self._made:  # innermost first
                try:
                    p.rmdir()
                except OSError:
                    break

    def commit(self, failed: bool = False) -> Path:
        """Rename the finished folder into place: `out`, or `out.failed` for a run that failed its budget or gates."""
        dest = self.failed_out if failed else self.out
        try:
            check_replaceable(dest, self.force, self.flag)  # again: the user may have put files there meanwhile
        except EdgePruneError as e:
            keep = dest.with_name(f"{dest.name}.edgeprune-{os.getpid()}")
            os.replace(self.tmp, keep)
            raise EdgePruneError(f"{e} (it changed while the job ran); this run's artifacts are in {keep}") from None
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(dest, old)
            os.replace(self.tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.tmp, dest)
        self.committed = dest
        return dest


def check_output_file(path: str | Path, suffixes: tuple[str, ...], force: bool = False, flag: str = "-o") -> Path:
    """Before a job that writes one file: refuse a folder, a file of another kind (unless `force`), and a folder
    where nothing can be written (checked by creating the temporary file the write will use)."""
    path = Path(path)
    if path.is_dir():
        raise EdgePruneError(f"{flag} {path} is a folder; give a file name such as {path / ('model' + suffixes[0])}")
    if path.exists() and path.suffix.lower() not in suffixes and not force:
        raise EdgePruneError(f"{flag} {path} exists and is not a {' or '.join(suffixes)} file; edgeprune would "
                             f"overwrite it: choose another name, or pass --force")
    if (blocker := _file_in_the_way(path)) is not None:
        raise EdgePruneError(f"cannot write {flag} {path}: {blocker} is a file, not a folder")
    tmp = tmp_path_for(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.touch()
    except OSError as e:
        raise EdgePruneError(f"cannot write {flag} {path}: {e.strerror or e}; check that its folder is writable and "
                             f"has free space") from None
    finally:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
    return path


def write_error(path: Path, e: OSError) -> EdgePruneError:
    """The one-line error for a write that failed (full disk, file size limit, permissions)."""
    return EdgePruneError(f"cannot write {path}: {e.strerror or e}; check free space, file size limits (ulimit -f) "
                          f"and permissions")
