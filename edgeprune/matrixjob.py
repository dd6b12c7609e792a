"""A release as a matrix: models x targets x budgets from a manifest, each entry a build measured on a pool of boards.

    manifest = load_manifest("release.toml")       # entries expanded from lists, every key checked
    pool = load_pool("devices.toml")               # boards by kind (`pool.py`)
    index = run_matrix(manifest, pool, "release/")  # release/<model>/<target>/<budget>/ + index.json, index.md

Each entry is `pipeline.build` writing the usual artifacts to its own folder, its measurements routed to a free board
of its target's kind (`pool.measure_on_pool`). Embedded (the default): entries one after another in this process, one
measurement per board at a time. With `ray=` (`matrixray.py`): entries as Ray tasks, measurements as Ray tasks asking
for one unit of their kind. Resume: an entry whose inputs digest (model, weights, calibration recipe, target profile,
budget, build settings, gates, edgeprune version) is the one index.json recorded and whose artifacts exist is skipped;
index.json is rewritten after every entry, so an interrupted run loses only the entries in flight.

The manifest:

    targets = ["jetson-orin-nano", "rpi5"]       # every model on every target at every budget ...
    budgets = ["0.5x", "10ms"]
    [build]                                      # build settings for every entry (the CLI's flags)
    max_steps = 8
    [gates]                                      # quality gates for every entry
    min_agreement = 0.98
    [[models]]
    name = "det"                                 # its folder under the release
    model = "my_pkg.nets:make_detector"          # a spec as for --model; paths are relative to the manifest
    weights = "det.pth"
    calibration = "calib/det.toml"
    budgets = ["12ms"]                           # ... unless a model lists its own targets, budgets or gates
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeprune.atomic import atomic_write_text
from edgeprune.config import BuildConfig, PruneConfig, parse_budget
from edgeprune.errors import EdgePruneError, ExitCode
from edgeprune.pool import BoardState, Pool, pooled_measure
from edgeprune.targets import load_target
from edgeprune.tomlcheck import check_keys, read_toml, take

INDEX_FORMAT = "edgeprune.matrix/1"
_TOP_KEYS = ("targets", "budgets", "build", "gates", "models")
_MODEL_KEYS = ("name", "model", "weights", "calibration", "input_shape", "targets", "budgets", "gates")
_GATE_KEYS = ("min_agreement", "max_accuracy_drop", "max_metric_drop", "evaluate")
# [build] keys -> BuildConfig / PruneConfig fields (the CLI's flags)
_BUILD_KEYS = {"max_steps": int, "tolerance": float, "noise_margin": float, "proxy": str, "allocation": str,
               "criterion": str, "repair": str, "exporter": str, "seed": int, "channel_multiple": int,
               "cache": bool}
# The exit code that speaks for a matrix with failed entries: the most urgent first (a bug, an unreachable device
# worth a retry, bad input, then the releases that missed a gate or a budget).
SEVERITY = (1, 5, 2, 130, 143, 4, 3)


@dataclass(frozen=True)
class Entry:
    """One build of the matrix: a model on a target at a budget, with its gates and build settings."""

    name: str  # the model's folder
    model: str
    weights: str | None
    calibration: str | None
    input_shape: tuple[int, ...] | None
    target: str  # as given (a name or a file)
    target_name: str  # the profile's name: the target's folder and its pool kind
    budget: str
    gates: tuple[tuple[str, Any], ...] = ()
    build: tuple[tuple[str, Any], ...] = ()

    @property
    def key(self) -> str:
        return f"{self.name}/{self.target_name}/{self.budget}"

    def folder(self, out: Path) -> Path:
        return out / self.name / self.target_name / self.budget

    def config(self, cache_dir: str | None = None) -> BuildConfig:
        from edgeprune.models import load_callable

        b, g = dict(self.build), dict(self.gates)
        prune = PruneConfig(model=self.model, weights=self.weights, input_shape=self.input_shape,
                            calibration=self.calibration, criterion=b.get("criterion", "cap"),
                            repair=b.get("repair", "auto"), exporter=b.get("exporter", "torchscript"),
                            seed=b.get("seed", 0), channel_multiple=b.get("channel_multiple", 0))
        evaluate = load_callable(g["evaluate"], "evaluate") if "evaluate" in g else None
        return BuildConfig(prune=prune, device=self.target, latency=self.budget,
                           tolerance=b.get("tolerance", 0.05), max_steps=b.get("max_steps", 12),
                           proxy=b.get("proxy", "auto"), allocation=b.get("allocation", "auto"),
                           margin_k=b.get("noise_margin", 2.0), use_cache=b.get("cache", True), cache_dir=cache_dir,
                           min_agreement=g.get("min_agreement"), max_accuracy_drop=g.get("max_accuracy_drop"),
                           max_metric_drop=g.get("max_metric_drop"), evaluate=evaluate)


@dataclass(frozen=True)
class Manifest:
    entries: tuple[Entry, ...]
    source: str = ""


def _strings(table: dict[str, Any], key: str, where: str, default: Any = ...) -> list[str]:
    value = take(table, key, list, where, default)
    if value is default and default is not ...:
        return value
    if not value or not all(isinstance(v, str) for v in value):
        raise EdgePruneError(f"{where}: {key} must be a non-empty list of strings, found {value!r}")
    return value


def _relative(spec: str | None, base: Path, file_like: bool) -> str | None:
    """A path in the manifest, relative to the manifest's folder (a bundled name such as `digits` stays a name)."""
    if spec is None:
        return None
    if file_like or spec.endswith((".toml", ".pt", ".pth")) or "/" in spec:
        p = Path(spec)
        return str(p if p.is_absolute() else base / p)
    return spec


