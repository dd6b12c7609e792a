"""Outputs never lose what was there: `--out` folders are replaced only when they hold an edgeprune output."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from edgeprune.common.atomic import (OutputDir, atomic_path, atomic_write_bytes, atomic_write_text, check_output_file,
                                     is_edgeprune_output)
from edgeprune.errors import EdgePruneError


def previous_output(folder: Path, marker: str = "report") -> Path:
    folder.mkdir(parents=True)
    (folder / "model.onnx").write_bytes(b"old model")
    if marker == "report":
        (folder / "report.json").write_text(json.dumps({"edgeprune": "0.1.0", "met": True}))
    else:
        (folder / "plan.json").write_text(json.dumps({"format": "edgeprune.plan/1"}))
    return folder


def test_new_folder_is_created_with_parents_and_nothing_else(tmp_path: Path) -> None:
    out = tmp_path / "a" / "b" / "out"
    with OutputDir(out) as o:
        (o.tmp / "model.onnx").write_text("new")
        o.commit()
    assert (out / "model.onnx").read_text() == "new"
    assert sorted(p.name for p in out.parent.iterdir()) == ["out"]


def test_interrupted_job_leaves_nothing(tmp_path: Path) -> None:
    out = tmp_path / "new" / "deep" / "out"
    with pytest.raises(RuntimeError):
        with OutputDir(out) as o:
            (o.tmp / "model.onnx").write_text("partial")
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("marker", ["report", "plan"])
def test_previous_edgeprune_output_is_replaced(tmp_path: Path, marker: str) -> None:
    out = previous_output(tmp_path / "out", marker)
    assert is_edgeprune_output(out)
    with OutputDir(out) as o:
        (o.tmp / "model.onnx").write_text("new")
        o.commit()
    assert [p.name for p in out.iterdir()] == ["model.onnx"] and (out / "model.onnx").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_users_folder_is_refused_before_any_work_and_kept(tmp_path: Path) -> None:
    out = tmp_path / "userdir"
    out.mkdir()
    (out / "precious.txt").write_text("precious")
    with pytest.raises(EdgePruneError, match=r"holds files edgeprune did not write \(precious.txt\).*--force"):
        OutputDir(out)
    assert (out / "precious.txt").read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["userdir"]  # no temporary folder made either


def test_artifact_names_without_an_edgeprune_report_are_not_enough(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.onnx").write_text("someone else's model")
    (out / "report.json").write_text(json.dumps({"accuracy": 0.9}))
    with pytest.raises(EdgePruneError, match="did not write"):
        OutputDir(out)


def test_force_replaces_a_users_folder(tmp_path: Path) -> None:
    out = tmp_path / "userdir"
    out.mkdir()
    (out / "precious.txt").write_text("precious")
    with OutputDir(out, force=True) as o:
        (o.tmp / "model.onnx").write_text("new")
        o.commit()
    assert [p.name for p in out.iterdir()] == ["model.onnx"]


def test_a_file_is_never_replaced_by_a_folder(tmp_path: Path) -> None:
    out = tmp_path / "existing_file"
    out.write_text("my notes")
    for force in (False, True):
        with pytest.raises(EdgePruneError, match="exists and is a file"):
            OutputDir(out, force=force)
    assert out.read_text() == "my notes" and sorted(p.name for p in tmp_path.iterdir()) == ["existing_file"]


def test_current_folder_and_its_parents_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    inner = tmp_path / "sandbox" / "inner"
    inner.mkdir(parents=True)
    (inner / "keep.txt").write_text("keep")
    monkeypatch.chdir(inner)
    for out in (".", "..", str(inner), "./"):
        with pytest.raises(EdgePruneError, match="current folder"):
            OutputDir(out, force=True)
    assert (inner / "keep.txt").read_text() == "keep"


def test_unwritable_parent_is_an_error_before_the_job(tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(EdgePruneError, match=r"cannot write --out .*a_file/out"):
        OutputDir(blocker / "out")


def test_failed_run_goes_next_to_the_good_one(tmp_path: Path) -> None:
    out = previous_output(tmp_path / "rel")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with OutputDir(out) as o:
        (o.tmp / "model.onnx").write_text("failed model")
        dest = o.commit(failed=True)
    assert dest == tmp_path / "rel.failed" and (dest / "model.onnx").read_text() == "failed model"
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_users_folder_at_the_failed_name_is_refused(tmp_path: Path) -> None:
    (tmp_path / "rel.failed").mkdir()
    (tmp_path / "rel.failed" / "notes.txt").write_text("mine")
    with pytest.raises(EdgePruneError, match="rel.failed"):
        OutputDir(tmp_path / "rel")


def test_files_added_while_the_job_ran_are_kept(tmp_path: Path) -> None:
    out = previous_output(tmp_path / "out")
    with OutputDir(out) as o:
        (o.tmp / "model.onnx").write_text("new")
        (out / "added-meanwhile.txt").write_text("mine")
        with pytest.raises(EdgePruneError, match=r"changed while the job ran.*out.edgeprune-"):
            o.commit()
    assert (out / "added-meanwhile.txt").read_text() == "mine"
    kept = tmp_path / f"out.edgeprune-{os.getpid()}"
    assert (kept / "model.onnx").read_text() == "new"


def test_output_file_checks(tmp_path: Path) -> None:
    (tmp_path / "folder").mkdir()
    with pytest.raises(EdgePruneError, match="is a folder"):
        check_output_file(tmp_path / "folder", (".onnx",))
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    with pytest.raises(EdgePruneError, match="not a .onnx file"):
        check_output_file(notes, (".onnx",))
    assert check_output_file(notes, (".onnx",), force=True) == notes and notes.read_text() == "mine"
    (tmp_path / "m.onnx").write_text("old")
    check_output_file(tmp_path / "m.onnx", (".onnx",))  # an ONNX file may be overwritten
    with pytest.raises(EdgePruneError, match="cannot write"):
        check_output_file(notes / "m.onnx", (".onnx",))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder", "m.onnx", "notes.txt"]


def test_atomic_write_text(tmp_path: Path) -> None:
    path = atomic_write_text(tmp_path / "sub" / "a.json", "{}")
    assert path.read_text() == "{}" and [p.name for p in path.parent.iterdir()] == ["a.json"]


def test_atomic_write_bytes_replaces_the_file_whole(tmp_path: Path) -> None:
    path = atomic_write_bytes(tmp_path / "sub" / "engine", b"old")
    atomic_write_bytes(path, b"new")
    assert path.read_bytes() == b"new" and [p.name for p in path.parent.iterdir()] == ["engine"]


def test_atomic_path_keeps_the_old_file_when_the_writer_fails(tmp_path: Path) -> None:
    path = atomic_write_text(tmp_path / "model.onnx", "old")
    with pytest.raises(RuntimeError, match="exporter failed"):
        with atomic_path(path) as tmp:
            tmp.write_text("half a mod")
            raise RuntimeError("exporter failed")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["model.onnx"]


def dead_pid() -> int:
    """The PID of a process that has ended (a real one: started, waited for)."""
    import subprocess

    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_remove_stale_removes_what_dead_processes_left_and_keeps_the_rest(tmp_path: Path) -> None:
    from edgeprune.common.atomic import remove_stale

    dead, alive = dead_pid(), os.getpid()
    (tmp_path / "ex" / "cpu").mkdir(parents=True)
    stale = [tmp_path / "ex" / "cpu" / f".0.5x.tmp-{dead}", tmp_path / f".index.json.tmp-{dead}"]
    stale[0].mkdir()
    stale[1].write_text("{")
    keep = [tmp_path / "ex" / "cpu" / f".0.7x.tmp-{alive}",  # a running job's
            tmp_path / "ex" / "cpu" / f".0.6x.old-{dead}",  # 0.6x is missing: the only copy of that output
            tmp_path / "ex" / "cpu" / "notes.tmp-1", tmp_path / "ex" / "cpu" / ".hidden"]
    for p in keep:
        p.mkdir()
    replaced = tmp_path / "ex" / "cpu" / f".0.8x.old-{dead}"  # 0.8x is back in place: the old copy goes
    replaced.mkdir()
    (tmp_path / "ex" / "cpu" / "0.8x").mkdir()
    removed = remove_stale(tmp_path, depth=2)
    assert sorted(removed) == sorted([*stale, replaced])
    assert all(p.exists() for p in keep) and not any(p.exists() for p in stale)


def test_output_dir_removes_its_own_stale_temporary_of_a_killed_run(tmp_path: Path) -> None:
    dead = dead_pid()
    left = tmp_path / f".out.tmp-{dead}"
    other = tmp_path / f".theirs.tmp-{dead}"  # another output's: not this job's to judge
    left.mkdir()
    other.mkdir()
    with OutputDir(tmp_path / "out") as o:
        assert not left.exists() and other.exists()
        o.commit()


def test_scratch_dir_is_named_with_the_pid_and_removes_dead_processes_ones(tmp_path: Path, monkeypatch) -> None:
    import tempfile

    from edgeprune.common.atomic import scratch_dir

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = dead_pid()
    left = tmp_path / f"edgeprune-build-{dead}-k2j4x9ab"
    (left / "sub").mkdir(parents=True)
    old_style = tmp_path / "edgeprune-build-k2j4x9ab"  # no PID in its name: nothing tells whose it is
    running = tmp_path / f"edgeprune-build-{os.getpid()}-abcdefgh"
    old_style.mkdir()
    running.mkdir()
    with scratch_dir("build") as work:
        assert Path(work).name.startswith(f"edgeprune-build-{os.getpid()}-") and Path(work).is_dir()
        assert not left.exists() and old_style.exists() and running.exists()
    assert not Path(work).exists()


@pytest.fixture
def small_disk(tmp_path: Path):  # noqa: ANN201
    """A 4 MiB tmpfs (root and mount permitted, else skipped): a real full disk."""
    import subprocess

    mnt = tmp_path / "disk"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs needs root")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def fill(disk: Path, leave_kb: int) -> None:
    free_kb = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize // 1024
    (disk / "filler").write_bytes(b"\0" * max(0, free_kb - leave_kb) * 1024)


def test_a_rebuild_onto_a_full_disk_exits_2_and_keeps_the_previous_release(small_disk: Path, tmp_path: Path) -> None:
    """Was exit 1 "internal error (OSError: [Errno 28] No space left on device ... -> .b.tmp-PID/model.onnx); this
    is a bug in edgeprune" (the previous release did survive)."""
    import hashlib
    import subprocess
    import sys

    def digest(folder: Path) -> dict[str, str]:
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}

    (tmp_path / "r.toml").write_text('kind = "random"\ncount = 64\nheldout = 16\n')
    build = [sys.executable, "-m", "edgeprune", "build", "--calibration", str(tmp_path / "r.toml"), "--max-steps", "2",
             "--out", str(small_disk / "b")]
    first = subprocess.run([*build, "--latency", "1e9ms"], capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    before = digest(small_disk / "b")
    fill(small_disk, 40)
    r = subprocess.run([*build, "--latency", "0.6x"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("edgeprune: error: no space left on the device writing ") and (
        f"free space there or choose another --out (nothing of this run was kept; {small_disk / 'b'} is left as it "
        "was)") in line, line
    assert digest(small_disk / "b") == before and sorted(p.name for p in small_disk.iterdir()) == ["b", "filler"]


def test_save_pruned_on_a_full_disk_raises_enospc_not_torchs_zip_error(small_disk: Path) -> None:
    """torch.save on a full disk raised RuntimeError "unexpected pos 576 vs 534", which no one reads as a full disk."""
    import errno

    from edgeprune.report.artifacts import save_pruned
    from edgeprune.inputs.models import load_model
    from edgeprune.plan import Plan

    loaded = load_model("example")
    fill(small_disk, 8)
    with pytest.raises(OSError) as e:
        save_pruned(small_disk / "pruned.pt", loaded.module, Plan(kept={}, channels={}), loaded, ())
    assert e.value.errno == errno.ENOSPC
