"""What every criterion shares, and the baseline criteria: magnitude (`l1`, `l2`), geometric median (`fpgm`),
`random`.

    ranking = rank_l1(dict(model.named_modules()), group, stats)    # order, most important first
    keep = sorted(ranking.order[:width])

A criterion is a function `(modules, group, stats, signals, seed) -> Ranking` (`registry.CRITERIA`); the baselines
read the producers' filters only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from torch import nn

from edgeprune.compensation.statistics import LayerStats
from edgeprune.dependency.graph import Group
from edgeprune.scoring.signals import Signals


@dataclass(frozen=True)
class Ranking:
    """Channel order, most important first; `loss[k]` (k = 0..C) is the relative residual keeping the first k."""

    order: tuple[int, ...]
    loss: tuple[float, ...] | None = None


def consumer_weight(module: nn.Module) -> np.ndarray:
    """(N, D) float64 weight in unfold order."""
    w = module.weight.detach().double().cpu().numpy()
    return w.reshape(w.shape[0], -1)


def producer_filters(modules: dict[str, nn.Module], group: Group) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each producer's output filters (rows) and the group channel each one is: a concat's branches make a part of
    the group each, and their scores must land on their own channels."""
    out = []
    for i, p in enumerate(group.producers):
        w = modules[p].weight.detach().double().cpu().numpy()
        where = np.asarray(group.produces[i]) if group.produces else np.arange(group.channels)
        out.append((w.reshape(w.shape[0], -1)[: where.size], where))
    return out


def descending(score: np.ndarray) -> tuple[int, ...]:
    """Channel indices by descending score, ties by index."""
    return tuple(int(i) for i in np.lexsort((np.arange(score.size), -score)))


def _scored(modules: dict[str, nn.Module], group: Group, per_filter: Callable[[np.ndarray], np.ndarray]) -> Ranking:
    """Sum over producers of a per-filter score, each on its group channels."""
    score = np.zeros(group.channels)
    for f, where in producer_filters(modules, group):
        np.add.at(score, where, per_filter(f))
    return Ranking(order=descending(score))


def rank_l1(modules: dict[str, nn.Module], group: Group, stats: dict[str, LayerStats],
            signals: Signals | None = None, seed: int = 0) -> Ranking:
    """Sum over the group's producers of each output filter's L1 norm (magnitude pruning)."""
    return _scored(modules, group, lambda f: np.abs(f).sum(1))


def rank_l2(modules: dict[str, nn.Module], group: Group, stats: dict[str, LayerStats],
            signals: Signals | None = None, seed: int = 0) -> Ranking:
    return _scored(modules, group, lambda f: np.sqrt((f ** 2).sum(1)))


def rank_fpgm(modules: dict[str, nn.Module], group: Group, stats: dict[str, LayerStats],
              signals: Signals | None = None, seed: int = 0) -> Ranking:
    """Filter pruning via geometric median: filters close to all others (of their producer) are replaceable and go
    first."""
    def per_filter(f: np.ndarray) -> np.ndarray:
        d = np.sqrt(np.maximum(((f[:, None, :] - f[None, :, :]) ** 2).sum(-1), 0)).sum(1)
        return d / max(d.max(), 1e-30)

    return _scored(modules, group, per_filter)


def rank_datafree(modules: dict[str, nn.Module], group: Group, stats: dict[str, LayerStats],
                  signals: Signals | None = None, seed: int = 0) -> Ranking:
    """The default for a model with random weights on random calibration data (`config.PruneConfig.for_data`): the
    producers' filter L2 norms, and a loss curve read from the weights alone, `loss[k]` = the share of the group's
    squared filter norm outside the first k channels. There is nothing to keep in such a model (latency work), and
    CaP's statistics and ranking of it cost resnet50 ~35 s of a build; the step allocation still gets a curve to
    spend over."""
    score = np.zeros(group.channels)
    for f, where in producer_filters(modules, group):
        np.add.at(score, where, (f ** 2).sum(1))
    order = descending(score)
    energy = score[list(order)]
    total = max(float(energy.sum()), 1e-30)
    kept = np.concatenate([[0.0], np.cumsum(energy)])
    return Ranking(order=order, loss=tuple(float(max(0.0, 1 - k / total)) for k in kept))


def rank_random(modules: dict[str, nn.Module], group: Group, stats: dict[str, LayerStats],
                signals: Signals | None = None, seed: int = 0) -> Ranking:
    import zlib

    rng = np.random.default_rng([seed, zlib.crc32(group.name.encode())])
    return Ranking(order=tuple(int(i) for i in rng.permutation(group.channels)))
