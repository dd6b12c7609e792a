"""Latency lookup tables: per-layer latencies measured on a target, so a search can run away from the device.

    model = LayerModel.from_model(module, example_input, graph, spec)   # each layer's widths as a function of the plan
    table = load_lut("lut.json"); check_table_for(table, target)       # refuses a table made for another target
    predict(table, model, widths)                                       # predicted latency of a plan, ms

A layer is a conv or linear with what follows it fused by the runtime (bias from the folded BN, the activation), at
its real input resolution, stride and groups. Its entry is a grid over (input, output) widths: multiples of the
target's channel multiple up to the layer's width, plus a few unaligned widths that show the staircase. A model's
latency is a + b·(sum of its layers' entries), with a and b fitted on eight measured plans of that model (per-run
overhead, pooling, adds and the difference between a layer alone and inside a model). Entries are keyed by signature,
so tables for several models on one target merge.

This module is the table itself and imports neither onnx nor onnxruntime; `lookupbuild` measures one on a device.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from edgeprune.common.atomic import atomic_write_text
from edgeprune.dependency.graph import Graph
from edgeprune.dependency.groupconv import is_depthwise, is_grouped
from edgeprune.dependency.shares import piece_widths
from edgeprune.errors import EdgePruneError
from edgeprune.inputs.targets import Target

log = logging.getLogger(__name__)

LUT_FORMAT = "edgeprune.lookup/1"
ACTIVATIONS = {nn.ReLU: "Relu", nn.ReLU6: "Clip6", nn.Hardswish: "HardSwish", nn.SiLU: "Sigmoid*", nn.Hardsigmoid: "HardSigmoid"}


@dataclass(frozen=True)
class PieceShare:
    """The pieces of a group that splits along channels cut (dependency/shares.py) one layer holds or reads (MixNet's
    depthwise conv of one piece, its projection conv reading two of four): the layer's width follows their share of
    the group's width, as the plan shares it out (`Group.piece_widths`), not the group's whole width."""

    group: str
    sizes: tuple[int, ...]  # every piece's original size
    pieces: tuple[int, ...]  # the pieces this layer holds or reads
    equal: bool
    multiple: int

    @property
    def full(self) -> int:
        return sum(self.sizes[k] for k in self.pieces)

    def kept(self, width: int) -> int:
        shares = piece_widths(self.sizes, width, self.multiple, self.equal)
        return sum(shares[k] for k in self.pieces)


@dataclass(frozen=True)
class Layer:
    """One conv or linear of a model, and how its widths follow the plan."""

    name: str
    signature: str  # kind, kernel, stride, padding, dilation, depthwise, input size, activation: no widths
    cin: int
    cout: int
    in_groups: tuple[tuple[str, int], ...]  # (group, input channels per group channel) read by this layer
    out_group: str | None  # the group its output channels belong to
    depthwise: bool  # input and output widths are both its group's: a depthwise conv, or a grouped conv (in units)
    spec: dict[str, Any]  # what build_layer_onnx needs
    shares: tuple[PieceShare, ...] = ()  # the groups of which it holds or reads some pieces only

    def held(self, group: str, w: dict[str, int], channels: dict[str, int]) -> tuple[int, int]:
        """The channels of `group` this layer holds or reads, unpruned and at widths `w`."""
        share = next((s for s in self.shares if s.group == group), None)
        if share is None:
            return channels[group], w.get(group, channels[group])
        return share.full, share.kept(w[group]) if group in w else share.full

    def widths(self, w: dict[str, int], channels: dict[str, int]) -> tuple[int, int]:
        if self.depthwise:
            c = self.held(self.out_group, w, channels)[1] if self.out_group and self.out_group in w else self.cout
            return c, c
        cin = self.cin - sum((full - kept) * per for g, per in self.in_groups
                             for full, kept in [self.held(g, w, channels)])
        cout = self.cout
        if self.out_group:  # a producer that makes several outputs per group channel (attention's q, k and v) keeps
            full, kept = self.held(self.out_group, w, channels)  # them all
            cout = kept * max(1, self.cout // full)
        return cin, cout


@dataclass
class LayerModel:
    """The layers of one model, with the group widths of the unpruned model."""

    model: str
    layers: list[Layer]
    channels: dict[str, int]

    @classmethod
    def from_model(cls, model: nn.Module, example_input: Any, graph: Graph, spec: str = "",
                   multiple: int = 1) -> LayerModel:
        """The layers of `model`; `multiple` is the channel multiple plans share a group's width over its split
        pieces at (`Group.piece_widths`)."""
        import torch

        modules = dict(model.named_modules())
        shapes: dict[str, tuple[int, ...]] = {}
        handles = [m.register_forward_pre_hook(lambda mod, a, n=n: shapes.__setitem__(n, tuple(a[0].shape)))
                   for n, m in modules.items() if isinstance(m, (nn.Conv2d, nn.Linear))]
        with torch.no_grad():
            model(example_input)
        for h in handles:
            h.remove()
        out_group, in_groups, shares = {}, {}, {}
        for g in graph.groups:
            for name, ks in g.parts:
                shares.setdefault(name, []).append(PieceShare(g.name, tuple(len(p) for p in g.pieces), ks, g.equal,
                                                              multiple))
            for p in g.producers:
                out_group[p] = g.name
            for mem in g.members:
                if is_depthwise(modules[mem]) or is_grouped(modules[mem]):
                    out_group[mem] = g.name
            for c in g.consumers:
                most = max(len(x) for x in c.coords)  # a consumer of some pieces reads no coordinate of the rest
                per = most // (modules[c.module].kernel_size[0] * modules[c.module].kernel_size[1]) \
                    if isinstance(modules[c.module], nn.Conv2d) else most
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
                kind = "gconv" if is_grouped(m) else "dwconv" if dw else "conv"
                lspec = {"kind": kind, "k": list(m.kernel_size), "s": list(m.stride), "p": list(m.padding)
                        if not isinstance(m.padding, str) else [0, 0], "d": list(m.dilation), "hw": list(shape[2:]),
                        "act": act}
                if kind == "gconv":  # pruned in whole groups: the group width stays, the number of groups follows
                    lspec["group_width"] = m.in_channels // m.groups
                else:
                    lspec["groups"] = m.groups
                cin, cout = m.in_channels, m.out_channels
            else:
                kind = "linear"
                lspec = {"kind": kind, "rows": int(np.prod(shape[:-1])), "act": act}
                cin, cout = m.in_features, m.out_features
            sig = json.dumps(lspec, sort_keys=True, separators=(",", ":"))
            layers.append(Layer(name=n, signature=sig, cin=cin, cout=cout, in_groups=tuple(in_groups.get(n, ())),
                                out_group=out_group.get(n), depthwise=lspec["kind"] in ("dwconv", "gconv"), spec=lspec,
                                shares=tuple(shares.get(n, ()))))
        return cls(model=model_key(spec), layers=layers, channels={g.name: g.channels for g in graph.groups})

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
    from edgeprune.common.versions import versions

    mod = runtime_for(target)
    return {"target": target.name, "fingerprint": target.fingerprint(), "runtime": target.runtime,
            "runtime_version": mod.version(target) or "unknown",
            "precision": target.precision, "channel_multiple": target.channel_multiple,
            "versions": versions(target.runtime)}


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
    check = m.get("check")
    shares_ok = isinstance(check, dict) and all(number(check.get(k)) and 0 <= check[k] <= 1
                                                for k in ("within_5", "within_10"))
    if check is not None and not (shares_ok and type(check.get("plans")) is int and check["plans"] > 0
                                  and number(check.get("worst_error"))):
        raise ValueError(f"{where}: check must hold plans, within_5, within_10 (shares) and worst_error")


CHECK_PLANS = 10  # random plans `edgeprune lut` measures to check a table (`--check N`)
TRUSTED_WITHIN_10 = 0.9  # below this share of plans within ±10%, `build --lut` warns


def check_figures(predicted: list[float], measured: list[float], seed: int) -> dict[str, Any]:
    """A table's self-check from its predictions of random plans and their measured latencies: the shares within
    ±5% and ±10% of the measured figure, the worst error (signed: prediction / measurement - 1), each plan's pair."""
    errors = [p / m - 1 for p, m in zip(predicted, measured)]
    n = len(errors)
    return {"plans": n, "seed": seed, "within_5": sum(abs(e) <= 0.05 for e in errors) / n,
            "within_10": sum(abs(e) <= 0.10 for e in errors) / n, "worst_error": max(errors, key=abs),
            "mean_abs_error": sum(abs(e) for e in errors) / n,
            "points": [{"predicted_ms": p, "measured_ms": m} for p, m in zip(predicted, measured)]}


