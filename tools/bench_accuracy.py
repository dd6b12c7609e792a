"""Benchmark held-out accuracy of `edgeprune build` at equal latency: CaP with compensation against L1 without.

For each model x budget x seed, two builds on `cpu` through the command line (`python -m edgeprune build --json`,
one subprocess each, a fresh measurement cache each): the defaults (criterion cap, compensation, proxy auto) and
`--criterion l1 --no-compensation`. Then, independently of the builds' own figures:

- latency: both released model.onnx files and the unpruned model, measured interleaved (pass 1: each model once,
  pass 2: each again, ...), each measurement a fresh ONNX Runtime session on 1 intra-op thread, warm-up, then timed
  runs; the figure is the median over passes of the per-pass medians. Interleaving spreads this machine's drift
  evenly over the models being compared.
- accuracy: each released model.onnx, and the unpruned model exported to ONNX, run with ONNX Runtime on the
  recipe's held-out samples (which never fed statistics), as loaded by the checkout under test; for `fashion` also
  on its test set, the 8000 Fashion-MNIST test images outside the calibration pool (no recipe draws them; "kept %
  (test)"): on 1000 held-out images one image is 0.1 points and the standard error of an accuracy near 92% about
  0.9 points, which at 0.3x is more than the distance between the goal and the figure.

Models: `example` (the bundled digits CNN, digits recipe) and `fashion` (tools/fashion.py, the npy recipe that
tools/train_fashion.py writes to bench/fashion/: 2000 Fashion-MNIST test images, 1000 held out). The seed is passed
as `--seed S` and as the recipe's seed (a recipe copy per seed): for these trained models `--seed` alone changes
nothing, the recipe seed changes the calibration / held-out split.

    python tools/bench_accuracy.py [--models example,fashion] [--budgets 0.5x,0.3x,0.2x] [--seeds 0,1,2]
                                   [--out bench/accuracy.json] [--repo PATH] [--skip-l1] [--cap-flags FLAGS]

`--repo` runs another edgeprune checkout (e.g. an older commit in a `git worktree`): every build, export and data
load runs `python -m edgeprune` / `import edgeprune` with PYTHONPATH set to it; the models, recipes, latency and
accuracy measurement stay this file's, so two checkouts are compared on the same footing. The full run takes long
(36 builds, 20-60 s each on a 2-core machine, and the measurements) and its latencies need a quiet machine: do not run
it beside other work. A build that fails is recorded with its exit code and last error line, and the run goes on.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import fashion  # noqa: E402

VARIANTS = {"cap": [], "l1": ["--criterion", "l1", "--no-compensation"]}
RELEASED_CODES = (0, 3, 4)  # exit codes after which a build has written its model (OUT or OUT.failed)
WARMUP, ITERATIONS = 20, 100

# The held-out split exactly as the checkout under test makes it, saved for this process to evaluate on.
HELDOUT_SCRIPT = """
import sys, numpy as np, edgeprune
try:
    from edgeprune.inputs.data import load_data
    from edgeprune.inputs.recipe import load_recipe
except ImportError:  # a checkout from before the subpackages
    from edgeprune.data import load_data
    from edgeprune.recipe import load_recipe
