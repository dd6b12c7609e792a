"""A release as a matrix: models x targets x budgets from a manifest, each entry a build measured on a pool of boards.

    manifest = load_manifest("release.toml")       # entries expanded from lists, every key checked (`manifest.py`)
    pool = load_pool("devices.toml")               # boards by kind (`fleet/pool.py`); default_pool(None): this machine
    index = run_matrix(manifest, pool, "release/")  # release/<model>/<target>/<budget>/ + index.json, index.md

Each entry is `build_job.build` writing the usual artifacts to its own folder, its measurements routed to a free board
of its target's kind (`pool.measure_on_pool`), or, for a target no board of the pool runs that this machine can
measure (`cpu`), measured here as `edgeprune build` does. Embedded (the default): entries one after another in this
process, one measurement per board at a time. With `ray=` (`matrix_ray.py`): entries as Ray tasks, measurements as Ray
tasks asking for one unit of their kind.

Resume: an entry whose inputs digest (model, weights, calibration recipe, target profile, budget, build settings,
gates, edgeprune version) is the one index.json recorded and whose artifacts exist is skipped. index.json is written
before the first entry starts and after every entry, so an interrupted run, kill -9 included, loses only the entries
in flight; the temporary folders a killed run left (`.BUDGET.tmp-PID` of a dead process) are removed by the next run.
One run at a time writes a release: a second `matrix` on the same folder exits 2 while the first holds its lock.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgeprune.common.atomic import _LEFT_BEHIND, atomic_write_text, remove_stale
from edgeprune.errors import EdgePruneError, ExitCode
from edgeprune.fleet.manifest import Entry, Manifest, digest, entry_inputs, load_manifest
from edgeprune.fleet.pool import BoardState, Pool, local_measure, pooled_measure
from edgeprune.inputs.targets import load_target

if TYPE_CHECKING:
    from edgeprune.jobs.delivery import BuildOutcome
    from edgeprune.report.contract import BuildReport
    from edgeprune.runtimes.stats import LatencyStats

__all__ = ["INDEX_FORMAT", "Entry", "Manifest", "digest", "entry_inputs", "load_manifest", "run_matrix"]

INDEX_FORMAT = "edgeprune.matrix/1"
LOCK = ".edgeprune-matrix.lock"
# The exit code that speaks for a matrix with failed entries: the most urgent first (a bug, an unreachable device
# worth a retry, bad input, then the releases that missed a gate or a budget).
SEVERITY = (1, 5, 2, 130, 143, 4, 3)


# ---------------------------------------------------------------- resume


def load_index(out: Path) -> dict[str, Any] | None:
    path = out / "index.json"
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return d if isinstance(d, dict) and d.get("format") == INDEX_FORMAT else None


def check_release_dir(out: Path) -> None:
    """The release folder: new, empty, or a previous matrix's (its index.json); anything else is refused. What a
    killed run left (its lock, temporary files of a dead process) does not count as files."""
    if out.exists() and not out.is_dir():
        raise EdgePruneError(f"--out {out} is a file; give a folder for the release")
    if out.is_dir() and load_index(out) is None and any(p.name != LOCK and not _LEFT_BEHIND.fullmatch(p.name)
                                                         for p in out.iterdir()):
        raise EdgePruneError(f"--out {out} holds files and no index.json of an edgeprune matrix; choose a new or "
                             f"empty folder (each entry is written under it as MODEL/TARGET/BUDGET/)")


@contextlib.contextmanager
def release_lock(out: Path) -> Iterator[None]:
    """One run at a time on a release: an exclusive lock on OUT/.edgeprune-matrix.lock, released by the kernel
    when the process ends however it ends (kill -9 too); a second run exits 2 while the first holds it."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    with open(out / LOCK, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            pid = f.read().strip() or "?"
            raise EdgePruneError(f"--out {out} is being written by another edgeprune matrix (PID {pid}); wait for it "
                                 f"to finish (this run would then skip its finished entries) or choose another "
                                 f"--out") from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        yield


def reusable(entry: Entry, out: Path, previous: dict[str, Any] | None, inputs_digest: str) -> dict[str, Any] | None:
    """The previous run's record of `entry` when its inputs are unchanged and its artifacts are still there."""
    if previous is None:
        return None
    for rec in previous.get("entries", []):
        if rec.get("key") == entry.key and rec.get("digest") == inputs_digest and rec.get("report") \
                and (out / rec["report"]).is_file():
            return rec
    return None


# ---------------------------------------------------------------- one entry


