"""What the benchmarks share: running an edgeprune checkout, its builds and base exports, held-out data, ONNX Runtime
sessions and interleaved timing, the shared flags and Markdown tables.

A benchmark judges a checkout from outside: every build, export and data load runs `python -m edgeprune` /
`import edgeprune` in a subprocess with PYTHONPATH set to the checkout under test (`--repo`, default this one); the
models, recipes, latency and accuracy measurement stay this harness's, so two checkouts are compared on the same
footing. Latency is measured here, on fresh ONNX Runtime sessions as edgeprune's `cpu` target makes them (1
intra-op thread), interleaved over the models compared (pass 1: each model once, pass 2: each again, ...) so that
this machine's drift falls on all of them alike.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

TOOLS = Path(__file__).resolve().parent
ROOT = TOOLS.parent  # this checkout: the default --repo
RELEASED_CODES = (0, 3, 4)  # exit codes after which a build has written its model (OUT or OUT.failed)
WARMUP, ITERATIONS = 20, 100

# The held-out split exactly as the checkout under test makes it, saved for this process to evaluate on.
HELDOUT_SCRIPT = """
import sys, numpy as np, edgeprune
from edgeprune.inputs.data import load_data
from edgeprune.inputs.recipe import load_recipe
d = load_data(load_recipe(sys.argv[1]), tuple(int(v) for v in sys.argv[2].split(",")))
np.savez(sys.argv[3], x=d.heldout_x, y=d.heldout_y, calib=len(d.calib_x))
print(edgeprune.__file__)
"""


# ---------------------------------------------------------------- the models of the classification benchmarks


def model_table() -> dict[str, dict]:
    """Model name -> its spec, input shape and a recipe writer `recipe(seed, folder) -> Path`; `fashion` also a
    `test()` set."""
    from . import fashion

    def digits(seed: int, folder: Path) -> Path:
        path = folder / f"digits-{seed}.toml"
        path.write_text(f'kind = "digits"\nheldout = 0.25\nbatch_size = 32\nseed = {seed}\n')
        return path

    def fashion_recipe(seed: int, folder: Path) -> Path:
        if not (fashion.CALIB_DIR / "calib_x.npy").is_file():
            raise SystemExit(f"{fashion.CALIB_DIR}/calib_x.npy is missing: run `python -m tools.train_fashion` "
                             "(or `python -m tools.fashion` once the weights exist)")
        path = folder / f"fashion-{seed}.toml"
        path.write_text(fashion.recipe_text(seed=seed, folder=fashion.CALIB_DIR))
        return path

    def fashion_test() -> tuple[np.ndarray, np.ndarray]:
        """The 8000 test images outside the calibration pool: no recipe seed ever draws them."""
        images, labels = fashion.load_split("test")
        pool = np.random.default_rng(fashion.CALIB_SPLIT_SEED).permutation(len(images))[:fashion.CALIB_COUNT]
        rest = np.setdiff1d(np.arange(len(images)), pool)
        return fashion.normalise(images[rest]), labels[rest]

    return {
        "example": {"spec": "example", "input_shape": "1,1,32,32", "recipe": digits},
        "fashion": {"spec": f"{TOOLS / 'fashion.py'}:make_net", "input_shape": "1,1,28,28", "recipe": fashion_recipe,
                    "test": fashion_test},
    }


# ---------------------------------------------------------------- running the checkout under test


def edgeprune_env(repo: Path) -> dict[str, str]:
    """The environment that makes `python -m edgeprune` and `import edgeprune` resolve to `repo`."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(repo)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


def run_edgeprune(repo: Path, args: list[str], log: Path) -> tuple[int, str, float]:
    """`python -m edgeprune ARGS` in a subprocess: exit code, stdout, wall seconds; stderr goes to `log`."""
    t0 = time.perf_counter()
    with open(log, "w") as err:
        p = subprocess.run([sys.executable, "-m", "edgeprune", *args], check=False, stdout=subprocess.PIPE, stderr=err,
                           text=True, env=edgeprune_env(repo), cwd=log.parent)
    return p.returncode, p.stdout, time.perf_counter() - t0


