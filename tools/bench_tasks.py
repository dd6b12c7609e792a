"""Benchmark `edgeprune build` on a detector and a segmenter at equal latency: mAP and mIoU kept, CaP against L1.

tools/bench_accuracy.py's benchmark for the synthetic tasks of tools/tasks.py (tools/harness.py builds, exports
and measures for both): for each task x budget x seed, two builds on `cpu` through the command line, one subprocess
each, a fresh measurement cache each, both with `--evaluate tools/tasks.py:evaluate_<task>` (the metric in torch, in
the build's report): the defaults (criterion cap, compensation) and `--criterion l1 --no-compensation`, the second
aiming at the first's budget in ms. Then, independently of the builds' own figures:

- latency: the unpruned model's ONNX and both released model.onnx files measured interleaved, as bench_accuracy
  does (fresh ONNX Runtime sessions on 1 intra-op thread, median over passes of per-pass medians);
- the task metric of each ONNX file (and of the unpruned model exported to ONNX), run with ONNX Runtime on the
  held-out synthetic set of tools/tasks.py (256 images, never trained on nor used for calibration), decoded on the
  host by tasks.decode for the detector: mAP@0.5 and mAP@0.5:0.95 (torchmetrics), mIoU for the segmenter.

The seed is passed as `--seed S` and as the recipe's seed (a recipe copy per seed over bench/tasks/calib_x.npy,
written by `python -m tools.train_tasks` or `python -m tools.tasks`): it changes which calibration samples are held
out of the statistics.

    python -m tools.bench_tasks [--tasks detector,segmenter] [--budgets 0.6x] [--seeds 0,1,2]
                                [--out bench/tasks.json] [--repo PATH] [--skip-l1] [--cap-flags FLAGS]

The full run is 12 builds and their measurements (a detector build took 2 min with CaP, 1.3 min with L1 on our 2-core
machine with other jobs running); its latencies need a quiet machine. A build that fails is recorded with its exit
code and last error line, and the run goes on.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import numpy as np

from . import tasks
from .bench_accuracy import build as build_figures
from .harness import (
    ITERATIONS,
    TOOLS,
    WARMUP,
    ab_setup,
    add_ab_flags,
    cases,
    choose,
    export_base,
    interleaved,
    ms,
    pct,
    progress,
    ratio,
    report,
    run_batched,
    same_budget,
    table,
)

VARIANTS = {"cap": [], "l1": ["--criterion", "l1", "--no-compensation"]}
METRICS = {"detector": ("map_50", "map"), "segmenter": ("miou",)}
SHAPE = ",".join(str(d) for d in tasks.INPUT_SHAPE)


def task_table() -> dict[str, dict]:
    """Task -> the model entry the harness's build and export take, plus its --evaluate function."""
    return {task: {"spec": f"{TOOLS / 'tasks.py'}:make_{task}", "input_shape": SHAPE,
                   "evaluate": f"{TOOLS / 'tasks.py'}:evaluate_{task}"} for task in METRICS}


def recipe(task: str, seed: int, folder: Path) -> Path:
    """A copy of the task's npy recipe with the recipe seed `seed`, over the calibration images in bench/tasks/."""
    if not (tasks.CALIB_DIR / "calib_x.npy").is_file():
        raise SystemExit(f"{tasks.CALIB_DIR}/calib_x.npy is missing: run `python -m tools.train_tasks` "
                         "(or `python -m tools.tasks` once the weights exist)")
    path = folder / f"{task}-{seed}.toml"
    path.write_text(tasks.recipe_text(task, seed=seed, folder=tasks.CALIB_DIR))
    return path


def build(repo: Path, model: dict, budget: str, seed: int, recipe_path: Path, variant: str, work: Path) -> dict:
    """bench_accuracy's build of `variant` with --evaluate added, and the metric the build reported (torch)."""
    row = build_figures(repo, model, budget, seed, recipe_path, [*VARIANTS[variant], "--evaluate", model["evaluate"]],
                        work)
    if row["onnx"]:
        report = json.loads((Path(row["onnx"]).parent / "report.json").read_text())
        row["report_metric"] = report.get("metric")
    return row


def onnx_outputs(onnx: str | Path, images: np.ndarray) -> list[np.ndarray]:
    """Every output of the ONNX model over `images`, one sample per run when its batch is fixed at 1."""
    return [np.concatenate(parts) for parts in zip(*run_batched(onnx, images, 64), strict=True)]


def task_metrics(task: str, onnx: str | Path) -> dict[str, float]:
    """The task metrics of an ONNX model on the held-out set: its raw outputs decoded on the host for the detector."""
    samples = tasks.eval_samples()
    outs = onnx_outputs(onnx, samples.images)
    if task == "detector":
        return tasks.detection_map(tasks.decode(outs), samples.targets())
    return {"miou": tasks.segmentation_miou(outs[0], samples.masks)}