def check_line(check: dict[str, Any] | None) -> str:
    """One line for a stored self-check (or its absence)."""
    if check is None:
        return "self-check: none (made with --check 0, or before tables checked themselves): its error is unknown"
    return (f"self-check on {check['plans']} random plans: {100 * check['within_10']:.0f}% within ±10%, "
            f"{100 * check['within_5']:.0f}% within ±5%, worst error {100 * check['worst_error']:+.1f}%")


def check_warning(check: dict[str, Any] | None, path: str, spec: str) -> str | None:
    """Why a table's predictions for `spec` should not be trusted, or None: no stored check, or fewer than
    `TRUSTED_WITHIN_10` of its plans within ±10%."""
    again = f"`edgeprune lut --check-only {path} --model {spec}`"
    if check is None:
        return f"latency table {path} holds no self-check for {spec}: how far its predictions are off is unknown " \
               f"(measure it with {again})"
    if check["within_10"] < TRUSTED_WITHIN_10:
        return f"latency table {path} predicts only {100 * check['within_10']:.0f}% of {check['plans']} random " \
               f"plans of {spec} within ±10% (worst {100 * check['worst_error']:+.1f}%; trusted from " \
               f"{100 * TRUSTED_WITHIN_10:.0f}%): a search on it may choose the wrong widths; check it again with " \
               f"{again}, or search on the device without --lut"
    return None


