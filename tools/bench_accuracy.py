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
`python -m tools.train_fashion` writes to bench/fashion/: 2000 Fashion-MNIST test images, 1000 held out). The seed
is passed as `--seed S` and as the recipe's seed (a recipe copy per seed): for these trained models `--seed` alone
changes nothing, the recipe seed changes the calibration / held-out split.

    python -m tools.bench_accuracy [--models example,fashion] [--budgets 0.5x,0.3x,0.2x] [--seeds 0,1,2]
                                   [--out bench/accuracy.json] [--repo PATH] [--skip-l1] [--cap-flags FLAGS]

`--repo` runs another edgeprune checkout (e.g. an older commit in a `git worktree`): every build, export and data
load runs `python -m edgeprune` / `import edgeprune` with PYTHONPATH set to it; the models, recipes, latency and
accuracy measurement stay tools/harness.py's, so two checkouts are compared on the same footing. The full run takes
long (36 builds, 20-60 s each on a 2-core machine, and the measurements) and its latencies need a quiet machine: do
not run it beside other work. A build that fails is recorded with its exit code and last error line, and the run
goes on.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import numpy as np

from .harness import (
    ITERATIONS,
    WARMUP,
    ab_setup,
    accuracy,
    add_ab_flags,
    cases,
    choose,
    export_base,
    heldout,
    interleaved,
    model_table,
    ms,
    pct,
    progress,
    ratio,
    report,
    run_build,
    same_budget,
    table,
    tail,
)

VARIANTS = {"cap": [], "l1": ["--criterion", "l1", "--no-compensation"]}


def build(repo: Path, model: dict, budget: str, seed: int, recipe: Path, flags: list[str], work: Path) -> dict:
    """One `edgeprune build` with `flags`: its report's key figures and the path of the model it released."""
    code, wall, r, released = run_build(repo, model, budget, seed, recipe, flags, work)
    row: dict = {"exit_code": code, "wall_s": round(wall, 2)}
    if r is None:
        return {**row, "error": tail(work / "build.log"), "onnx": None}
    acc = (r.get("fidelity") or {}).get("accuracy") or {}
    return {**row, "onnx": str(released / "model.onnx"), "met": r["met"], "budget_ms": r["budget_ms"],
            "base_ms": r["base"]["latency_ms"]["median"], "final_ms": r["final"]["latency_ms"]["median"],
            "measured_candidates": r["search"]["measured_candidates"], "proxy": r["search"].get("proxy"),
            "macs": r["final"].get("macs"), "params": r["final"].get("params"),
            "report_accuracy": acc.get("after"), "report_accuracy_before": acc.get("before"),
            "timings_s": r.get("timings_s")}


# ---------------------------------------------------------------- the benchmark


def bench_case(repo: Path, name: str, model: dict, budget: str, seed: int, variants: list[str], base_onnx: Path,
               work: Path, passes: int, test: tuple[np.ndarray, np.ndarray] | None = None) -> dict:
    """One (model, budget, seed): builds of every variant, then latency and accuracy measured here (also on the
    model's `test` set, when it has one)."""
    recipe = model["recipe"](seed, work)
    x, y, n_calib, edgeprune_file = heldout(repo, model, recipe, work)
    row: dict = {"model": name, "budget": budget, "seed": seed, "heldout": len(y), "calibration": n_calib,
                 "edgeprune": edgeprune_file}
    # every variant after the first aims at the first one's budget in ms (the latencies below are measured again)
    builds: dict[str, dict] = {}
    for v in variants:
        builds[v] = build(repo, model, same_budget(budget, builds.get(variants[0])), seed, recipe, VARIANTS[v],
                          work / f"{name}-{budget}-{seed}-{v}")
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


def markdown(rows: list[dict], summary: list[dict], variants: list[str]) -> str:
    """The per-build table and the per-(model, budget) summary."""
    l1 = "l1" in variants
    names = " / ".join("L1" if v == "l1" else "CaP" for v in variants)

    def pair(r: dict, f) -> str:
        return " / ".join(f(r[v]) for v in variants)

    head = ["model", "budget", "seed", "unpruned %", "CaP %"] + (["L1 %"] if l1 else []) + \
           ["unpruned ms", f"ms {names}", f"budget ms {names}", f"met {names}", f"build s {names}",
            f"candidates {names}"]
    cells = []
    for r in rows:
        cells.append([r["model"], r["budget"], str(r["seed"]), pct(r["unpruned_accuracy"]),
                      pct(r["cap"].get("accuracy"))] + ([pct(r["l1"].get("accuracy"))] if l1 else []) +
                     [ms(r["unpruned_ms"]), pair(r, lambda b: ms(b.get("latency", {}).get("median_ms"))),
                      pair(r, lambda b: ms(b.get("budget_ms"))),
                      pair(r, lambda b: "-" if "met" not in b else ("yes" if b["met"] else "no")),
                      pair(r, lambda b: f"{b['wall_s']:.0f}"),
                      pair(r, lambda b: str(b.get("measured_candidates", "-")))])
    lines = table(head, cells)
    head = ["model", "budget", "seeds", "unpruned %", "CaP %", "CaP kept %", "CaP kept % (test)",
            "CaP x unpruned ms"] + (["L1 %", "L1 kept %", "L1 kept % (test)", "L1 x unpruned ms"] if l1 else [])
    cells = []
    for s in summary:
        cells.append([s["model"], s["budget"], str(s["seeds"]), pct(s["unpruned_accuracy"]), pct(s["cap"]["accuracy"]),
                      pct(s["cap"]["kept"]), pct(s["cap"]["test_kept"]), ratio(s["cap"]["ratio_to_unpruned"])] +
                     ([pct(s["l1"]["accuracy"]), pct(s["l1"]["kept"]), pct(s["l1"]["test_kept"]),
                       ratio(s["l1"]["ratio_to_unpruned"])] if l1 else []))
    lines += [""] + table(head, cells)
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="example,fashion", help="comma-separated: example, fashion (default both)")
    add_ab_flags(ap, budgets="0.5x,0.3x,0.2x", out="bench/accuracy.json")
    args = ap.parse_args()
    zoo = model_table()
    models = choose(ap, args.models, zoo, "model")
    variants, repo = ab_setup(ap, args, VARIANTS)

    def prepare(name: str, work: Path) -> tuple[Path, tuple | None]:
        return export_base(repo, zoo[name], work / f"{name}-base"), zoo[name]["test"]() if "test" in zoo[name] else None

    rows = []
    for name, (base, test), budget, seed, work in cases(args, models, prepare):
        rows.append(bench_case(repo, name, zoo[name], budget, seed, variants, base, work, args.passes, test))
        progress(rows[-1], ("model", "budget", "seed", "unpruned_accuracy"), variants,
                 ("exit_code", "accuracy", "wall_s"))
    summary = summarise(rows, variants)
    report(args.out, {"benchmark": "accuracy", "repo": str(repo), "variants": {v: VARIANTS[v] for v in variants},
                      "passes": args.passes, "warmup": WARMUP, "iterations": ITERATIONS, "rows": rows,
                      "summary": summary}, markdown(rows, summary, variants))


if __name__ == "__main__":
    main()
