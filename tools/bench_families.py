"""Re-measure `edgeprune build` across model families: segmenters, detectors without their host-side post-processing,
YOLO, grouped convolutions and channel shuffles (issue 15), each built at a relative budget on `cpu`.

For each model: one `python -m edgeprune build --latency 0.7x --calibration random --json` in a subprocess (random
weights: latency and structure only, no accuracy), a fresh measurement cache. Then, independently of the build's own
figures, the unpruned model (exported here with the TorchScript exporter, as `build` exports) and the released
model.onnx are timed interleaved in fresh ONNX Runtime sessions on one intra-op thread (tools/harness.py's), and
the released model is checked against its own report: every output's parity, output names and shapes equal to the
unpruned model's.

    python -m tools.bench_families [--models lraspp,ssdlite,...] [--budget 0.7x] [--passes 3]
                                   [--out bench/families.json]

The figure of merit is `remeasured_ratio`: the released model's re-measured latency over (budget x the re-measured
unpruned latency); the acceptance band is [0.90, 1.05]. Large models take minutes each (fcn_resnet50: about 7 min
to build on 2 cores); do not run it beside other work.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from .harness import (
    ROOT,
    build_args,
    export_args,
    random_feed,
    released_folder,
    run_edgeprune,
    session,
    table,
    tail,
    timed_median,
)

REPO = ROOT
# name -> (spec, input shape, extra build flags)
MODELS: dict[str, tuple[str, str, list[str]]] = {
    "lraspp": ("torchvision:lraspp_mobilenet_v3_large", "1,3,224,224", []),
    "deeplabv3": ("torchvision:deeplabv3_mobilenet_v3_large", "1,3,224,224", []),
    "fcn": ("torchvision:fcn_resnet50", "1,3,224,224", []),
    "ssdlite": ("torchvision:ssdlite320_mobilenet_v3_large", "1,3,320,320", []),
    "retinanet": ("torchvision:retinanet_resnet50_fpn", "1,3,320,320", []),
    "yolov8n": ("ultralytics:yolov8n.yaml", "1,3,320,320", []),
    "yolo11n": ("ultralytics:yolo11n.yaml", "1,3,320,320", []),
    "resnext": ("torchvision:resnext50_32x4d", "1,3,224,224", []),
    "shufflenet": ("torchvision:shufflenet_v2_x1_0", "1,3,224,224", []),
}
LOW, HIGH = 0.90, 1.05


def time_once(onnx: str | Path, budget_s: float = 3.0) -> float:
    """Median latency in ms of one fresh session: warm-up, then as many timed runs as fit in about `budget_s` (10 to
    100): a 1 s model gets 10 runs, a 1 ms model 100."""
    sess = session(onnx)
    feed = random_feed(sess)
    t0 = time.perf_counter()
    sess.run(None, feed)
    first = time.perf_counter() - t0
    runs = int(min(100, max(10, budget_s / max(first, 1e-6))))
    for _ in range(max(3, runs // 5)):
        sess.run(None, feed)
    return timed_median(sess, feed, runs)


def outputs(onnx: Path) -> list[tuple[str, list]]:
    return [(o.name, list(o.shape)) for o in session(onnx).get_outputs()]


def bench_model(name: str, budget: str, passes: int, work: Path) -> dict:
    spec, shape, extra = MODELS[name]
    model = {"spec": spec, "input_shape": shape}
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    row: dict = {"model": name, "spec": spec, "input_shape": shape, "budget": budget}
    code, _, _ = run_edgeprune(REPO, export_args(model, work / "base.onnx"), work / "export.log")
    if code != 0:
        return {**row, "error": f"export exit {code}: {tail(work / 'export.log')}"}
    code, stdout, wall = run_edgeprune(REPO, build_args(model, budget, "random", work / "out", work / "cache", extra),
                                       work / "build.log")
    row.update(exit_code=code, wall_s=round(wall, 1))
    if code not in (0, 3):
        return {**row, "error": tail(work / "build.log")}
    r = json.loads(stdout)
    released = released_folder(r, work / "out", code) / "model.onnx"
    parity = r["parity"]
    row.update(met=r["met"], budget_ms=r["budget_ms"], base_ms=r["base"]["latency_ms"]["median"],
               final_ms=r["final"]["latency_ms"]["median"], measured_candidates=r["search"]["measured_candidates"],
               macs_ratio=r["final"]["macs"] / r["base"]["macs"], groups=len(r["widths"]),
               excluded_groups=r["excluded_groups"], parity_rel_error=parity["rel_error"],
               parity_per_output=parity.get("per_output") or {}, timings_s=r.get("timings_s"))
    base_out, pruned_out = outputs(work / "base.onnx"), outputs(released)
    row["outputs"] = pruned_out
    row["outputs_equal"] = base_out == pruned_out
    factor = float(budget.rstrip("x"))
    times = {"base": [], "pruned": []}
    for _ in range(passes):  # interleaved: this machine's drift falls on both alike
        times["base"].append(time_once(work / "base.onnx"))
        times["pruned"].append(time_once(released))
    base_ms, pruned_ms = float(np.median(times["base"])), float(np.median(times["pruned"]))
    row.update(remeasured_base_ms=base_ms, remeasured_final_ms=pruned_ms, remeasured_passes=times,
               remeasured_ratio=pruned_ms / (factor * base_ms), remeasured_over_build_budget=pruned_ms / r["budget_ms"])
    row["within_band"] = LOW <= row["remeasured_ratio"] <= HIGH
    return row


def markdown(rows: list[dict]) -> str:
    lines = table(["model", "input", "groups (excluded)", "exit", "build: final / budget ms",
                   "re-measured: base -> final ms", "final / (budget x base)", "parity (worst output)", "outputs equal",
                   "build s"], [])
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['input_shape']} | | {r.get('exit_code', '')} | {r['error'][:80]} |"
                         " | | | | |")
            continue
        worst = max([r["parity_rel_error"], *r["parity_per_output"].values()])
        lines.append(f"| {r['model']} | {r['input_shape'].split(',', 1)[1].replace(',', 'x')} | {r['groups']} "
                     f"({len(r['excluded_groups'])}) | {r['exit_code']} | {r['final_ms']:.1f} / {r['budget_ms']:.1f} | "
                     f"{r['remeasured_base_ms']:.1f} -> {r['remeasured_final_ms']:.1f} | "
                     f"{r['remeasured_ratio']:.3f} | {worst:.1e} | {'yes' if r['outputs_equal'] else 'NO'} | "
                     f"{r['wall_s']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--budget", default="0.7x")
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--work", default="bench/families-work")
    ap.add_argument("--out", default="bench/families.json")
    args = ap.parse_args()
    names = [m for m in args.models.split(",") if m]
    unknown = [m for m in names if m not in MODELS]
    if unknown:
        raise SystemExit(f"unknown models {unknown}; known: {', '.join(MODELS)}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in names:
        print(f"{name} ...", file=sys.stderr, flush=True)
        rows.append(bench_model(name, args.budget, args.passes, Path(args.work).resolve() / name))
        print(json.dumps({k: v for k, v in rows[-1].items() if k not in ("timings_s", "excluded_groups")}),
              file=sys.stderr, flush=True)
        out.write_text(json.dumps({"rows": rows, "budget": args.budget, "band": [LOW, HIGH]}, indent=1))
    out.with_suffix(".md").write_text(markdown(rows) + "\n")
    print(markdown(rows))


if __name__ == "__main__":
    main()