def entry_record(entry: Entry, out: Path, outcome: BuildOutcome | None = None,
                 error: BaseException | None = None) -> dict[str, Any]:
    """An entry's row of the index, from its build's outcome or the error that stopped it."""
    rec: dict[str, Any] = {"key": entry.key, "model": entry.name, "spec": entry.model, "target": entry.target_name,
                           "budget": entry.budget}
    if error is not None:
        code = int(error.code) if isinstance(error, EdgePruneError) else int(ExitCode.INTERNAL)
        msg = str(error) if isinstance(error, EdgePruneError) else f"internal error ({type(error).__name__}: {error})"
        return {**rec, "exit_code": code, "met": False, "message": msg, "report": None}
    assert outcome is not None
    r: BuildReport = outcome.build_report
    fid = r.fidelity
    report = Path(outcome.out) / "report.json"
    return {**rec, "exit_code": outcome.exit_code, "met": bool(r.met) and outcome.exit_code == 0,
            "message": outcome.message, "latency_ms": r.final_ms, "budget_ms": r.budget_ms, "base_ms": r.base_ms,
            "speedup": r.speedup,
            "fidelity": {"top1_agreement": fid["top1_agreement"], "output_rel_error": fid["output_rel_error"]},
            "metric": r.metric, "report": str(report.relative_to(out))}


def run_entry(entry: Entry, out: Path, measure_fn: Callable[..., LatencyStats],
              cache_dir: str | None = None) -> dict[str, Any]:
    """One entry's build (its measurements through `measure_fn`), as its row of the index; never raises for an
    entry's failure (bad input, unreachable boards, a bug): the row says what it was."""
    from edgeprune.jobs.build_job import build

    t0 = time.perf_counter()
    try:
        outcome = build(entry.config(cache_dir), entry.folder(out), measure_fn=measure_fn)
        rec = entry_record(entry, out, outcome)
    except Exception as e:  # noqa: BLE001 - one entry's failure is a row of the index, not the matrix's end
        rec = entry_record(entry, out, error=e)
    rec["wall_s"] = round(time.perf_counter() - t0, 2)
    return rec


# ---------------------------------------------------------------- the matrix


def matrix_exit_code(records: list[dict[str, Any]]) -> int:
    codes = {r["exit_code"] for r in records} - {0}
    return next((c for c in SEVERITY if c in codes), max(codes)) if codes else 0


def progress_line(done: int, total: int, rec: dict[str, Any], counts: dict[str, int] | None) -> str:
    if rec.get("skipped"):
        what = "skipped (inputs and artifacts unchanged)"
    elif rec.get("latency_ms") is not None:
        what = (f"{'met' if rec['met'] else 'NOT met'}: {rec['latency_ms']:.3f} ms of {rec['budget_ms']:.3f}, "
                f"{rec['speedup']:.2f}x, exit {rec['exit_code']}")
    else:
        what = f"exit {rec['exit_code']}: {(rec.get('message') or '')[:160]}"
    boards = f" [boards: {counts['busy']} busy, {counts['free']} free, {counts['down']} down]" if counts else ""
    return f"edgeprune: [{done}/{total}] {rec['key']}: {what}{boards}"


