"""Benchmark INT8 releases: fp32 / int8 x unpruned / pruned, latency re-measured here and held-out accuracy.

For each model, one `edgeprune build --device cpu-int8 --latency 0.5x` (its budget: half the unpruned *int8*
model's latency), which releases the pruned int8 model (model.onnx) and its float twin (model.fp32.onnx); the
unpruned model exported float (`edgeprune export`) and int8 (`edgeprune export --int8`, quantised on the same
recipe with cpu-int8's settings). Then, independently of the build's figures, the four ONNX files measured
interleaved here (tools/harness.py's fresh 1-thread sessions, median over passes of per-pass medians),
and, for the labelled models, their held-out accuracy with ONNX Runtime.

Models: `example` (digits recipe), `fashion` (tools/fashion.py, its npy recipe in bench/fashion/: run
`python -m tools.fashion` first) and torchvision `resnet18` (random weights, `random` calibration: latency only).

    python -m tools.bench_int8 [--models example,fashion,resnet18] [--budget 0.5x] [--passes 5]
                               [--out bench/int8.json] [--keep DIR]

Run it on a quiet machine (one core: `taskset -c 0`); the README's INT8 table holds its figures.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from . import harness
from .harness import ROOT as REPO

FILES = ("fp32 unpruned", "int8 unpruned", "fp32 pruned", "int8 pruned")


def models() -> dict[str, dict]:
    table = harness.model_table()
    table["resnet18"] = {"spec": "torchvision:resnet18", "input_shape": "1,3,224,224",
                         "recipe": lambda seed, folder: "random"}
    return table


def bench_model(name: str, model: dict, budget: str, passes: int, work: Path) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    recipe = str(model["recipe"](0, work))
    out = work / "out"
    args = harness.build_args(model, budget, recipe, out, work / "cache", [], device="cpu-int8")
    code, stdout, wall = harness.run_edgeprune(REPO, args, work / "build.log")
    row: dict = {"model": name, "budget": budget, "exit_code": code, "wall_s": round(wall, 1)}
    if code != 0:
        return {**row, "error": harness.tail(work / "build.log")}
    r = json.loads(stdout)
    row["build"] = {"met": r["met"], "budget_ms": r["budget_ms"], "base_int8_ms": r["base"]["latency_ms"]["median"],
                    "final_int8_ms": r["final"]["latency_ms"]["median"],
                    "base_fp32_ms": (r.get("base_float") or {}).get("latency_ms", {}).get("median"),
                    "speedup_over_float": r.get("speedup_over_float"), "measured": r["search"]["measured_candidates"]}
    paths = dict(zip(FILES, (harness.export_base(REPO, model, work), harness.export_base(REPO, model, work, recipe),
                             out / "model.fp32.onnx", out / "model.onnx"), strict=True))
    lat = harness.interleaved(paths, passes)
    row["latency_ms"] = {k: lat[k]["median_ms"] for k in FILES}
    row["passes_ms"] = {k: lat[k]["passes_ms"] for k in FILES}
    row["met_remeasured"] = lat["int8 pruned"]["median_ms"] <= r["budget_ms"]
    if recipe != "random":
        x, y, _, _ = harness.heldout(REPO, model, Path(recipe), work)
        row["accuracy"] = {k: harness.accuracy(p, x, y) for k, p in paths.items()}
    return row


def markdown(rows: list[dict]) -> str:
    lines = ["| model | budget (int8) | exit | " + " | ".join(f"{k} ms" for k in FILES)
             + " | int8 pruned vs fp32 unpruned | " + " | ".join(f"{k} acc" for k in FILES) + " |",
             "|---|---|---|" + "---|" * (2 * len(FILES) + 1)]
    for r in rows:
        if "latency_ms" not in r:
            lines.append(f"| {r['model']} | {r['budget']} | {r['exit_code']} | {r.get('error', '')} |")
            continue
        lat, acc = r["latency_ms"], r.get("accuracy") or {}
        speed = lat["fp32 unpruned"] / lat["int8 pruned"]
        lines.append(f"| {r['model']} | {r['build']['budget_ms']:.3f} ms | {r['exit_code']} | "
                     + " | ".join(f"{lat[k]:.3f}" for k in FILES) + f" | {speed:.2f}x | "
                     + " | ".join(f"{100 * acc[k]:.2f}%" if k in acc else "-" for k in FILES) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="example,fashion,resnet18")
    ap.add_argument("--budget", default="0.5x")
    ap.add_argument("--passes", type=int, default=5)
    ap.add_argument("--out", default="bench/int8.json")
    ap.add_argument("--keep", default=None, metavar="DIR", help="keep build outputs here (default: a temporary dir)")
    args = ap.parse_args()
    table = models()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.keep or tmp)
        for name in args.models.split(","):
            rows.append(bench_model(name, table[name], args.budget, args.passes, work / name))
            print(markdown(rows[-1:]).splitlines()[-1], file=sys.stderr)
    harness.write_json(args.out, {"benchmark": "int8", "budget": args.budget, "passes": args.passes,
                                  "warmup": harness.WARMUP, "iterations": harness.ITERATIONS, "rows": rows})
    Path(args.out).with_suffix(".md").write_text(markdown(rows))
    print(markdown(rows), end="")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