def _model_spec(spec: str, base: Path) -> str:
    mod, colon, fn = spec.rpartition(":")
    if colon and mod.endswith(".py"):
        return f"{_relative(mod, base, True)}:{fn}"
    return spec


def _gates(table: Any, where: str) -> dict[str, Any]:
    if not isinstance(table, dict):
        raise EdgePruneError(f"{where}: gates must be a table, found {table!r}")
    check_keys(table, _GATE_KEYS, where)
    out: dict[str, Any] = {k: take(table, k, float, where) for k in _GATE_KEYS[:3] if k in table}
    if "evaluate" in table:
        out["evaluate"] = take(table, "evaluate", str, where)
    if "max_metric_drop" in out and "evaluate" not in out:
        raise EdgePruneError(f"{where}: max_metric_drop gates on your metric: add evaluate = \"pkg.module:function\"")
    return out


def load_manifest(path: str | Path) -> Manifest:
    """The manifest's entries (models x their targets x their budgets), every key, target and budget checked."""
    path = Path(path)
    table = read_toml(path, "manifest")
    where = f"manifest {path}"
    check_keys(table, _TOP_KEYS, where)
    base = path.parent
    targets = _strings(table, "targets", where, None)
    budgets = _strings(table, "budgets", where, None)
    build = take(table, "build", dict, where, {})
    check_keys(build, tuple(_BUILD_KEYS), f"{where} [build]")
    settings = tuple(sorted((k, take(build, k, kind, f"{where} [build]")) for k, kind in _BUILD_KEYS.items()
                            if k in build))
    gates = _gates(take(table, "gates", dict, where, {}), f"{where} [gates]")
    models = take(table, "models", list, where)
    if not models:
        raise EdgePruneError(f"{where}: models is empty; add a [[models]] table with name and model")
    entries: list[Entry] = []
    for i, m in enumerate(models):
        mw = f"{where} [[models]] #{i + 1}"
        if not isinstance(m, dict):
            raise EdgePruneError(f"{mw}: must be a table, found {m!r}")
        check_keys(m, _MODEL_KEYS, mw)
        name = take(m, "name", str, mw)
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
            raise EdgePruneError(f"{mw}: name {name!r} names a folder: letters, digits, '.', '_' or '-' only")
        shape = take(m, "input_shape", list, mw, None)
        if shape is not None and not all(isinstance(v, int) and v > 0 for v in shape):
            raise EdgePruneError(f"{mw}: input_shape must be a list of positive integers (N, C, H, W), found {shape}")
        m_targets = _strings(m, "targets", mw, None) or targets
        m_budgets = _strings(m, "budgets", mw, None) or budgets
        if not m_targets or not m_budgets:
            raise EdgePruneError(f"{mw}: no targets or budgets: give targets = [...] and budgets = [...] at the top of "
                                 f"the manifest or in the model's table")
        m_gates = {**gates, **_gates(m.get("gates", {}), f"{mw} gates")}
        for t in m_targets:
            target = load_target(_relative(t, base, False) or t)
            for b in m_budgets:
                parse_budget(b)
                if "/" in b:
                    raise EdgePruneError(f"{mw}: budget {b!r} names a folder; write it as 10ms or 0.5x")
                entries.append(Entry(name=name, model=_model_spec(take(m, "model", str, mw), base),
                                     weights=_relative(take(m, "weights", str, mw, None), base, True),
                                     calibration=_relative(take(m, "calibration", str, mw, None), base, False),
                                     input_shape=tuple(shape) if shape else None, target=_relative(t, base, False) or t,
                                     target_name=target.name, budget=b, gates=tuple(sorted(m_gates.items())),
                                     build=settings))
    keys = [e.key for e in entries]
    dup = sorted({k for k in keys if keys.count(k) > 1})
    if dup:
        raise EdgePruneError(f"{where}: entries {', '.join(dup)} appear twice; give the models distinct names")
    return Manifest(tuple(entries), str(path))


# ---------------------------------------------------------------- resume


def _file_digest(path: str | Path | None) -> str | None:
    if path is None or not Path(path).is_file():
        return None
    from edgeprune.runtimes.cache import file_sha256

    return file_sha256(path)[:16]


def _model_file(spec: str) -> str | None:
    """The source file a `pkg.module:factory` or `file.py:factory` spec builds from (found without importing it)."""
    import importlib.util

    mod, colon, _ = spec.rpartition(":")
    if not colon or spec.startswith(("torchvision:", "timm:", "ultralytics:")):
        return None
    if mod.endswith(".py"):
        return mod
    try:
        found = importlib.util.find_spec(mod)
    except (ImportError, ValueError):
        return None
    return found.origin if found is not None else None