d = load_data(load_recipe(sys.argv[1]), tuple(int(v) for v in sys.argv[2].split(",")))
np.savez(sys.argv[3], x=d.heldout_x, y=d.heldout_y, calib=len(d.calib_x))
print(edgeprune.__file__)
"""


# ---------------------------------------------------------------- models and recipes


def model_table() -> dict[str, dict]:
    """Model name -> its spec, input shape and a recipe writer `recipe(seed, folder) -> Path`."""
    def digits(seed: int, folder: Path) -> Path:
        path = folder / f"digits-{seed}.toml"
        path.write_text(f'kind = "digits"\nheldout = 0.25\nbatch_size = 32\nseed = {seed}\n')
        return path

    def fashion_recipe(seed: int, folder: Path) -> Path:
        if not (fashion.CALIB_DIR / "calib_x.npy").is_file():
            raise SystemExit(f"{fashion.CALIB_DIR}/calib_x.npy is missing: run `python tools/train_fashion.py` "
                             "(or `python tools/fashion.py` once the weights exist)")
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
        "fashion": {"spec": f"{HERE / 'fashion.py'}:make_net", "input_shape": "1,1,28,28", "recipe": fashion_recipe,
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


def tail(log: Path) -> str:
    lines = [ln for ln in log.read_text().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def build(repo: Path, model: dict, budget: str, seed: int, recipe: Path, variant: str, work: Path) -> dict:
    """One `edgeprune build` of `variant`; its report's key figures and the path of the model it released."""
    out = work / "out"
    args = ["build", "--model", model["spec"], "--input-shape", model["input_shape"], "--device", "cpu",
            "--latency", budget, "--calibration", str(recipe), "--seed", str(seed), "--out", str(out),
            "--cache-dir", str(work / "cache"), "--json", *VARIANTS[variant]]
    shutil.rmtree(work, ignore_errors=True)  # a kept folder from an earlier run: no stale cache, no old output
    work.mkdir(parents=True)
    code, stdout, wall = run_edgeprune(repo, args, work / "build.log")
    row: dict = {"exit_code": code, "wall_s": round(wall, 2)}
    if code not in RELEASED_CODES:
        return {**row, "error": tail(work / "build.log"), "onnx": None}
    r = json.loads(stdout)
    released = Path(r.get("out") or (out if code == 0 else f"{out}.failed"))
    acc = (r.get("fidelity") or {}).get("accuracy") or {}
    return {**row, "onnx": str(released / "model.onnx"), "met": r["met"], "budget_ms": r["budget_ms"],
            "base_ms": r["base"]["latency_ms"]["median"], "final_ms": r["final"]["latency_ms"]["median"],
            "measured_candidates": r["search"]["measured_candidates"], "proxy": r["search"].get("proxy"),
            "macs": r["final"].get("macs"), "params": r["final"].get("params"),
            "report_accuracy": acc.get("after"), "report_accuracy_before": acc.get("before"),
            "timings_s": r.get("timings_s")}


def export_base(repo: Path, model: dict, work: Path) -> Path:
    """The unpruned model as ONNX (TorchScript exporter, as `build` exports its candidates)."""
    work.mkdir(parents=True, exist_ok=True)
    path = work / "base.onnx"
    code, _, _ = run_edgeprune(repo, ["export", "--model", model["spec"], "--input-shape", model["input_shape"],
                                      "-o", str(path), "--exporter", "torchscript", "--json"], work / "export.log")
    if code != 0:
        raise SystemExit(f"exporting {model['spec']} failed: {tail(work / 'export.log')}")
    return path


def heldout(repo: Path, model: dict, recipe: Path, work: Path) -> tuple[np.ndarray, np.ndarray, int, str]:
    """Held-out samples and labels of `recipe`, split by the checkout under test; calibration count; its edgeprune."""
    path = work / f"{recipe.stem}-heldout.npz"
    p = subprocess.run([sys.executable, "-c", HELDOUT_SCRIPT, str(recipe), model["input_shape"], str(path)],
                       check=False, capture_output=True, text=True, env=edgeprune_env(repo), cwd=work)
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


