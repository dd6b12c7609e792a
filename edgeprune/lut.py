"""Latency lookup tables: per-layer latencies measured on a target, so a search can run away from the device.

    table = build_lut(loaded, graph, target, "lut.json")          # on (or through) the device; resumable
    model = LayerModel.from_model(loaded, graph)                  # each layer's widths as a function of the plan
    predict(table, model, widths)                                 # predicted latency of a plan, ms

A layer is a conv or linear with what follows it fused by the runtime (bias from the folded BN, the activation), at
its real input resolution, stride and groups. Its entry is a grid over (input, output) widths: multiples of the
target's channel multiple up to the layer's width, plus a few unaligned widths that show the staircase. A model's
latency is a + b·(sum of its layers' entries), with a and b fitted on eight measured plans of that model (per-run
overhead, pooling, adds and the difference between a layer alone and inside a model). Entries are keyed by signature, so tables for several models on one target merge.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from edgeprune.atomic import atomic_write_text, check_output_file
from edgeprune.errors import EdgePruneError
from edgeprune.graph import Graph, is_depthwise
from edgeprune.targets import Target

log = logging.getLogger(__name__)

LUT_FORMAT = "edgeprune.lut/1"
ACTIVATIONS = {nn.ReLU: "Relu", nn.ReLU6: "Clip6", nn.Hardswish: "HardSwish", nn.SiLU: "Sigmoid*", nn.Hardsigmoid: "HardSigmoid"}


@dataclass(frozen=True)
class Layer:
    """One conv or linear of a model, and how its widths follow the plan."""

    name: str
    signature: str  # kind, kernel, stride, padding, dilation, depthwise, input size, activation: no widths
    cin: int
    cout: int
    in_groups: tuple[tuple[str, int], ...]  # (group, input channels per group channel) read by this layer
    out_group: str | None  # the group its output channels belong to
    depthwise: bool
    spec: dict[str, Any]  # what build_layer_onnx needs

    def widths(self, w: dict[str, int], channels: dict[str, int]) -> tuple[int, int]:
        if self.depthwise:
            c = w.get(self.out_group, self.cout) if self.out_group else self.cout
            return c, c
        cin = self.cin - sum((channels[g] - w.get(g, channels[g])) * per for g, per in self.in_groups)
        cout = w.get(self.out_group, self.cout) if self.out_group else self.cout
        return cin, cout


@dataclass
class LayerModel:
    """The layers of one model, with the group widths of the unpruned model."""

    model: str
    layers: list[Layer]
    channels: dict[str, int]

    @classmethod
    def from_model(cls, model: nn.Module, example_input: Any, graph: Graph, spec: str = "") -> LayerModel:
        import torch

        modules = dict(model.named_modules())
        shapes: dict[str, tuple[int, ...]] = {}
        handles = [m.register_forward_pre_hook(lambda mod, a, n=n: shapes.__setitem__(n, tuple(a[0].shape)))
                   for n, m in modules.items() if isinstance(m, (nn.Conv2d, nn.Linear))]
        with torch.no_grad():
            model(example_input)
        for h in handles:
            h.remove()
        out_group, in_groups = {}, {}
        for g in graph.groups:
            for p in g.producers:
                out_group[p] = g.name
            for mem in g.members:
                if is_depthwise(modules[mem]):
                    out_group[mem] = g.name
            for c in g.consumers:
                per = len(c.coords[0]) // (modules[c.module].kernel_size[0] * modules[c.module].kernel_size[1]) \
                    if isinstance(modules[c.module], nn.Conv2d) else len(c.coords[0])
                in_groups.setdefault(c.module, []).append((g.name, per))
        nxt = _following_activation(model)
        layers = []
        for n, m in modules.items():
            if not isinstance(m, (nn.Conv2d, nn.Linear)) or n not in shapes:
                continue
            act = nxt.get(n, "none")
            shape = shapes[n]
            if isinstance(m, nn.Conv2d):
                dw = is_depthwise(m)
                if m.groups > 1 and not dw:
                    kind = f"gconv{m.groups}"
                else:
                    kind = "dwconv" if dw else "conv"
                lspec = {"kind": kind, "k": list(m.kernel_size), "s": list(m.stride), "p": list(m.padding)
                        if not isinstance(m.padding, str) else [0, 0], "d": list(m.dilation), "hw": list(shape[2:]),
                        "groups": m.groups, "act": act}
                cin, cout = m.in_channels, m.out_channels
            else:
                kind = "linear"
                lspec = {"kind": kind, "rows": int(np.prod(shape[:-1])), "act": act}
                cin, cout = m.in_features, m.out_features
            sig = json.dumps(lspec, sort_keys=True, separators=(",", ":"))
            layers.append(Layer(name=n, signature=sig, cin=cin, cout=cout, in_groups=tuple(in_groups.get(n, ())),
                                out_group=out_group.get(n), depthwise=lspec["kind"] == "dwconv", spec=lspec))
        return cls(model=spec, layers=layers, channels={g.name: g.channels for g in graph.groups})

    def full(self) -> dict[str, int]:
        return dict(self.channels)


def _following_activation(model: nn.Module) -> dict[str, str]:
    """Activation module that directly follows each conv/linear (through a BatchNorm) in module order: a heuristic
    good for Sequential-style blocks; functional activations are covered by the calibrated remainder."""
    names = list(model.named_modules())
    out = {}
    for i, (n, m) in enumerate(names):
        if not isinstance(m, (nn.Conv2d, nn.Linear)):
            continue
        for n2, m2 in names[i + 1:i + 3]:
            if isinstance(m2, nn.modules.batchnorm._BatchNorm):
                continue
            for cls, name in ACTIVATIONS.items():
                if isinstance(m2, cls):
                    out[n] = name
            break
    return out


# ---------------------------------------------------------------- micro-models


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
        groups = cin if spec["kind"] == "dwconv" else int(spec.get("groups", 1))
        if spec["kind"] == "dwconv":
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


# ---------------------------------------------------------------- the table


@dataclass
class LatencyTable:
    meta: dict[str, Any]
    entries: dict[str, dict[str, Any]]  # signature -> {"cin": [...], "cout": [...], "ms": [[...]]}
    models: dict[str, dict[str, Any]]  # model spec -> {"base_ms", "layers_full_ms", "remainder_ms"}

    def digest(self) -> str:
        return entries_digest(self.entries, self.models)

    def to_dict(self) -> dict[str, Any]:
        return {"format": LUT_FORMAT, "meta": {**self.meta, "digest": self.digest()}, "entries": self.entries,
                "models": self.models}

    def save(self, path: str | Path) -> None:
        atomic_write_text(path, json.dumps(self.to_dict()))


def entries_digest(entries: dict[str, Any], models: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps([entries, models], sort_keys=True).encode()).hexdigest()


def table_meta(target: Target) -> dict[str, Any]:
    from edgeprune.runtimes import runtime_for
    from edgeprune.versions import versions

    mod = runtime_for(target)
    return {"target": target.name, "fingerprint": target.fingerprint(), "runtime": target.runtime,
            "runtime_version": (mod.version(target) if target.remote is not None else mod.version()) or "unknown",
            "precision": target.precision, "channel_multiple": target.channel_multiple,
            "versions": versions(target.runtime)}


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


def load_lut(path: str | Path) -> LatencyTable:
    """Read and check a table; truncated, malformed or hand-edited files are refused."""
    if Path(path).is_dir():
        raise EdgePruneError(f"latency table {path} is a folder; give the .json file `edgeprune lut --out` wrote")
    try:
        d = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise EdgePruneError(f"latency table {path} does not exist; make one with `edgeprune lut`") from None
    except (ValueError, OSError) as e:
        raise EdgePruneError(f"latency table {path} is not valid JSON (truncated?): {str(e)[:120]}; measure it "
                             f"again from the start with `edgeprune lut ... --out {path} --fresh`") from None
    if not isinstance(d, dict) or d.get("format") != LUT_FORMAT:
        raise EdgePruneError(f"{path} is not an edgeprune latency table (format {LUT_FORMAT})")
    try:
        table = LatencyTable(meta=dict(d["meta"]), entries=dict(d["entries"]), models=dict(d["models"]))
        for sig, e in table.entries.items():
            _check_entry(sig, e)
        for spec, m in table.models.items():
            _check_model(spec, m)
    except (KeyError, TypeError, ValueError) as e:
        raise EdgePruneError(f"latency table {path} is malformed ({e}); measure it again with `edgeprune lut ... "
                             f"--out {path} --fresh`") from None
    if table.meta.get("digest") != table.digest():
        raise EdgePruneError(f"latency table {path} was modified after it was measured (digest mismatch); rebuild "
                             f"it with `edgeprune lut`")
    return table


def _widths_ok(ws: Any) -> bool:
    return isinstance(ws, list) and bool(ws) and all(type(w) is int and w > 0 for w in ws) and ws == sorted(set(ws))


def _ms_ok(values: Any) -> bool:
    return all(type(v) in (int, float) and math.isfinite(v) and v > 0 for v in values)


def _check_entry(sig: str, e: Any) -> None:
    """Every value a prediction reads, with its type: the digest is unkeyed, so a table edited and re-digested by
    hand must still fail here rather than deep inside a search."""
    where = f"entry {sig[:60]}"
    if not isinstance(e, dict) or not _widths_ok(e.get("cin")) or not _widths_ok(e.get("cout")):
        raise ValueError(f"{where}: cin and cout must be increasing lists of positive integers")
    ms = e.get("ms")
    if not (isinstance(ms, list) and len(ms) == len(e["cin"]) and all(isinstance(r, list) and len(r) == len(e["cout"])
                                                                      and _ms_ok(r) for r in ms)):
        raise ValueError(f"{where} has a malformed grid (ms must be cin x cout positive numbers)")
    stairs = e.get("stairs")
    if stairs is not None and not (isinstance(stairs, dict) and _widths_ok(stairs.get("cout"))
                                   and isinstance(stairs.get("ms"), list) and len(stairs["ms"]) == len(stairs["cout"])
                                   and _ms_ok(stairs["ms"])):
        raise ValueError(f"{where} has malformed stairs")


def _check_model(spec: str, m: Any) -> None:
    def number(v: Any) -> bool:
        return type(v) in (int, float) and math.isfinite(v)

    where = f"model {spec[:60]}"
    if not isinstance(m, dict) or not all(number(m.get(k)) for k in ("offset_ms", "scale", "base_ms")):
        raise ValueError(f"{where}: offset_ms, scale and base_ms must be numbers")
    if m["base_ms"] <= 0:
        raise ValueError(f"{where}: base_ms must be positive")
    cal = m.get("calibration", [])
    if not isinstance(cal, list) or not all(isinstance(c, dict) and number(c.get("layers_ms"))
                                            and number(c.get("measured_ms")) for c in cal):
        raise ValueError(f"{where}: calibration must be a list of layers_ms / measured_ms numbers")


def check_table_for(table: LatencyTable, target: Target, force: bool = False, path: str = "the table") -> list[str]:
    """Refuse a table made for another target, precision or runtime version (`force` downgrades to warnings)."""
    meta = table_meta(target)
    problems = [f"{k} is {table.meta.get(k)!r} in {path} but {meta[k]!r} here"
                for k in ("target", "fingerprint", "runtime", "precision", "runtime_version")
                if table.meta.get(k) != meta[k]]
    if problems and not force:
        raise EdgePruneError(f"latency table {path} does not match target {target.name}: {'; '.join(problems)}; "
                             f"make a table on this target with `edgeprune lut`, or pass --force-lut to use it anyway")
    for p in problems:
        log.warning("using a mismatched latency table: %s", p)
    return problems


def _interp(xs: list[int], x: float) -> tuple[int, int, float]:
    """Indices and weight to interpolate at x (clamped to the grid)."""
    if x <= xs[0]:
        return 0, 0, 0.0
    if x >= xs[-1]:
        return len(xs) - 1, len(xs) - 1, 0.0
    j = int(np.searchsorted(xs, x))
    if xs[j] == x:
        return j, j, 0.0
    return j - 1, j, (x - xs[j - 1]) / (xs[j] - xs[j - 1])


def entry_latency(entry: dict[str, Any], cin: int, cout: int) -> tuple[float, bool]:
    """Bilinear interpolation in (cin, cout); exact at grid points. Returns (ms, inside the grid)."""
    ci, co = entry["cin"], entry["cout"]
    ms = entry["ms"]
    inside = ci[0] <= cin <= ci[-1] and co[0] <= cout <= co[-1]
    i0, i1, a = _interp(ci, cin)
    j0, j1, b = _interp(co, cout)
    v = (1 - a) * (1 - b) * ms[i0][j0] + a * (1 - b) * ms[i1][j0] + (1 - a) * b * ms[i0][j1] + a * b * ms[i1][j1]
    return float(v), inside


def predict(table: LatencyTable, model: LayerModel, widths: dict[str, int]) -> tuple[float, list[str]]:
    """Predicted latency of a model at `widths` (ms), and warnings for layers outside the table."""
    if model.model not in table.models:
        raise EdgePruneError(f"the latency table has no calibration for model {model.model!r} (it has: "
                             f"{', '.join(table.models) or 'none'}); run `edgeprune lut --model {model.model}`")
    warnings = []
    total = 0.0
    for layer in model.layers:
        entry = table.entries.get(layer.signature)
        if entry is None:
            raise EdgePruneError(f"the latency table has no entry for layer {layer.name}; rebuild it for this model")
        cin, cout = layer.widths(widths, model.channels)
        v, inside = entry_latency(entry, cin, cout)
        if not inside:
            warnings.append(f"{layer.name} at ({cin}, {cout}) is outside the table's grid")
        total += v
    cal = table.models[model.model]
    pred = cal["offset_ms"] + cal["scale"] * total
    if pred <= 0 or cal["scale"] <= 0:  # a fit that noise made meaningless here (tables made before fit_calibration)
        pred = _proportional_scale([c["layers_ms"] for c in cal.get("calibration", [])],
                                   [c["measured_ms"] for c in cal.get("calibration", [])]) * total
    return pred, warnings


def fit_calibration(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """(offset, scale) of latency ≈ offset + scale·Σentries, by least squares over the calibration plans.

    On a sub-millisecond model the noise can tilt the line flat or negative, or push its offset so far down that the
    most pruned plans would be predicted at zero or below: the fit then falls back to a proportional scale (offset 0,
    the median ratio of measured to summed latency), which keeps every prediction positive and ordered like the sums.
    """
    if len(set(xs)) < 2:
        return 0.0, _proportional_scale(xs, ys)
    slope, offset = np.polyfit(np.asarray(xs), np.asarray(ys), 1)
    if slope <= 0 or offset + slope * min(xs) <= 0.5 * min(ys):
        return 0.0, _proportional_scale(xs, ys)
    return float(offset), float(slope)


def _proportional_scale(xs: list[float], ys: list[float]) -> float:
    ratios = [y / x for x, y in zip(xs, ys) if x > 0 and y > 0]
    return float(np.median(ratios)) if ratios else 1.0


def stair_widths(layer: Layer, multiple: int) -> list[int]:
    """Output widths from 2m - m/2 to 4m in steps of m/4 (at least 1), for layers whose output width is prunable."""
    if layer.depthwise or not layer.out_group or multiple < 4 or layer.cout < 4 * multiple:
        return []
    step = max(1, multiple // 4)
    return list(range(2 * multiple - multiple // 2, 4 * multiple + 1, step))


def _layer_points(layer: Layer, multiple: int) -> tuple[list[int], list[int]]:
    if layer.depthwise:
        ws = grid_widths(layer.cin, multiple)
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
    from edgeprune.plan import round_width

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
              repeats: int = ENTRY_SESSIONS) -> LatencyTable:
    """Measure every layer signature of `model` on `target` and calibrate the model; merges into `out`.

    `measure_widths(widths) -> ms` measures the whole model pruned to `widths` on the target (8 calls). Layers
    measured alone carry per-run costs (session overhead, input and output copies) that do not shrink with width, so
    the model's latency is fitted as a + b·Σ entries by least squares on those plans. Interrupted runs resume:
    the table is saved after each signature, and measured signatures are skipped.
    """
    import dataclasses
    import tempfile

    from edgeprune.runtimes import measure

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
    done = 0
    with tempfile.TemporaryDirectory(prefix="edgeprune-lut-") as tmp:
        for sig, layer in todo.items():
            cins, couts = _layer_points(layer, target.channel_multiple)
            grid = np.zeros((len(cins), len(couts)))
            for i, ci in enumerate(cins):
                for j, co in enumerate(couts):
                    path = build_layer_onnx(layer.spec, ci, co, Path(tmp) / "layer.onnx")
                    grid[i, j] = measure(path, quick, cache=None, repeats=repeats).median
                    done += 1
                    if progress is not None:
                        progress(done, total)
            entry = {"cin": cins, "cout": couts, "ms": grid.tolist(), "example": layer.name}
            stairs = stair_widths(layer, target.channel_multiple)
            if stairs:  # unaligned output widths around a multiple, at full input width: the staircase
                entry["stairs"] = {"cout": stairs, "ms": [
                    measure(build_layer_onnx(layer.spec, cins[-1], w, Path(tmp) / "layer.onnx"), quick, cache=None,
                            repeats=repeats).median for w in stairs]}
            table.entries[sig] = entry
            table.save(out)  # resumable
        xs, ys = [], []
        for widths in calibration_widths(model, target.channel_multiple):
            xs.append(sum(entry_latency(table.entries[ly.signature], *ly.widths(widths, model.channels))[0]
                          for ly in model.layers))
            ys.append(measure_widths(widths))
        offset, slope = fit_calibration(xs, ys)
        table.models[model.model] = {"offset_ms": offset, "scale": slope, "base_ms": ys[0],
                                     "calibration": [{"layers_ms": x, "measured_ms": y} for x, y in zip(xs, ys)],
                                     "layers": len(model.layers)}
        table.meta = meta
        table.save(out)
    return table


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
