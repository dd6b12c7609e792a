"""The width rules of the criteria from the papers (`--allocation epruner`, `nap`): u in [0, 1] -> widths by the
method's own rule, in place of the step constraint.

    widths_for = nap_allocation(AllocationInputs(graph, rankings, multiple=8))   # needs --criterion nap's rankings
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from edgeprune.dependency.graph import Graph
from edgeprune.errors import EdgePruneError
from edgeprune.scoring.base import Ranking
from edgeprune.scoring.papers import BETAS, ExemplarRanking
from edgeprune.search.allocate import AllocationInputs, WidthsFn, width_options


def method_widths_fn(allocation: str, graph: Graph, rankings: dict[str, Ranking],
                     options: dict[str, list[int]]) -> Callable[[float], dict[str, int]]:
    """u in [0, 1] -> widths by a method's own rule; `options` are each group's allowed widths, ascending (its
    minimum first, its full width last). u = 0 is the unpruned model, u = 1 every group at its minimum.

    `epruner`: β = 2^(log2 β_min + u·range) over `BETAS`, a group's width its number of exemplars at β (linear
    between the ladder's β, made non-increasing in β), rounded up to an allowed width. `nap`: the u-th fraction of
    all channels, by NAP's global importance, removed: one threshold for every group, each group's share automatic.
    """
    need = ExemplarRanking if allocation == "epruner" else Ranking
    for g in graph.groups:
        r = rankings.get(g.name)
        if not isinstance(r, need) or (allocation == "nap" and r.loss is None and g.channels > 1):
            raise EdgePruneError(f"--allocation {allocation} needs --criterion {allocation} (group {g.name} was "
                                 f"ranked without its {'exemplars' if allocation == 'epruner' else 'importances'})")

    def up(name: str, width: float) -> int:
        opts = options[name]
        return next((w for w in opts if w >= width - 1e-9), opts[-1])

    if allocation == "epruner":
        ladders = {}
        for g in graph.groups:
            counts = np.asarray(rankings[g.name].exemplars, dtype=float)  # type: ignore[attr-defined]
            ok = counts > 0
            xs = np.arange(counts.size)
            counts = np.interp(xs, xs[ok], counts[ok]) if ok.any() else np.full(counts.size, float(g.channels))
            ladders[g.name] = np.minimum.accumulate(np.minimum(counts, g.channels))

        def widths(u: float) -> dict[str, int]:
            if u <= 0.0 or u >= 1.0:
                return {g.name: options[g.name][-1 if u <= 0.0 else 0] for g in graph.groups}
            pos = u * (len(BETAS) - 1)
            return {g.name: up(g.name, float(np.interp(pos, np.arange(len(BETAS)), ladders[g.name])))
                    for g in graph.groups}
        return widths

    pooled = []  # (importance, group, position in its order)
    for gi, g in enumerate(graph.groups):
        loss = rankings[g.name].loss or (0.0, 0.0)
        pooled += [(loss[k] - loss[k + 1], gi, k) for k in range(len(loss) - 1)]
    pooled.sort()

    def nap_widths(u: float) -> dict[str, int]:
        if u >= 1.0:
            return {g.name: options[g.name][0] for g in graph.groups}
        removed = np.zeros(len(graph.groups), dtype=int)
        for _, gi, _ in pooled[: int(u * len(pooled))]:
            removed[gi] += 1
        return {g.name: up(g.name, g.channels - removed[i]) for i, g in enumerate(graph.groups)}
    return nap_widths


def epruner_allocation(a: AllocationInputs) -> WidthsFn:
    """`epruner`: a group's width is its number of exemplars at the strength's preference scale."""
    return method_widths_fn("epruner", a.graph, a.rankings, width_options(a.graph, a.multiple, a.min_width))


def nap_allocation(a: AllocationInputs) -> WidthsFn:
    """`nap`: one global threshold on NAP's importances sets every group's width."""
    return method_widths_fn("nap", a.graph, a.rankings, width_options(a.graph, a.multiple, a.min_width))
