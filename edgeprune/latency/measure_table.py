"""Measuring a latency table on a target: one-layer ONNX models over a grid of widths, and the whole model at a few
plans to calibrate the sum of its layers' entries (`lut` describes the table).

    model = LayerModel.from_model(module, example_input, graph, spec)
    table = build_lut(model, target, "lut.json", measure_widths)       # on (or through) the device; resumable
    best_channel_multiple(table)["best"]                                # what the target's channel_multiple should be
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from edgeprune.common.atomic import check_output_file
from edgeprune.common.parallel import thread_map
from edgeprune.errors import EdgePruneError
from edgeprune.inputs.targets import Target
from edgeprune.latency.table import (LUT_FORMAT, LatencyTable, Layer, LayerModel, check_table_for, entry_latency,
                                     fit_calibration, load_lut, model_key, table_meta)
from edgeprune.plan import round_width
from edgeprune.runtimes import LatencyStats, measure


def build_layer_onnx(spec: dict[str, Any], cin: int, cout: int, path: Path) -> Path:
    """A one-layer ONNX model for `spec` at widths (cin, cout): Conv or Gemm with bias (a folded BN) and activation."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, inits = [], []
    if spec["kind"] == "linear":
        x_shape = [spec["rows"], cin]
        w = rng.standard_normal((cout, cin)).astype(np.float32) * 0.05
        inits += [numpy_helper.from_array(w, "W"), numpy_helper.from_array(np.zeros(cout, np.float32), "B")]
        nodes.append(helper.make_node("Gemm", ["x", "W", "B"], ["y0"], transB=1))
        y_shape = [spec["rows"], cout]
    else:
        groups = cin if spec["kind"] == "dwconv" else cin // spec["group_width"] if spec["kind"] == "gconv" else 1
        if spec["kind"] in ("dwconv", "gconv"):
            cout = cin
        kh, kw = spec["k"]
        w = rng.standard_normal((cout, cin // groups, kh, kw)).astype(np.float32) * 0.05
        inits += [numpy_helper.from_array(w, "W"), numpy_helper.from_array(np.zeros(cout, np.float32), "B")]
        (ph, pw), (sh, sw), (dh, dw) = spec["p"], spec["s"], spec["d"]
        nodes.append(helper.make_node("Conv", ["x", "W", "B"], ["y0"], kernel_shape=[kh, kw], strides=[sh, sw],
                                      pads=[ph, pw, ph, pw], dilations=[dh, dw], group=groups))
        h, wd = spec["hw"]
        ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
        wo = (wd + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        x_shape, y_shape = [1, cin, h, wd], [1, cout, ho, wo]
    act = spec.get("act", "none")
    last = "y0"
    if act == "Relu":
        nodes.append(helper.make_node("Relu", [last], ["y"]))
    elif act == "Clip6":
        inits += [numpy_helper.from_array(np.array(0, np.float32), "lo"), numpy_helper.from_array(np.array(6, np.float32), "hi")]
        nodes.append(helper.make_node("Clip", [last, "lo", "hi"], ["y"]))
    elif act in ("HardSwish", "HardSigmoid"):
        nodes.append(helper.make_node(act, [last], ["y"]))
    elif act == "Sigmoid*":  # SiLU = x * sigmoid(x)
        nodes += [helper.make_node("Sigmoid", [last], ["sg"]), helper.make_node("Mul", [last, "sg"], ["y"])]
    else:
        nodes.append(helper.make_node("Identity", [last], ["y"]))
    graph = helper.make_graph(nodes, "layer", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save(model, str(path))
    return path


def grid_widths(c: int, multiple: int, points: int = 6) -> list[int]:
    """Widths measured for a dimension of width c: about `points` multiples spread over [multiple, c], c itself, and
    a few unaligned widths (multiple ± a few) that reveal the staircase."""
    ws = {c}
    if c <= multiple:
        return [c]
    steps = max(1, c // multiple)
    for i in range(points):
        ws.add(min(c, max(multiple, int(round(steps * (i + 1) / points)) * multiple)))
    ws.add(multiple)
    return sorted(ws)


def check_lut_out(out: Path, resume: bool) -> None:
    """Before `edgeprune lut` measures anything: `out` must be a table file (or new) in a folder that takes files.
    With --fresh an existing file is replaced only if it is (or starts like) a table."""
    if out.is_dir():
        raise EdgePruneError(f"latency table {out} is a folder; give a file name such as {out / 'lut.json'}")
    if out.exists() and not resume:
        try:
            with open(out, "rb") as f:
                head = f.read(64)
        except OSError as e:
            raise EdgePruneError(f"cannot read latency table {out}: {e.strerror}") from None
        if not head.replace(b" ", b"").startswith(b'{"format":"' + LUT_FORMAT.encode()):
            raise EdgePruneError(f"{out} exists and is not an edgeprune latency table; --fresh replaces only a table: "
                                 f"choose another --out or remove that file")
    check_output_file(out, (".json",), force=True, flag="--out")


def stair_widths(layer: Layer, multiple: int) -> list[int]:
    """Output widths from 2m - m/2 to 4m in steps of m/4 (at least 1), for layers whose output width is prunable."""
    if layer.depthwise or not layer.out_group or multiple < 4 or layer.cout < 4 * multiple:
        return []
    step = max(1, multiple // 4)
    return list(range(2 * multiple - multiple // 2, 4 * multiple + 1, step))


def _layer_points(layer: Layer, multiple: int) -> tuple[list[int], list[int]]:
    if layer.depthwise:
        per = layer.spec.get("group_width", 1)  # a grouped conv's widths are whole groups
        ws = [w for w in grid_widths(layer.cin, math.lcm(multiple, per)) if w % per == 0]
        return ws, [ws[-1]]
    cins = grid_widths(layer.cin, multiple) if layer.in_groups else [layer.cin]
    couts = grid_widths(layer.cout, multiple) if layer.out_group else [layer.cout]
    return cins, couts


CALIBRATION_RANDOM = 6  # seeded random plans measured to calibrate a model, besides its full and minimum widths


def calibration_widths(model: LayerModel, multiple: int, seed: int = 0,
                       random_plans: int = CALIBRATION_RANDOM) -> list[dict[str, int]]:
    """Plans measured to calibrate a model's entries: full widths, minimum widths and seeded random ones.

    Eight plans, each timed over the target's `final_repeats` sessions: on a CPU whose single measurements of a
    mobilenet_v2 plan scatter by ~9% (two passes over the same 70 plans, measured), four plans of three sessions left
    the fitted scale off by several percent for every prediction.
    """
    rng = np.random.default_rng(seed)
    full = model.full()
    lows = {g: min(c, multiple) for g, c in full.items()}
    rand = [{g: round_width(c * rng.uniform(0.25, 0.9), c, multiple) for g, c in full.items()}
            for _ in range(random_plans)]
    return [full, lows, *rand]


# Sessions per table entry: one session of a micro-model scatters by ~10% on a CPU (fresh sessions land in fast or
# slow states), and a model's prediction sums a few dominant entries, so that noise does not average away.
ENTRY_SESSIONS = 3


def build_lut(model: LayerModel, target: Target, out: str | Path, measure_widths: Callable[[dict[str, int]], float],
              resume: bool = True, progress: Callable[[int, int], None] | None = None,
              repeats: int = ENTRY_SESSIONS, measure_fn: Callable[..., LatencyStats] | None = None,
              workers: int = 1) -> LatencyTable:
    """Measure every layer signature of `model` on `target` and calibrate the model; merges into `out`.

    `measure_widths(widths) -> ms` measures the whole model pruned to `widths` on the target (8 calls). Layers
    measured alone carry per-run costs (session overhead, input and output copies) that do not shrink with width, so
    the model's latency is fitted as a + b·Σ entries by least squares on those plans. Interrupted runs resume:
    the table is saved after each signature, and measured signatures are skipped. `measure_fn` replaces
    `runtimes.measure`; `workers` signatures are measured at once (`edgeprune lut --devices`: one per board of the
    kind, each measurement on a free board, so that the table's entries are split across the boards).
    """
    measure_fn = measure_fn or measure
    out = Path(out)
    meta = table_meta(target)
    if resume and out.exists():
        table = load_lut(out)
        check_table_for(table, target, path=str(out))
    else:
        table = LatencyTable(meta=meta, entries={}, models={})
    quick = dataclasses.replace(target, measure=dataclasses.replace(
        target.measure, warmup=max(3, target.measure.warmup // 2), iterations=max(10, target.measure.iterations // 2)))
    todo: dict[str, Layer] = {}
    for layer in model.layers:
        if layer.signature not in table.entries:
            old = todo.get(layer.signature)
            if old is None or (layer.cin, layer.cout) > (old.cin, old.cout):
                todo[layer.signature] = layer
    total = sum(len(a) * len(b) for a, b in (_layer_points(layer, target.channel_multiple) for layer in todo.values()))
    done = [0]
    lock = threading.Lock()

    def tick() -> None:
        with lock:
            done[0] += 1
            if progress is not None:
                progress(done[0], total)

    with tempfile.TemporaryDirectory(prefix="edgeprune-lut-") as tmp:
        def one(item: tuple[int, tuple[str, Layer]]) -> None:
            i, (sig, layer) = item
            entry = _measure_entry(layer, quick, Path(tmp) / f"layer{i}.onnx", measure_fn, repeats, tick)
            with lock:
                table.entries[sig] = entry
                table.save(out)  # resumable

        thread_map(one, list(enumerate(todo.items())), workers)
        xs, ys = [], []
        for widths in calibration_widths(model, target.channel_multiple):
            xs.append(sum(entry_latency(table.entries[ly.signature], *ly.widths(widths, model.channels))[0]
                          for ly in model.layers))
            ys.append(measure_widths(widths))
        offset, slope = fit_calibration(xs, ys)
        for old in [k for k in table.models if k != model.model and model_key(k) == model.model]:
            del table.models[old]  # the same model filed under another spelling of its file's path
        table.models[model.model] = {"offset_ms": offset, "scale": slope, "base_ms": ys[0],
                                     "calibration": [{"layers_ms": x, "measured_ms": y} for x, y in zip(xs, ys)],
                                     "layers": len(model.layers)}
        table.meta = meta
        table.save(out)
    return table


def _measure_entry(layer: Layer, target: Target, path: Path, measure_fn: Callable[..., LatencyStats], repeats: int,
                   tick: Callable[[], None]) -> dict[str, Any]:
    """A layer signature's table entry: its grid of widths measured on `target`, and the staircase sweep."""
    cins, couts = _layer_points(layer, target.channel_multiple)
    grid = np.zeros((len(cins), len(couts)))
    for i, ci in enumerate(cins):
        for j, co in enumerate(couts):
            grid[i, j] = measure_fn(build_layer_onnx(layer.spec, ci, co, path), target, cache=None,
                                    repeats=repeats).median
            tick()
    entry = {"cin": cins, "cout": couts, "ms": grid.tolist(), "example": layer.name}
    stairs = stair_widths(layer, target.channel_multiple)
    if stairs:  # unaligned output widths around a multiple, at full input width: the staircase
        entry["stairs"] = {"cout": stairs, "ms": [
            measure_fn(build_layer_onnx(layer.spec, cins[-1], w, path), target, cache=None, repeats=repeats).median
            for w in stairs]}
    return entry


def best_channel_multiple(table: LatencyTable, candidates: tuple[int, ...] = (4, 8, 16, 32)) -> dict[str, Any]:
    """The largest multiple M for which a width between multiples of M is rarely faster than the next multiple up
    (from the unaligned "stairs" sweeps): rounding widths up to M then costs (almost) nothing, so M is what the
    target's channel_multiple should say."""
    scores: dict[int, float | None] = {}
    for m in candidates:
        checks = ok = 0
        for e in table.entries.values():
            st = e.get("stairs")
            if not st:
                continue
            ws, ms = st["cout"], st["ms"]
            for k, w in enumerate(ws):
                if w % m == 0:
                    continue
                up = next((j for j, w2 in enumerate(ws) if w2 > w and w2 % m == 0), None)
                if up is None:
                    continue
                checks += 1
                ok += ms[up] <= ms[k] * 1.05
        scores[m] = ok / checks if checks else None
    usable = [m for m in candidates if scores[m] is not None and scores[m] >= 0.8]
    return {"best": max(usable) if usable else None, "scores": scores}


def plot_lut(table: LatencyTable, path: Path) -> str | None:
    """Latency against output width (at full input width) per signature, with the unaligned stairs; None without
    matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        import logging

        from edgeprune.common.resources import install_hint

        logging.getLogger(__name__).warning("%s not written: the plot needs matplotlib, which is not installed: %s",
                                            path.name, install_hint("report"))
        return None
    entries = [e for e in table.entries.values() if len(e["cout"]) > 1]
    if not entries:
        return None
    cols = min(4, len(entries))
    rows = math.ceil(len(entries) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
    for ax, e in zip(axes.ravel(), entries):
        ax.plot(e["cout"], np.asarray(e["ms"])[-1], "o-", label="grid (multiples)")
        if e.get("stairs"):
            ax.plot(e["stairs"]["cout"], e["stairs"]["ms"], ".", color="red", label="unaligned")
        ax.set_title(e.get("example", "")[:28], fontsize=7)
        ax.set_xlabel("output channels", fontsize=7)
        ax.set_ylabel("ms", fontsize=7)
        ax.tick_params(labelsize=6)
    for ax in axes.ravel()[len(entries):]:
        ax.axis("off")
    axes.ravel()[0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path)