def entry_inputs(entry: Entry) -> dict[str, Any]:
    """What an entry's release depends on, digested: a changed one makes the entry run again."""
    from edgeprune import __version__
    from edgeprune.recipe import load_recipe

    recipe = load_recipe(entry.calibration or ("digits" if entry.model == "example" else "random"))
    return {"model": entry.model, "model_file": _file_digest(_model_file(entry.model)),
            "weights": _file_digest(entry.weights), "calibration": _file_digest(recipe.source) or recipe.name,
            "input_shape": list(entry.input_shape) if entry.input_shape else None,
            "target": load_target(entry.target).fingerprint(), "budget": entry.budget,
            "gates": dict(entry.gates), "build": dict(entry.build), "edgeprune": __version__}


def digest(inputs: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


def load_index(out: Path) -> dict[str, Any] | None:
    path = out / "index.json"
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return d if isinstance(d, dict) and d.get("format") == INDEX_FORMAT else None


def check_release_dir(out: Path) -> None:
    """The release folder: new, empty, or a previous matrix's (its index.json); anything else is refused."""
    if out.exists() and not out.is_dir():
        raise EdgePruneError(f"--out {out} is a file; give a folder for the release")
    if out.is_dir() and any(out.iterdir()) and load_index(out) is None:
        raise EdgePruneError(f"--out {out} holds files and no index.json of an edgeprune matrix; choose a new or "
                             f"empty folder (each entry is written under it as MODEL/TARGET/BUDGET/)")


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


def entry_record(entry: Entry, out: Path, outcome: Any = None, error: BaseException | None = None) -> dict[str, Any]:
    """An entry's row of the index, from its build's outcome or the error that stopped it."""
    rec: dict[str, Any] = {"key": entry.key, "model": entry.name, "spec": entry.model, "target": entry.target_name,
                           "budget": entry.budget}
    if error is not None:
        code = int(error.code) if isinstance(error, EdgePruneError) else int(ExitCode.INTERNAL)
        msg = str(error) if isinstance(error, EdgePruneError) else f"internal error ({type(error).__name__}: {error})"
        return {**rec, "exit_code": code, "met": False, "message": msg, "report": None}
    r = outcome.report
    fid = r["fidelity"]
    report = Path(outcome.out) / "report.json"
    return {**rec, "exit_code": outcome.exit_code, "met": bool(r["met"]) and outcome.exit_code == 0,
            "message": outcome.message, "latency_ms": r["final"]["latency_ms"]["median"],
            "budget_ms": r["budget_ms"], "base_ms": r["base"]["latency_ms"]["median"], "speedup": r["speedup"],
            "fidelity": {"top1_agreement": fid["top1_agreement"], "output_rel_error": fid["output_rel_error"]},
            "metric": r.get("metric"), "report": str(report.relative_to(out))}


def run_entry(entry: Entry, out: Path, measure_fn: Callable[..., Any], cache_dir: str | None = None) -> dict[str, Any]:
    """One entry's build (its measurements through `measure_fn`), as its row of the index; never raises for an
    entry's failure (bad input, unreachable boards, a bug): the row says what it was."""
    from edgeprune.pipeline import build

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
    """Every entry of `manifest` built into `out` (resuming), measured on `pool`; returns the index (also written
    as index.json and index.md). `ray`: None (embedded), "auto" or a cluster address (`matrixray.py`)."""
    out = Path(out)
    echo = echo or (lambda line: print(line, file=sys.stderr, flush=True))
    kinds = {e.key: pool.kind_for(load_target(e.target)) for e in manifest.entries}  # exit 2 before any work
    check_release_dir(out)
    if ray is not None:
        from edgeprune.matrixray import connect

        started = connect(ray, pool)  # exit 2 or 5 before anything is written
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
    out.mkdir(parents=True, exist_ok=True)
    total = len(manifest.entries)
    index: dict[str, Any] = {"format": INDEX_FORMAT, "manifest": manifest.source, "pool": pool.source,
                             "mode": "ray" if ray is not None else "embedded", "boards": {}, "down": []}
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

    try:
        if ray is None:
            state = BoardState(pool, on_change=lambda c: on_counts(c, only_down=True))
            for e in todo:
                log: list[dict[str, Any]] = []
                rec = run_entry(e, out, pooled_measure(state, kinds[e.key], log), cache_dir)
                finish(e, {**rec, "measurements": log}, state.summary())
            boards = state.summary()
        else:
            from edgeprune.matrixray import run_on_ray

            boards = run_on_ray(todo, kinds, out, pool, run_entry, cache_dir, finish, on_counts)
    finally:
        if ray is not None and started:
            import ray as ray_module

            ray_module.shutdown()
    return write_index(out, manifest, records, index, boards)


def write_index(out: Path, manifest: Manifest, records: dict[str, dict[str, Any]], index: dict[str, Any],
                boards: dict[str, Any]) -> dict[str, Any]:
    """index.json and index.md, in manifest order (entries not done yet are left out), written atomically."""
    from edgeprune import __version__

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
