"""Benchmark: export and simplify time per exporter, and latency median and spread on `cpu`, per model.

    python -m tools.bench_profile [--models resnet18,mobilenet_v2,resnet50] [--out bench/profile.json]

Latency: three independent `measure` calls without cache (fresh sessions each), so the spread between them shows
how repeatable one figure is. Do not run it while the test suite runs.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import onnxruntime
import torch

from edgeprune import __version__
from edgeprune.export.onnx import export_onnx, parity, simplify_onnx
from edgeprune.inputs.models import load_model
from edgeprune.inputs.targets import load_target
from edgeprune.runtimes import measure


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="resnet18,mobilenet_v2,resnet50")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--runs", type=int, default=3, help="independent measurements per model")
    ap.add_argument("--out", default="bench/profile.json")
    args = ap.parse_args()
    target = load_target(args.device)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            m = load_model(f"torchvision:{name}")
            row: dict = {"model": name, "target": target.name}
            for exporter in ("dynamo", "torchscript"):
                path = Path(tmp) / f"{name}-{exporter}.onnx"
                t0 = time.perf_counter()
                export_onnx(m.module, m.example_input, path, exporter=exporter)
                t1 = time.perf_counter()
                simplify_onnx(path)
                t2 = time.perf_counter()
                row[exporter] = {"export_s": t1 - t0, "simplify_s": t2 - t1,
                                 "parity_rel_error": parity(m.module, m.example_input, path).rel_error}
            path = Path(tmp) / f"{name}-dynamo.onnx"
            runs = [measure(path, target) for _ in range(args.runs)]
            medians = [r.median for r in runs]
            row["latency_ms"] = {
                "medians": medians,
                "median": sorted(medians)[len(medians) // 2],
                "spread_pct": 100 * (max(medians) - min(medians)) / min(medians),
                "p90": [r.p90 for r in runs], "std": [r.std for r in runs], "n": runs[0].n,
            }
            print(json.dumps(row), flush=True)
            rows.append(row)
    result = {"benchmark": "profile", "versions": {"edgeprune": __version__, "torch": torch.__version__,
                                                   "onnxruntime": onnxruntime.__version__},
              "machine": platform.machine(), "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
