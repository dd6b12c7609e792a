"""Latency models of a plan's widths for the latency-aware allocation: how much each group's channels cost.

    cost = relative_cost(roofline_cost(layers))        # no table: multiply-accumulates plus memory traffic
    cost = relative_cost(table_cost(table, layers))    # --lut: the table's predicted milliseconds
    cost(widths)                                       # 1.0 for the unpruned model

Only the allocation uses these, to tell which groups' channels are expensive; the search's outer level still closes
on the measured (or table) latency. MACs are no latency (unaligned widths and memory-bound layers differ), which is
why a table, where one exists, takes their place, and why without one each layer also pays for the values it reads
and writes (`roofline_cost`).
"""

from __future__ import annotations

from collections.abc import Callable

from edgeprune.latency.table import Layer, LatencyTable, LayerModel, predict

Cost = Callable[[dict[str, int]], float]


def _out_size(spec: dict) -> int:
    """Output positions of a conv (from its kernel, stride, padding and dilation; `padding="same"` layers count as
    stride-only)."""
    out = 1
    for size, k, st, p, d in zip(spec["hw"], spec["k"], spec["s"], spec["p"], spec["d"]):
        out *= max(1, (size + 2 * p - d * (k - 1) - 1) // st + 1)
    return out


def _fan_in(layer: Layer, cin: int) -> int:
    """Input channels each output channel of a conv reads: its group width (depthwise / grouped in units), else cin
    over its groups."""
    return int(layer.spec.get("group_width", 1)) if layer.depthwise else cin // max(1, int(layer.spec["groups"]))


def layer_macs(layer: Layer, cin: int, cout: int) -> int:
    """Multiply-accumulates of one conv or linear at these widths."""
    s = layer.spec
    if s["kind"] == "linear":
        return int(s["rows"]) * cin * cout
    return cout * _fan_in(layer, cin) * s["k"][0] * s["k"][1] * _out_size(s)


# Multiply-accumulates one value moved costs: on ONNX Runtime's CPU kernels (EfficientNet-Lite0, 1 thread, per-node
# profile) 1x1 convs ran at ~40 GMAC/s, and the time of depthwise convs and of the classifier followed the values
# they read and write at ~6 G values/s: 40 / 6 ~ 7. MACs alone priced depthwise layers 3-5x below their time, and
# the allocation cut late 1x1 convs first (issue 28).
VALUE_MACS = 7.0


def layer_values(layer: Layer, cin: int, cout: int) -> int:
    """Values one conv or linear reads and writes at these widths: its input, its output and its weights."""
    s = layer.spec
    if s["kind"] == "linear":
        return int(s["rows"]) * (cin + cout) + cin * cout
    size_in = 1
    for size in s["hw"]:
        size_in *= size
    return cin * size_in + cout * _out_size(s) + cout * _fan_in(layer, cin) * s["k"][0] * s["k"][1]


def roofline_cost(model: LayerModel) -> Cost:
    """MACs plus VALUE_MACS per value each layer reads and writes: a sum-of-roofline latency model, so memory-bound
    layers (depthwise convs, classifiers, high-resolution activations) weigh about what they take on a CPU."""
    def cost(widths: dict[str, int]) -> float:
        total = 0.0
        for layer in model.layers:
            cin, cout = layer.widths(widths, model.channels)
            total += layer_macs(layer, cin, cout) + VALUE_MACS * layer_values(layer, cin, cout)
        return total

    return cost


def macs_cost(model: LayerModel) -> Cost:
    return lambda widths: float(sum(layer_macs(layer, *layer.widths(widths, model.channels)) for layer in model.layers))


def table_cost(table: LatencyTable, model: LayerModel) -> Cost:
    return lambda widths: predict(table, model, widths)[0]


def relative_cost(cost: Cost, full: dict[str, int]) -> Cost:
    """`cost` divided by its value for the unpruned widths `full`."""
    base = cost(full) or 1.0
    return lambda widths: cost(widths) / base