def run_matrix(manifest: Manifest, pool: Pool, out: str | Path, ray: str | None = None,
               cache_dir: str | None = None, echo: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Every entry of `manifest` built into `out` (resuming), measured on `pool` (a target without boards there that
    this machine runs is measured here); returns the index (also written as index.json and index.md). `ray`: None
    (embedded), "auto" or a cluster address (`matrix_ray.py`)."""
    out = Path(out)
    echo = echo or (lambda line: print(line, file=sys.stderr, flush=True))
    kinds = {e.key: pool.route(load_target(e.target)) for e in manifest.entries}  # exit 2 before any work
    check_release_dir(out)
    started = False
    if ray is not None:
        from edgeprune.fleet.matrix_ray import connect

        started = connect(ray, pool)  # exit 2 or 5 before anything is written
    try:
        out.mkdir(parents=True, exist_ok=True)
        with release_lock(out):
            return _run_locked(manifest, pool, out, ray, kinds, cache_dir, echo)
    finally:
        if started:
            import ray as ray_module

            ray_module.shutdown()


def _run_locked(manifest: Manifest, pool: Pool, out: Path, ray: str | None, kinds: dict[str, str | None],
                cache_dir: str | None, echo: Callable[[str], None]) -> dict[str, Any]:
    """`run_matrix` once it holds the release's lock: what killed runs left removed, the index written before the
    first entry starts (so that a run killed in it resumes), then the entries."""
    stale = remove_stale(out, depth=3)
    if stale:
        echo(f"edgeprune: removed {len(stale)} temporary folder(s) of killed runs: "
             f"{', '.join(str(p.relative_to(out)) for p in stale[:3])}{' ...' if len(stale) > 3 else ''}")
    previous = load_index(out)
    digests = {e.key: digest(entry_inputs(e)) for e in manifest.entries}
    records: dict[str, dict[str, Any]] = {}
    todo = []
    for e in manifest.entries:
        rec = reusable(e, out, previous, digests[e.key])
        if rec is not None:
            records[e.key] = {**rec, "skipped": True}
        else:
            todo.append(e)
    total = len(manifest.entries)
    index: dict[str, Any] = {"format": INDEX_FORMAT, "manifest": manifest.source, "pool": pool.source,
                             "mode": "ray" if ray is not None else "embedded", "boards": {}, "down": []}
    write_index(out, manifest, records, index, {})
    counts: dict[str, Any] = {"now": None}

    def finish(entry: Entry, rec: dict[str, Any], boards: dict[str, Any]) -> None:
        rec.update(digest=digests[entry.key], inputs=entry_inputs(entry), skipped=False)
        rec["measured_on"] = {b: sum(1 for m in rec.get("measurements", []) if m["board"] == b)
                              for b in dict.fromkeys(m["board"] for m in rec.get("measurements", []))}
        records[entry.key] = rec
        write_index(out, manifest, records, index, boards)
        echo(progress_line(len(records), total, rec, counts["now"]))

    for key, rec in records.items():
        echo(progress_line(list(records).index(key) + 1, total, rec, None))

    def on_counts(c: dict[str, int], only_down: bool = False) -> None:
        """The live count of boards: every change under Ray (polled), a board going down when embedded."""
        before = counts["now"] or {"down": 0}
        if c["down"] != before["down"] or (not only_down and c != counts["now"]):
            echo(f"edgeprune: boards: {c['busy']} busy, {c['free']} free, {c['down']} down")
        counts["now"] = c

    if ray is None:
        state = BoardState(pool, on_change=lambda c: on_counts(c, only_down=True))
        for e in todo:
            log: list[dict[str, Any]] = []
            kind = kinds[e.key]
            measure_fn = local_measure(log) if kind is None else pooled_measure(state, kind, log)
            rec = run_entry(e, out, measure_fn, cache_dir)
            finish(e, {**rec, "measurements": log}, state.summary())
        boards = state.summary()
    else:
        from edgeprune.fleet.matrix_ray import run_on_ray

        boards = run_on_ray(todo, kinds, out, pool, run_entry, cache_dir, finish, on_counts)
    return write_index(out, manifest, records, index, boards)


def write_index(out: Path, manifest: Manifest, records: dict[str, dict[str, Any]], index: dict[str, Any],
                boards: dict[str, Any]) -> dict[str, Any]:
    """index.json and index.md, in manifest order (entries not done yet are left out), written atomically."""
    from edgeprune._version import __version__

    rows = [records[e.key] for e in manifest.entries if e.key in records]
    if boards:
        index["boards"] = boards
        index["down"] = sorted(n for n, b in boards.items() if b["state"] == "down")
    index.update(edgeprune=__version__, entries=rows, complete=len(rows) == len(manifest.entries),
                 exit_code=matrix_exit_code(rows), met=sum(1 for r in rows if r["met"]))
    atomic_write_text(out / "index.json", json.dumps(index, indent=1, default=str) + "\n")
    atomic_write_text(out / "index.md", index_markdown(index))
    return index


def index_markdown(index: dict[str, Any]) -> str:
    title = (f"# Release matrix: {index['met']} of {len(index['entries'])} entries met their budget and gates "
             f"(exit {index['exit_code']})")
    header = ("| model | target | budget | met | latency ms | speed-up | top-1 agreement | output error | metric | exit "
              "| boards | report |")
    lines = [title, "", header, "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in index["entries"]:
        fid = r.get("fidelity") or {}
        agree = fid.get("top1_agreement")
        metric = r.get("metric") or {}
        lat = f"{r['latency_ms']:.3f} / {r['budget_ms']:.3f}" if r.get("latency_ms") is not None else "-"
        boards = ", ".join(f"{b} {n}" for b, n in (r.get("measured_on") or {}).items()) or \
            ("skipped" if r.get("skipped") else "-")
        cells = [r["model"], r["target"], r["budget"], "yes" if r["met"] else "**no**", lat,
                 f"{r['speedup']:.2f}x" if r.get("speedup") else "-",
                 f"{100 * agree:.1f}%" if agree is not None else "-",
                 f"{fid['output_rel_error']:.3f}" if fid.get("output_rel_error") is not None else "-",
                 f"{metric['after']:.4g} (drop {metric['drop']:.4g})" if metric.get("after") is not None else "-",
                 str(r["exit_code"]), boards, f"[report]({r['report']})" if r.get("report") else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    failed = [r for r in index["entries"] if r["exit_code"] != 0]
    if failed:
        lines += ["", "## Failed", ""] + [f"- {r['key']} (exit {r['exit_code']}): {r.get('message')}" for r in failed]
    if index.get("boards"):
        lines += ["", "## Boards", "", "| board | kind | address | state | measurements |", "|---|---|---|---|---|"]
        for name, b in index["boards"].items():
            state = b["state"] + (f" ({b['down_reason'][:120]})" if b.get("down_reason") else "")
            lines.append(f"| {name} | {b['kind']} | {b['address']} | {state} | {b['measurements']} |")
    return "\n".join(lines) + "\n"
