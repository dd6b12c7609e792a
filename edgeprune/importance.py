"""Channel ranking criteria: which channels of a group to keep, most important first.

    ranking = rank("cap", model, group, stats)       # order + residual-loss curve
    keep = sorted(ranking.order[:width])

`CRITERIA` is the registry. `cap` is compensation-aware pruning (CAP.md §4): greedy forward selection of the
channel whose addition most reduces the post-compensation residual, jointly over every consumer of the group.
It also yields the group's loss curve, loss[k] = residual left when the first k channels are kept, for free.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import scipy.linalg
from torch import nn

from edgeprune.compensate import LayerStats
from edgeprune.errors import EdgePruneError
from edgeprune.graph import Group

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Ranking:
    """Channel order, most important first; `loss[k]` (k = 0..C) is the relative residual keeping the first k."""

    order: tuple[int, ...]
    loss: tuple[float, ...] | None = None


def consumer_weight(module: nn.Module) -> np.ndarray:
    """(N, D) float64 weight in unfold order."""
    w = module.weight.detach().double().cpu().numpy()
    return w.reshape(w.shape[0], -1)


# ---------------------------------------------------------------- CaP


class _ConsumerState:
    """Conditional covariance of a consumer's group coordinates given the selected ones, and W̃ times it."""

    def __init__(self, weight: np.ndarray, stats: LayerStats, coords: tuple[tuple[int, ...], ...]) -> None:
        sigma = stats.cov
        g = np.asarray([c for ch in coords for c in ch], dtype=np.int64)
        k = len(coords[0])
        if any(len(ch) != k for ch in coords):
            raise EdgePruneError("channels of one consumer occupy different numbers of coordinates")
        self.k = k
        self.local = np.arange(g.size).reshape(len(coords), k)  # channel j -> its rows in the group block
        fixed = np.setdiff1d(np.arange(sigma.shape[0]), g)
        # Normalise each output row by its standard deviation: the loss becomes the fraction of each output's
        # variance lost, which is what a following BatchNorm sees, and makes consumers of different scales comparable.
        var = np.einsum("nd,de,ne->n", weight, sigma, weight)
        floor = 1e-3 * float(var.mean()) if var.size and var.mean() > 0 else 1e-12
        w = weight / np.sqrt(np.maximum(var, floor))[:, None]
        s_gg = sigma[np.ix_(g, g)]
        if fixed.size:  # channels of other groups (after a concat) stay: condition on them
            s_gf = sigma[np.ix_(g, fixed)]
            s_ff = sigma[np.ix_(fixed, fixed)]
            s_ff = s_ff + 1e-8 * max(float(np.mean(np.diag(s_ff))), 1e-12) * np.eye(fixed.size)
            cf = scipy.linalg.cho_factor(s_ff, lower=True)
            s_gg = s_gg - s_gf @ scipy.linalg.cho_solve(cf, s_gf.T)
            # the part of W acting on the fixed coordinates is explained exactly; only W_G matters from here
        self.sigma = (s_gg + s_gg.T) / 2
        self.w = w[:, g]
        self.a = self.w @ self.sigma  # (N, |G|)
        self.rows = weight.shape[0]
        self.scale = max(float(np.mean(np.diag(self.sigma))), 1e-30)

    def loss(self) -> float:
        return float(np.sum(self.a * self.w))

    def gains(self, cand: np.ndarray) -> np.ndarray:
        """gain(t|S) = tr(R M⁻¹ Rᵀ) for each candidate channel t (CAP.md §4), batched."""
        idx = self.local[cand]  # (C', k)
        if self.k == 1:
            d = np.diag(self.sigma)[idx[:, 0]]
            r2 = np.sum(self.a[:, idx[:, 0]] ** 2, axis=0)
            out = np.zeros(len(cand))
            ok = d > 1e-12 * self.scale
            out[ok] = r2[ok] / d[ok]
            return out
        m = self.sigma[idx[:, :, None], idx[:, None, :]]  # (C', k, k)
        rt = np.transpose(self.a[:, idx], (1, 2, 0))  # (C', k, N)
        m = m + 1e-10 * self.scale * np.eye(self.k)
        diag_ok = np.all(np.diagonal(m, axis1=1, axis2=2) > 1e-12 * self.scale, axis=1)
        out = np.zeros(len(cand))
        if diag_ok.any():
            try:
                x = np.linalg.solve(m[diag_ok], rt[diag_ok])
            except np.linalg.LinAlgError:
                x = np.stack([np.linalg.lstsq(mm, rr, rcond=None)[0] for mm, rr in zip(m[diag_ok], rt[diag_ok])])
            out[diag_ok] = np.maximum(np.sum(rt[diag_ok] * x, axis=(1, 2)), 0.0)
        return out

    def select(self, chans: np.ndarray) -> None:
        """Condition on the coordinates of `chans`: rank-|T| update of Σ and A."""
        t = self.local[chans].ravel()
        m = self.sigma[np.ix_(t, t)] + 1e-10 * self.scale * np.eye(t.size)
        try:
            cf = scipy.linalg.cho_factor(m, lower=True, check_finite=False)
            x = scipy.linalg.cho_solve(cf, self.sigma[t, :], check_finite=False)  # M⁻¹ Σ_T,:
        except np.linalg.LinAlgError:
            x = np.linalg.lstsq(m, self.sigma[t, :], rcond=None)[0]
        self.a -= self.a[:, t] @ x
        self.sigma -= self.sigma[:, t] @ x
        self.sigma[:, t] = 0.0
        self.sigma[t, :] = 0.0


