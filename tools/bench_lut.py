"""Benchmark latency tables: build time, and predicted against measured latency on random plans.

    python tools/bench_lut.py [--models resnet18,mobilenet_v2] [--plans 50] [--out bench/lut.json]

Random plans: each group's width uniform in [15%, 100%] of its channels, rounded to the target's multiple. Each plan
is pruned (no compensation: weights do not change latency), exported, simplified and measured on `cpu` without cache.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from edgeprune.graph import trace
from edgeprune.lut import LayerModel, load_lut, predict
from edgeprune.models import load_model
from edgeprune.pipeline import export_candidate, lut_job
from edgeprune.plan import Plan, round_width
from edgeprune.prune import prune
from edgeprune.runtimes import measure
from edgeprune.targets import load_target


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="resnet18,mobilenet_v2")
    ap.add_argument("--plans", type=int, default=50)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default="bench/lut.json")
    args = ap.parse_args()
    target = load_target(args.device)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            spec = f"torchvision:{name}"
            t0 = time.perf_counter()
            summary = lut_job(spec, args.device, Path(tmp) / "lut.json")
            build_s = time.perf_counter() - t0
            table = load_lut(Path(tmp) / "lut.json")
            m = load_model(spec)
            graph = trace(m.module, m.example_input)
            lm = LayerModel.from_model(m.module, m.example_input, graph, spec)
            rng = np.random.default_rng(0)
            errs, points = [], []
            for i in range(args.plans):
                widths = {g.name: round_width(g.channels * rng.uniform(0.15, 1.0), g.channels, target.channel_multiple)
                          for g in graph.groups}
                plan = Plan(kept={k: tuple(range(w)) for k, w in widths.items()},
                            channels={g.name: g.channels for g in graph.groups}, compensation=False)
                path = Path(tmp) / "plan.onnx"
                export_candidate(prune(m.module, m.example_input, plan), m.example_input, path, "torchscript")
                meas = measure(path, target, cache=None).median
                pred, _ = predict(table, lm, widths)
                errs.append(pred / meas - 1)
                points.append({"predicted_ms": pred, "measured_ms": meas})
                print(f"{name} plan {i + 1}: predicted {pred:.3f} measured {meas:.3f} ({100 * errs[-1]:+.1f}%)",
                      file=sys.stderr, flush=True)
            e = np.abs(np.asarray(errs))
            row = {"model": name, "target": target.name, "lut_build_s": build_s, "signatures": summary["signatures"],
                   "plans": args.plans, "within_10pct": float(np.mean(e <= 0.10)), "mape": float(np.mean(e)),
                   "max_abs_err": float(e.max()), "best_channel_multiple": summary["best_channel_multiple"],
                   "calibration": summary["calibration"], "points": points}
            print(json.dumps({k: v for k, v in row.items() if k not in ("points", "calibration")}), flush=True)
            rows.append(row)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"benchmark": "lut", "rows": rows}, indent=2))
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