def bench_case(repo: Path, task: str, model: dict, budget: str, seed: int, variants: list[str], base: dict,
               work: Path, passes: int) -> dict:
    """One (task, budget, seed): builds of every variant, then latency and task metrics measured here."""
    recipe_path = recipe(task, seed, work)
    row: dict = {"task": task, "budget": budget, "seed": seed, "heldout": tasks.EVAL_COUNT,
                 "unpruned": base["metrics"]}
    builds: dict[str, dict] = {}
    for v in variants:  # every variant after the first aims at the first one's budget in ms (as bench_accuracy)
        builds[v] = build(repo, model, same_budget(budget, builds.get(variants[0])), seed, recipe_path, v,
                          work / f"{task}-{budget}-{seed}-{v}")
    released = {v: b["onnx"] for v, b in builds.items() if b["onnx"]}
    lat = interleaved({"unpruned": base["onnx"], **released}, passes)
    row["unpruned_ms"] = lat["unpruned"]["median_ms"]
    for v, b in builds.items():
        if b["onnx"]:
            b["metrics"] = task_metrics(task, b["onnx"])
            b["kept"] = {k: b["metrics"][k] / base["metrics"][k] if base["metrics"][k] else None
                         for k in METRICS[task]}
            b["latency"] = lat[v]
            b["met_remeasured"] = lat[v]["median_ms"] <= b["budget_ms"]
            b["ratio_to_unpruned"] = lat[v]["median_ms"] / lat["unpruned"]["median_ms"]
        row[v] = b
    return row


def summarise(rows: list[dict], variants: list[str]) -> list[dict]:
    """Per (task, budget, metric): the unpruned value and per variant the mean value, kept fraction and latency
    ratio over seeds."""
    out = []
    for task, budget in dict.fromkeys((r["task"], r["budget"]) for r in rows):
        group = [r for r in rows if (r["task"], r["budget"]) == (task, budget)]
        for metric in METRICS[task]:
            s: dict = {"task": task, "budget": budget, "metric": metric, "seeds": len(group),
                       "unpruned": statistics.mean(r["unpruned"][metric] for r in group)}
            for v in variants:
                done = [r[v] for r in group if r[v].get("metrics")]
                s[v] = {"value": mean(b["metrics"][metric] for b in done),
                        "kept": mean(b["kept"][metric] for b in done),
                        "ratio_to_unpruned": mean(b["ratio_to_unpruned"] for b in done),
                        "met": sum(bool(b["met"]) for b in done), "builds": len(done)}
            out.append(s)
    return out


def mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.mean(values) if values else None


def markdown(rows: list[dict], summary: list[dict], variants: list[str]) -> str:
    """The per-build table and the per-(task, budget, metric) summary."""
    names = " / ".join("L1" if v == "l1" else "CaP" for v in variants)

    def each(r: dict, f) -> str:
        return " / ".join(f(r[v]) for v in variants)

    head = ["task", "budget", "seed", "metric", "unpruned", f"value {names}", f"kept % {names}", "unpruned ms",
            f"ms {names}", f"x unpruned {names}", f"met {names}", f"build s {names}"]
    cells = []
    for r in rows:
        for metric in METRICS[r["task"]]:
            cells.append([r["task"], r["budget"], str(r["seed"]), metric, f"{r['unpruned'][metric]:.3f}",
                          each(r, lambda b, m=metric: value(b.get("metrics", {}).get(m))),
                          each(r, lambda b, m=metric: pct(b.get("kept", {}).get(m))), ms(r["unpruned_ms"]),
                          each(r, lambda b: ms(b.get("latency", {}).get("median_ms"))),
                          each(r, lambda b: ratio(b.get("ratio_to_unpruned"))),
                          each(r, lambda b: "-" if "met" not in b else ("yes" if b["met"] else "no")),
                          each(r, lambda b: f"{b['wall_s']:.0f}")])
    lines = table(head, cells)
    head = ["task", "budget", "metric", "seeds", "unpruned"] + \
           [f"{n} {c}" for v in variants for n in ["L1" if v == "l1" else "CaP"]
            for c in ("value", "kept %", "x unpruned ms")]
    lines += [""] + table(head, [[s["task"], s["budget"], s["metric"], str(s["seeds"]), f"{s['unpruned']:.3f}"] +
                                 [c for v in variants for c in (value(s[v]["value"]), pct(s[v]["kept"]),
                                                                ratio(s[v]["ratio_to_unpruned"]))]
                                 for s in summary])
    return "\n".join(lines)


def value(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", default="detector,segmenter", help="comma-separated: detector, segmenter (default "
                                                                  "both)")
    add_ab_flags(ap, budgets="0.6x", out="bench/tasks.json")
    args = ap.parse_args()
    zoo = task_table()
    names = choose(ap, args.tasks, zoo, "task")
    variants, repo = ab_setup(ap, args, VARIANTS)

    def prepare(task: str, work: Path) -> dict:
        onnx = export_base(repo, zoo[task], work / f"{task}-base")
        return {"onnx": onnx, "metrics": task_metrics(task, onnx)}

    rows = []
    for task, base, budget, seed, work in cases(args, names, prepare):
        rows.append(bench_case(repo, task, zoo[task], budget, seed, variants, base, work, args.passes))
        progress(rows[-1], ("task", "budget", "seed", "unpruned"), variants, ("exit_code", "metrics", "wall_s"))
    summary = summarise(rows, variants)
    report(args.out, {"benchmark": "tasks", "repo": str(repo), "variants": {v: VARIANTS[v] for v in variants},
                      "evaluate": {t: zoo[t]["evaluate"] for t in names},
                      "passes": args.passes, "warmup": WARMUP, "iterations": ITERATIONS, "rows": rows,
                      "summary": summary}, markdown(rows, summary, variants))


if __name__ == "__main__":
    main()