def run_python(repo: Path, script: str, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`python -c SCRIPT ARGS` with `repo`'s edgeprune importable; output captured."""
    return subprocess.run([sys.executable, "-c", script, *args], check=False, capture_output=True, text=True,
                          env=edgeprune_env(repo), cwd=cwd)


def tail(log: Path) -> str:
    """The last non-empty line of a log: a failed run's error."""
    lines = [ln for ln in log.read_text().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def build_args(model: dict, budget: str, recipe: str | Path, out: Path, cache: Path, flags: list[str],
               seed: int | None = None, device: str = "cpu") -> list[str]:
    """The command line of one `edgeprune build --json` of `model` at `budget`."""
    return ["build", "--model", model["spec"], "--input-shape", model["input_shape"], "--device", device,
            "--latency", budget, "--calibration", str(recipe), *([] if seed is None else ["--seed", str(seed)]),
            "--out", str(out), "--cache-dir", str(cache), "--json", *flags]


def run_build(repo: Path, model: dict, budget: str, seed: int | None, recipe: str | Path, flags: list[str],
              work: Path) -> tuple[int, float, dict | None, Path | None]:
    """One `edgeprune build` in a fresh `work` folder (a fresh measurement cache): exit code, wall seconds, its JSON
    report and the folder of the model it released (OUT, or OUT.failed after a missed budget); no report and no
    folder when it released none (the error is `tail(work / "build.log")`)."""
    out = work / "out"
    shutil.rmtree(work, ignore_errors=True)  # a kept folder from an earlier run: no stale cache, no old output
    work.mkdir(parents=True)
    code, stdout, wall = run_edgeprune(repo, build_args(model, budget, recipe, out, work / "cache", flags, seed),
                                       work / "build.log")
    if code not in RELEASED_CODES:
        return code, wall, None, None
    r = json.loads(stdout)
    return code, wall, r, released_folder(r, out, code)


def released_folder(report: dict, out: Path, code: int) -> Path:
    """Where a run that was asked for `--out OUT` released its model: the report's `out`, else OUT after exit 0 and
    OUT.failed after a missed budget or gate."""
    return Path(report.get("out") or (out if code == 0 else f"{out}.failed"))


def same_budget(budget: str, first: dict | None) -> str:
    """The budget of every build after the first of a case: the first one's budget in ms, so one unpruned
    measurement decides the budget for all of them and they compare at the same latency target."""
    return f"{first['budget_ms']:.5f}ms" if first and first.get("budget_ms") else budget


def export_args(model: dict, path: Path, int8_calibration: str | Path | None = None) -> list[str]:
    """`edgeprune export` of the unpruned model (TorchScript exporter, as `build` exports its candidates); with
    `int8_calibration`, its INT8 copy quantised on that recipe with cpu-int8's settings."""
    args = ["export", "--model", model["spec"], "--input-shape", model["input_shape"], "-o", str(path),
            "--exporter", "torchscript", "--json"]
    return args + ([] if int8_calibration is None else
                   ["--int8", "--calibration", str(int8_calibration), "--device", "cpu-int8"])


def export_base(repo: Path, model: dict, work: Path, int8_calibration: str | Path | None = None) -> Path:
    """The unpruned model as ONNX in `work` (base.onnx, or base.int8.onnx with `int8_calibration`)."""
    work.mkdir(parents=True, exist_ok=True)
    int8 = int8_calibration is not None
    path, log = work / ("base.int8.onnx" if int8 else "base.onnx"), work / ("export-int8.log" if int8 else "export.log")
    code, _, _ = run_edgeprune(repo, export_args(model, path, int8_calibration), log)
    if code != 0:
        raise SystemExit(f"exporting {model['spec']} failed: {tail(log)}")
    return path


def heldout(repo: Path, model: dict, recipe: Path, work: Path) -> tuple[np.ndarray, np.ndarray, int, str]:
    """Held-out samples and labels of `recipe`, split by the checkout under test; calibration count; its edgeprune."""
    path = work / f"{recipe.stem}-heldout.npz"
    p = run_python(repo, HELDOUT_SCRIPT, str(recipe), model["input_shape"], str(path), cwd=work)
    if p.returncode != 0:
        raise SystemExit(f"loading {recipe} failed: {p.stderr.strip().splitlines()[-1:]}")
    d = np.load(path)
    if d["y"].ndim != 1:
        raise SystemExit(f"recipe {recipe} is unlabelled: no accuracy to measure")
    return d["x"], d["y"], int(d["calib"]), p.stdout.strip()


# ---------------------------------------------------------------- measuring here (ONNX Runtime)


def session(onnx: str | Path):  # -> onnxruntime.InferenceSession
    """A fresh session as edgeprune's `cpu` target makes it: all graph optimisations, 1 intra-op thread."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(onnx), so, providers=["CPUExecutionProvider"])


def run_batched(onnx: str | Path, x: np.ndarray, batch: int) -> list[list[np.ndarray]]:
    """Every output of the ONNX model over `x`, run `batch` samples at a time (one when its batch is fixed at 1):
    a list of runs, each the list of its outputs."""
    sess = session(onnx)
    inp = sess.get_inputs()[0]
    step = 1 if inp.shape[0] == 1 else batch
    return [sess.run(None, {inp.name: x[i:i + step]}) for i in range(0, len(x), step)]


def accuracy(onnx: str | Path, x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy of an ONNX model on (x, y)."""
    preds = [run[0].reshape(len(run[0]), -1).argmax(1) for run in run_batched(onnx, x, 256)]
    return float(np.mean(np.concatenate(preds) == y))


def random_feed(sess) -> dict[str, np.ndarray]:
    """A fixed random input for the session's first input (a dynamic dimension taken as 1)."""
    inp = sess.get_inputs()[0]
    return {inp.name: np.random.default_rng(0).standard_normal(
        [d if isinstance(d, int) else 1 for d in inp.shape]).astype(np.float32)}


def time_once(onnx: str | Path) -> float:
    """Median latency in ms of one fresh session: WARMUP runs, then ITERATIONS timed runs."""
    sess = session(onnx)
    feed = random_feed(sess)
    for _ in range(WARMUP):
        sess.run(None, feed)
    return timed_median(sess, feed, ITERATIONS)


def timed_median(sess, feed: dict[str, np.ndarray], runs: int) -> float:
    """The median in ms of `runs` timed runs of `sess` on `feed`."""
    times = []
    for _ in range(runs):
        t0 = time.perf_counter_ns()
        sess.run(None, feed)
        times.append((time.perf_counter_ns() - t0) / 1e6)
    return float(np.median(times))


def interleaved(paths: dict[str, str | Path], passes: int) -> dict[str, dict]:
    """Each model once per pass, `passes` passes; per model the median over passes and the per-pass medians."""
    per: dict[str, list[float]] = {k: [] for k in paths}
    for _ in range(passes):
        for k, p in paths.items():
            per[k].append(time_once(p))
    return {k: {"median_ms": float(np.median(v)), "passes_ms": [round(t, 4) for t in v]} for k, v in per.items()}


# ---------------------------------------------------------------- flags


def add_ab_flags(ap: argparse.ArgumentParser, budgets: str, out: str) -> None:
    """The flags of the CaP-against-L1 benchmarks (bench_accuracy, bench_tasks) after their model choice."""
    ap.add_argument("--budgets", default=budgets, help=f"comma-separated --latency values (default {budgets})")
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    ap.add_argument("--out", default=out, help=f"JSON results (default {out})")
    add_repo_flag(ap, help="edgeprune checkout to run (default: this one), e.g. a `git worktree` of an older commit")
    ap.add_argument("--skip-l1", action="store_true", help="build only the defaults (CaP + compensation)")
    ap.add_argument("--cap-flags", default="", metavar="FLAGS",
                    help="extra build flags for the CaP variant, e.g. '--allocation step' (an A/B of one option)")
    ap.add_argument("--passes", type=int, default=5,
                    help="interleaved latency passes over the released models (default 5)")
    ap.add_argument("--keep", default=None, metavar="DIR", help="keep build outputs and logs here (default: a "
                                                                "temporary folder, removed)")


def add_repo_flag(ap: argparse.ArgumentParser, help: str = "edgeprune checkout to run (default: this one)") -> None:
    ap.add_argument("--repo", default=str(ROOT), help=help)


def checkout(ap: argparse.ArgumentParser, repo: str) -> Path:
    """`--repo` resolved, or a usage error where it is no edgeprune checkout."""
    path = Path(repo).resolve()
    if not (path / "edgeprune" / "__init__.py").is_file():
        ap.error(f"--repo {path} is not an edgeprune checkout (no edgeprune/__init__.py)")
    return path


def choose(ap: argparse.ArgumentParser, names: str, table: dict, what: str) -> list[str]:
    """The comma-separated `names` of `table`, or a usage error naming the unknown ones."""
    chosen = names.split(",")
    unknown = [n for n in chosen if n not in table]
    if unknown:
        ap.error(f"unknown {what}(s) {', '.join(unknown)}; choose from {', '.join(table)}")
    return chosen


def ab_setup(ap: argparse.ArgumentParser, args: argparse.Namespace, flags: dict[str, list[str]]
             ) -> tuple[list[str], Path]:
    """The variants an `add_ab_flags` run builds (CaP with `--cap-flags`, written into `flags`, then L1 unless
    `--skip-l1`) and its checkout (`--repo`)."""
    flags["cap"] = shlex.split(args.cap_flags)
    return ["cap"] + ([] if args.skip_l1 else ["l1"]), checkout(ap, args.repo)


def cases(args: argparse.Namespace, names: list[str], prepare: Callable[[str, Path], Any]
          ) -> Iterator[tuple[str, Any, str, int, Path]]:
    """Every (name, budget, seed) of a run in order, with what `prepare(name, work)` made once per name (its base
    export) and the work folder: `--keep`'s, or a temporary one removed at the end."""
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.keep).resolve() if args.keep else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        for name in names:
            prepared = prepare(name, work)
            for budget in args.budgets.split(","):
                for seed in (int(s) for s in args.seeds.split(",")):
                    yield name, prepared, budget, seed, work


def progress(row: dict, keys: tuple[str, ...], variants: list[str], figures: tuple[str, ...]) -> None:
    """One line of JSON on stderr after a case: `keys` of the row and `figures` of each variant's build."""
    print(json.dumps({k: row[k] for k in keys} | {v: {k: row[v].get(k) for k in figures} for v in variants}),
          file=sys.stderr, flush=True)


def write_json(path: str | Path, result: dict, indent: int = 2) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=indent))


def report(out: str, result: dict, table_md: str) -> None:
    """Write the JSON `result` to `out`, print the Markdown table and say (on stderr) where the JSON went."""
    write_json(out, result)
    print(table_md)
    print(f"wrote {out}", file=sys.stderr)


# ---------------------------------------------------------------- Markdown


def table(head: list[str], rows: list[list[str]]) -> list[str]:
    """A Markdown table's lines."""
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows]


def pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def ratio(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def num(v: float | None, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)
