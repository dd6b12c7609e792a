"""Which channel multiple an int8 target should round widths to: a quantised 3x3 conv's latency against its channel
count, measured on the target as edgeprune measures (runtimes.measure: the conv quantised by quantize.py, timed in
fresh ONNX Runtime sessions).

    taskset -c 1 python -m tools.int8_channels [--device cpu-int8] [--widths 8-128] [--hw 16]
                                               [--out bench/int8_channels.json]

For every multiple M in 4, 8, 16, 32: the share of widths between multiples of M that are no faster (within 5%) than
the next multiple up, as `edgeprune lut` scores its stairs (lookupbuild.best_channel_multiple). The largest M scoring
at least 0.8 is the channel multiple to put in the target: rounding a width up to it costs (almost) nothing. The fp32
figures of the same convs (the float variant of the target) are printed beside for comparison. Do not run it beside
the test suite; pin it to one core.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgeprune import __version__
from edgeprune.inputs.targets import float_target, load_target
from edgeprune.runtimes import measure

MULTIPLES = (4, 8, 16, 32)


def conv_model(width: int, hw: int, path: Path) -> Path:
    """width -> width channels, 3x3, padding 1, then ReLU (what a pruned block's conv is), random weights."""
    rng = np.random.default_rng(width)
    w = (rng.standard_normal((width, width, 3, 3)) / np.sqrt(9 * width)).astype(np.float32)
    b = rng.standard_normal(width).astype(np.float32) * 0.1
    graph = helper.make_graph(
        [helper.make_node("Conv", ["input", "w", "b"], ["y"], pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
         helper.make_node("Relu", ["y"], ["output"])],
        "conv", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, width, hw, hw])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, width, hw, hw])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.save(model, str(path))
    return path


def scores(widths: list[int], ms: list[float]) -> dict[int, float | None]:
    """Per multiple: the share of unaligned widths no faster than the next aligned width up (5% slack)."""
    out: dict[int, float | None] = {}
    for m in MULTIPLES:
        checks = ok = 0
        for k, w in enumerate(widths):
            if w % m == 0:
                continue
            up = next((j for j, w2 in enumerate(widths) if w2 > w and w2 % m == 0), None)
            if up is None:
                continue
            checks += 1
            ok += ms[up] <= ms[k] * 1.05
        out[m] = ok / checks if checks else None
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu-int8", help="an int8 target (default cpu-int8)")
    ap.add_argument("--widths", default="8-128", help="FIRST-LAST channel counts, every one (default 8-128)")
    ap.add_argument("--hw", type=int, default=16, help="input height and width (default 16)")
    ap.add_argument("--repeats", type=int, default=5, help="fresh sessions per figure (default 5)")
    ap.add_argument("--out", default="bench/int8_channels.json")
    args = ap.parse_args()
    target = load_target(args.device)
    if target.precision != "int8":
        raise SystemExit(f"{target.name} is {target.precision}; give an int8 target")
    first, last = (int(v) for v in args.widths.split("-"))
    widths = list(range(first, last + 1))
    rows = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for w in widths:
            path = conv_model(w, args.hw, Path(tmp) / f"conv{w}.onnx")
            q = measure(path, target, cache=None, repeats=args.repeats).median
            f = measure(path, float_target(target), cache=None, repeats=args.repeats).median
            rows.append({"width": w, "int8_ms": q, "fp32_ms": f})
            print(f"{w:4d}  int8 {q:.4f} ms  fp32 {f:.4f} ms", flush=True)
    int8 = scores(widths, [r["int8_ms"] for r in rows])
    fp32 = scores(widths, [r["fp32_ms"] for r in rows])
    usable = [m for m in MULTIPLES if int8[m] is not None and int8[m] >= 0.8]
    result = {"target": target.to_dict(), "hw": args.hw, "rows": rows, "int8_scores": int8, "fp32_scores": fp32,
              "best": max(usable) if usable else None, "seconds": time.perf_counter() - t0,
              "machine": platform.processor() or platform.machine(), "edgeprune": __version__}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print("share of unaligned widths no faster than the next multiple (int8 / fp32): " +
          ", ".join(f"{m}: {int8[m]:.2f} / {fp32[m]:.2f}" for m in MULTIPLES if int8[m] is not None))
    print(f"channel multiple for {target.name}: {result['best']}; wrote {args.out}")


if __name__ == "__main__":
    main()
