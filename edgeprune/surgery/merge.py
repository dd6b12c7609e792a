"""Channels merged instead of dropped (the `similarity` criterion's plans): a removed channel's outgoing weights
folded into its kept representative in every consumer.

    priors = fold(model, graph, plan.meta["merge"])   # consumer -> merged 2-D weights (unfold order)
"""

from __future__ import annotations

import numpy as np
from torch import nn

from edgeprune.dependency.graph import Graph
from edgeprune.scoring.base import consumer_weight


def fold(model: nn.Module, graph: Graph, merge: dict[str, list[list[int]]]) -> dict[str, np.ndarray]:
    """The merged 2-D weights (unfold order) of every dense consumer of a merged group: a removed channel's columns
    added to its representative's and zeroed. Without compensation these are the pruned weights; with it they are
    where the least-squares repair starts (its ridge prior)."""
    modules = dict(model.named_modules())
    out: dict[str, np.ndarray] = {}
    for g in graph.groups:
        for c in g.consumers if g.name in merge else ():
            if not c.compensable:
                continue
            w = out.get(c.module)
            w = consumer_weight(modules[c.module]) if w is None else w
            for removed, rep in merge[g.name]:
                w[:, list(c.coords[rep])] += w[:, list(c.coords[removed])]
                w[:, list(c.coords[removed])] = 0.0
            out[c.module] = w
    return out
