"""Latency models of a plan's widths for the latency-aware allocation: how much each group's channels cost.

    cost = relative_cost(macs_cost(layers))            # no table: multiply-accumulates
    cost = relative_cost(table_cost(table, layers))    # --lut: the table's predicted milliseconds
    cost(widths)                                       # 1.0 for the unpruned model

Only the allocation uses these, to tell which groups' channels are expensive; the search's outer level still closes
on the measured (or table) latency. MACs are no latency (unaligned widths and memory-bound layers differ), which is
why a table, where one exists, takes their place.
"""

from __future__ import annotations

from collections.abc import Callable

from edgeprune.latency.table import Layer, LatencyTable, LayerModel, predict

Cost = Callable[[dict[str, int]], float]


def layer_macs(layer: Layer, cin: int, cout: int) -> int:
    """Multiply-accumulates of one conv or linear at these widths (the output size from its kernel, stride, padding
    and dilation; `padding="same"` layers count as stride-only)."""
    s = layer.spec
    if s["kind"] == "linear":
        return int(s["rows"]) * cin * cout
    out = 1
    for size, k, st, p, d in zip(s["hw"], s["k"], s["s"], s["p"], s["d"]):
        out *= max(1, (size + 2 * p - d * (k - 1) - 1) // st + 1)
    kk = s["k"][0] * s["k"][1]
    if layer.depthwise:  # depthwise: one input channel per output; a grouped conv: its group width
        return cout * int(s.get("group_width", 1)) * kk * out
    return cin * cout * kk * out // max(1, int(s["groups"]))


def macs_cost(model: LayerModel) -> Cost:
    return lambda widths: float(sum(layer_macs(layer, *layer.widths(widths, model.channels)) for layer in model.layers))


def table_cost(table: LatencyTable, model: LayerModel) -> Cost:
    return lambda widths: predict(table, model, widths)[0]


def relative_cost(cost: Cost, full: dict[str, int]) -> Cost:
    """`cost` divided by its value for the unpruned widths `full`."""
    base = cost(full) or 1.0
    return lambda widths: cost(widths) / base
