"""Benchmark INT8 releases: fp32 / int8 x unpruned / pruned, latency re-measured here and held-out accuracy.

For each model, one `edgeprune build --device cpu-int8 --latency 0.5x` (its budget: half the unpruned *int8*
model's latency), which releases the pruned int8 model (model.onnx) and its float twin (model.fp32.onnx); the
unpruned model exported float (`edgeprune export`) and int8 (`edgeprune export --int8`, quantised on the same
recipe with cpu-int8's settings). Then, independently of the build's figures, the four ONNX files measured
interleaved here (tools/bench_accuracy.py's fresh 1-thread sessions, median over passes of per-pass medians),
and, for the labelled models, their held-out accuracy with ONNX Runtime.

Models: `example` (digits recipe), `fashion` (tools/fashion.py, its npy recipe in bench/fashion/: run
`python tools/fashion.py` first) and torchvision `resnet18` (random weights, `random` calibration: latency only).

    python tools/bench_int8.py [--models example,fashion,resnet18] [--budget 0.5x] [--passes 5]
                               [--out bench/int8.json] [--keep DIR]

Run it on a quiet machine (one core: `taskset -c 0`); the README's INT8 table holds its figures.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench_accuracy as ba  # noqa: E402

REPO = HERE.parent
FILES = ("fp32 unpruned", "int8 unpruned", "fp32 pruned", "int8 pruned")


def models() -> dict[str, dict]:
    table = ba.model_table()
    table["resnet18"] = {"spec": "torchvision:resnet18", "input_shape": "1,3,224,224",
                         "recipe": lambda seed, folder: "random"}
    return table


def export(model: dict, recipe: str, work: Path, int8: bool) -> Path:
    path = work / ("base.int8.onnx" if int8 else "base.onnx")
    args = ["export", "--model", model["spec"], "--input-shape", model["input_shape"], "-o", str(path),
            "--exporter", "torchscript", "--json"]
    if int8:
        args += ["--int8", "--calibration", recipe, "--device", "cpu-int8"]
    code, _, _ = ba.run_edgeprune(REPO, args, work / f"export{'-int8' if int8 else ''}.log")
    if code != 0:
        raise SystemExit(f"exporting {model['spec']} failed: {ba.tail(work / 'export.log')}")
    return path


def bench_model(name: str, model: dict, budget: str, passes: int, work: Path) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    recipe = str(model["recipe"](0, work))
    out = work / "out"
    args = ["build", "--model", model["spec"], "--input-shape", model["input_shape"], "--device", "cpu-int8",
            "--latency", budget, "--calibration", recipe, "--out", str(out), "--cache-dir", str(work / "cache"),
            "--json"]
    code, stdout, wall = ba.run_edgeprune(REPO, args, work / "build.log")
    row: dict = {"model": name, "budget": budget, "exit_code": code, "wall_s": round(wall, 1)}
    if code != 0:
        return {**row, "error": ba.tail(work / "build.log")}
    r = json.loads(stdout)
    row["build"] = {"met": r["met"], "budget_ms": r["budget_ms"], "base_int8_ms": r["base"]["latency_ms"]["median"],
                    "final_int8_ms": r["final"]["latency_ms"]["median"],
                    "base_fp32_ms": (r.get("base_float") or {}).get("latency_ms", {}).get("median"),
                    "speedup_over_float": r.get("speedup_over_float"), "measured": r["search"]["measured_candidates"]}
    paths = dict(zip(FILES, (export(model, recipe, work, False), export(model, recipe, work, True),
                             out / "model.fp32.onnx", out / "model.onnx"), strict=True))
    lat = ba.interleaved(paths, passes)
    row["latency_ms"] = {k: lat[k]["median_ms"] for k in FILES}
    row["passes_ms"] = {k: lat[k]["passes_ms"] for k in FILES}
    row["met_remeasured"] = lat["int8 pruned"]["median_ms"] <= r["budget_ms"]
    if recipe != "random":
        x, y, _, _ = ba.heldout(REPO, model, Path(recipe), work)
        row["accuracy"] = {k: ba.accuracy(p, x, y) for k, p in paths.items()}
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
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"benchmark": "int8", "budget": args.budget, "passes": args.passes,
                                          "warmup": ba.WARMUP, "iterations": ba.ITERATIONS, "rows": rows}, indent=2))
    Path(args.out).with_suffix(".md").write_text(markdown(rows))
    print(markdown(rows), end="")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