def rank_cap(modules: dict[str, nn.Module], group: Group, stats: dict[str, LayerStats], seed: int = 0,
             block: int | None = None) -> Ranking:
    """Greedy compensation-aware ranking, joint over the group's compensable consumers.

    Args:
        block: channels selected per step; 1 is the exact greedy, larger blocks trade a little loss for speed on
            wide groups (default: enough to need at most 256 steps).
    """
    states = [_ConsumerState(consumer_weight(modules[c.module]), stats[c.module], c.coords)
              for c in group.consumers if c.compensable and c.module in stats]
    if not states:
        return rank_l2(modules, group, stats, seed)  # nothing to compensate: magnitude is the best we know
    c = group.channels
    block = block or max(1, math.ceil(c / 256))
    rows = sum(s.rows for s in states)
    remaining = np.arange(c)
    order: list[int] = []
    loss = [sum(s.loss() for s in states)]
    while remaining.size:
        gains = sum(s.gains(remaining) for s in states)
        take = min(block, remaining.size)
        # stable: the highest gain first, ties broken by channel index
        pick = np.lexsort((remaining, -gains))[:take]
        chans = remaining[pick]
        for s in states:
            s.select(chans)
        new_loss = max(sum(s.loss() for s in states), 0.0)
        drop = loss[-1] - new_loss
        g = np.maximum(gains[pick], 0)
        share = g / g.sum() if g.sum() > 0 else np.full(take, 1.0 / take)
        for j in range(take):  # within a block, the exact drop is shared in proportion to individual gains
            loss.append(loss[-1] - drop * share[j])
        loss[-1] = new_loss
        order.extend(int(x) for x in chans)
        remaining = np.delete(remaining, pick)
    return Ranking(order=tuple(order), loss=tuple(x / rows for x in loss))


# ---------------------------------------------------------------- baselines


def _producer_filters(modules: dict[str, nn.Module], group: Group) -> list[np.ndarray]:
    out = []
    for p in group.producers:
        w = modules[p].weight.detach().double().cpu().numpy()
        out.append(w.reshape(w.shape[0], -1))
    return out


def _order_by(score: np.ndarray) -> Ranking:
    return Ranking(order=tuple(int(i) for i in np.lexsort((np.arange(score.size), -score))))


def rank_l1(modules: dict[str, nn.Module], group: Group, stats: dict[str, LayerStats], seed: int = 0,
            block: int | None = None) -> Ranking:
    """Sum over the group's producers of each output filter's L1 norm (magnitude pruning)."""
    return _order_by(sum(np.abs(f).sum(1) for f in _producer_filters(modules, group)))


def rank_l2(modules: dict[str, nn.Module], group: Group, stats: dict[str, LayerStats], seed: int = 0,
            block: int | None = None) -> Ranking:
    return _order_by(sum(np.sqrt((f ** 2).sum(1)) for f in _producer_filters(modules, group)))


def rank_fpgm(modules: dict[str, nn.Module], group: Group, stats: dict[str, LayerStats], seed: int = 0,
              block: int | None = None) -> Ranking:
    """Filter pruning via geometric median: filters close to all others are replaceable and go first."""
    score = np.zeros(group.channels)
    for f in _producer_filters(modules, group):
        d = np.sqrt(np.maximum(((f[:, None, :] - f[None, :, :]) ** 2).sum(-1), 0)).sum(1)
        score += d / max(d.max(), 1e-30)
    return _order_by(score)


def rank_random(modules: dict[str, nn.Module], group: Group, stats: dict[str, LayerStats], seed: int = 0,
                block: int | None = None) -> Ranking:
    import zlib

    rng = np.random.default_rng([seed, zlib.crc32(group.name.encode())])
    return Ranking(order=tuple(int(i) for i in rng.permutation(group.channels)))


Criterion = Callable[..., Ranking]
CRITERIA: dict[str, Criterion] = {"cap": rank_cap, "l1": rank_l1, "l2": rank_l2, "fpgm": rank_fpgm,
                                  "random": rank_random}
NEEDS_STATS = ("cap",)


def rank(criterion: str, model: nn.Module, group: Group, stats: dict[str, LayerStats], seed: int = 0,
         block: int | None = None) -> Ranking:
    if criterion not in CRITERIA:
        raise EdgePruneError(f"unknown criterion {criterion!r}; available: {', '.join(CRITERIA)}")
    return CRITERIA[criterion](dict(model.named_modules()), group, stats, seed, block)