def stored_check(table: LatencyTable, spec: str, path: str) -> dict[str, Any]:
    """What `build --lut` reports of a table's self-check for `spec`: the check (None without one), its line and
    its warning (None when the table is trusted)."""
    check = table.models[calibration_key(table, spec)].get("check")
    return {"table": path, "check": check, "line": check_line(check), "warning": check_warning(check, path, spec)}


def model_key(spec: str) -> str:
    """The name a table files a model's calibration under: a file spec (`path/to/file.py:fn`) with its path made
    absolute, so that `lut` and `build --lut` agree however the path is spelled; any other spec as it is."""
    path, sep, fn = spec.rpartition(":")
    return f"{Path(path).resolve()}:{fn}" if sep and path.endswith(".py") else spec


def calibration_key(table: LatencyTable, spec: str) -> str:
    """The key of `spec`'s calibration in `table` (one filed under another spelling of the same file too: tables
    made before `model_key`); a clear error when the table has none. `predict` calls it for every prediction with
    a key already made by `model_key`: the exact match comes first, so that path resolves nothing on disk."""
    if spec in table.models:
        return spec
    key = model_key(spec)
    found = key if key in table.models else next((k for k in table.models if model_key(k) == key), None)
    if found is None:
        raise EdgePruneError(f"the latency table has no calibration for model {spec!r} (it has: "
                             f"{', '.join(table.models) or 'none'}); run `edgeprune lut --model {spec}` to add it")
    return found


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
    key = calibration_key(table, model.model)
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
    cal = table.models[key]
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