def accuracy(onnx: str | Path, x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy of an ONNX model on (x, y); one sample per run when the model's batch is fixed at 1."""
    sess = session(onnx)
    inp = sess.get_inputs()[0]
    step = 1 if inp.shape[0] == 1 else 256
    preds = [sess.run(None, {inp.name: x[i:i + step]})[0].reshape(len(x[i:i + step]), -1).argmax(1)
             for i in range(0, len(x), step)]
    return float(np.mean(np.concatenate(preds) == y))


def time_once(onnx: str | Path) -> float:
    """Median latency in ms of one fresh session: WARMUP runs, then ITERATIONS timed runs."""
    sess = session(onnx)
    inp = sess.get_inputs()[0]
    feed = {inp.name: np.random.default_rng(0).standard_normal(
        [d if isinstance(d, int) else 1 for d in inp.shape]).astype(np.float32)}
    for _ in range(WARMUP):
        sess.run(None, feed)
    times = []
    for _ in range(ITERATIONS):
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


# ---------------------------------------------------------------- the benchmark


def bench_case(repo: Path, name: str, model: dict, budget: str, seed: int, variants: list[str], base_onnx: Path,
               work: Path, passes: int, test: tuple[np.ndarray, np.ndarray] | None = None) -> dict:
    """One (model, budget, seed): builds of every variant, then latency and accuracy measured here (also on the
    model's `test` set, when it has one)."""
    recipe = model["recipe"](seed, work)
    x, y, n_calib, edgeprune_file = heldout(repo, model, recipe, work)
    row: dict = {"model": name, "budget": budget, "seed": seed, "heldout": len(y), "calibration": n_calib,
                 "edgeprune": edgeprune_file}
    # every variant after the first aims at the first one's budget in ms: one unpruned measurement decides the
    # budget for both, so the comparison is at the same latency target (the latencies below are measured again)
    builds: dict[str, dict] = {}
    for v in variants:
        target = budget
        if builds and builds[variants[0]].get("budget_ms"):
            target = f"{builds[variants[0]]['budget_ms']:.5f}ms"
        builds[v] = build(repo, model, target, seed, recipe, v, work / f"{name}-{budget}-{seed}-{v}")
    released = {v: b["onnx"] for v, b in builds.items() if b["onnx"]}
    lat = interleaved({"unpruned": base_onnx, **released}, passes)
    row["unpruned_accuracy"] = accuracy(base_onnx, x, y)
    if test is not None:
        row["test"] = len(test[1])
        row["unpruned_test_accuracy"] = accuracy(base_onnx, *test)
    row["unpruned_ms"] = lat["unpruned"]["median_ms"]
    for v, b in builds.items():
        if b["onnx"]:
            b["accuracy"] = accuracy(b["onnx"], x, y)
            b["latency"] = lat[v]
            b["met_remeasured"] = lat[v]["median_ms"] <= b["budget_ms"]
            # against the unpruned model measured in the same passes: free of the drift between build and re-measure
            b["ratio_to_unpruned"] = lat[v]["median_ms"] / lat["unpruned"]["median_ms"]
            b["kept"] = b["accuracy"] / row["unpruned_accuracy"] if row["unpruned_accuracy"] else None
            if test is not None:
                b["test_accuracy"] = accuracy(b["onnx"], *test)
                b["test_kept"] = b["test_accuracy"] / row["unpruned_test_accuracy"]
        row[v] = b
    return row


def summarise(rows: list[dict], variants: list[str]) -> list[dict]:
    """Per (model, budget): mean accuracies and mean kept fraction (accuracy after / before) over seeds."""
    out = []
    for key in dict.fromkeys((r["model"], r["budget"]) for r in rows):
        group = [r for r in rows if (r["model"], r["budget"]) == key]
        s: dict = {"model": key[0], "budget": key[1], "seeds": len(group),
                   "unpruned_accuracy": statistics.mean(r["unpruned_accuracy"] for r in group)}
        for v in variants:
            done = [r[v] for r in group if r[v].get("accuracy") is not None]
            s[v] = {"accuracy": statistics.mean(b["accuracy"] for b in done) if done else None,
                    "kept": statistics.mean(b["kept"] for b in done) if done else None,
                    "latency_ms": statistics.mean(b["latency"]["median_ms"] for b in done) if done else None,
                    "ratio_to_unpruned": statistics.mean(b["ratio_to_unpruned"] for b in done) if done else None,
                    "met": sum(bool(b["met"]) for b in done), "builds": len(done),
                    "test_kept": statistics.mean(b["test_kept"] for b in done)
                    if done and all("test_kept" in b for b in done) else None}
        out.append(s)
    return out


def pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def ratio(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def markdown(rows: list[dict], summary: list[dict], variants: list[str]) -> str:
    """The per-build table and the per-(model, budget) summary."""
    l1 = "l1" in variants
    names = " / ".join("L1" if v == "l1" else "CaP" for v in variants)

    def pair(r: dict, f) -> str:
        return " / ".join(f(r[v]) for v in variants)

    head = ["model", "budget", "seed", "unpruned %", "CaP %"] + (["L1 %"] if l1 else []) + \
           ["unpruned ms", f"ms {names}", f"budget ms {names}", f"met {names}", f"build s {names}",
            f"candidates {names}"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["model"], r["budget"], str(r["seed"]), pct(r["unpruned_accuracy"]), pct(r["cap"].get("accuracy"))]
        cells += [pct(r["l1"].get("accuracy"))] if l1 else []
        cells += [ms(r["unpruned_ms"]), pair(r, lambda b: ms(b.get("latency", {}).get("median_ms"))),
                  pair(r, lambda b: ms(b.get("budget_ms"))),
                  pair(r, lambda b: "-" if "met" not in b else ("yes" if b["met"] else "no")),
                  pair(r, lambda b: f"{b['wall_s']:.0f}"),
                  pair(r, lambda b: str(b.get("measured_candidates", "-")))]
        lines.append("| " + " | ".join(cells) + " |")
    head = ["model", "budget", "seeds", "unpruned %", "CaP %", "CaP kept %", "CaP kept % (test)",
            "CaP x unpruned ms"] + (["L1 %", "L1 kept %", "L1 kept % (test)", "L1 x unpruned ms"] if l1 else [])
    lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in summary:
        cells = [s["model"], s["budget"], str(s["seeds"]), pct(s["unpruned_accuracy"]), pct(s["cap"]["accuracy"]),
                 pct(s["cap"]["kept"]), pct(s["cap"]["test_kept"]), ratio(s["cap"]["ratio_to_unpruned"])]
        cells += [pct(s["l1"]["accuracy"]), pct(s["l1"]["kept"]), pct(s["l1"]["test_kept"]),
                  ratio(s["l1"]["ratio_to_unpruned"])] if l1 else []
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="example,fashion", help="comma-separated: example, fashion (default both)")
    ap.add_argument("--budgets", default="0.5x,0.3x,0.2x", help="comma-separated --latency values (default "
                                                                 "0.5x,0.3x,0.2x)")
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    ap.add_argument("--out", default="bench/accuracy.json", help="JSON results (default bench/accuracy.json)")
    ap.add_argument("--repo", default=str(HERE.parent),
                    help="edgeprune checkout to run (default: this one), e.g. a `git worktree` of an older commit")
    ap.add_argument("--skip-l1", action="store_true", help="build only the defaults (CaP + compensation)")
    ap.add_argument("--cap-flags", default="", metavar="FLAGS",
                    help="extra build flags for the CaP variant, e.g. '--allocation step' (an A/B of one option)")
    ap.add_argument("--passes", type=int, default=5,
                    help="interleaved latency passes over the released models (default 5)")
    ap.add_argument("--keep", default=None, metavar="DIR", help="keep build outputs and logs here (default: a "
                                                                "temporary folder, removed)")
    args = ap.parse_args()
    table = model_table()
    models = args.models.split(",")
    unknown = [m for m in models if m not in table]
    if unknown:
        ap.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(table)}")
    variants = ["cap"] + ([] if args.skip_l1 else ["l1"])
    VARIANTS["cap"] = shlex.split(args.cap_flags)
    repo = Path(args.repo).resolve()
    if not (repo / "edgeprune" / "__init__.py").is_file():
        ap.error(f"--repo {repo} is not an edgeprune checkout (no edgeprune/__init__.py)")
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.keep).resolve() if args.keep else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        for name in models:
            base = export_base(repo, table[name], work / f"{name}-base")
            test = table[name]["test"]() if "test" in table[name] else None
            for budget in args.budgets.split(","):
                for seed in seeds:
                    row = bench_case(repo, name, table[name], budget, seed, variants, base, work, args.passes, test)
                    print(json.dumps({k: row[k] for k in ("model", "budget", "seed", "unpruned_accuracy")} |
                                     {v: {k: row[v].get(k) for k in ("exit_code", "accuracy", "wall_s")}
                                      for v in variants}), file=sys.stderr, flush=True)
                    rows.append(row)
    summary = summarise(rows, variants)
    result = {"benchmark": "accuracy", "repo": str(repo), "variants": {v: VARIANTS[v] for v in variants},
              "passes": args.passes, "warmup": WARMUP, "iterations": ITERATIONS, "rows": rows, "summary": summary}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(markdown(rows, summary, variants))
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
