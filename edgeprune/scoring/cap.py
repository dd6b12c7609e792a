"""`cap`, compensation-aware pruning (CAP.md §4): greedy forward selection of the channel whose addition most reduces
the post-compensation residual, jointly over every consumer of the group. It also yields the group's loss curve,
loss[k] = residual left when the first k channels are kept, for free.

    ranking = rank_cap(dict(model.named_modules()), group, stats)    # order + residual-loss curve
"""

from __future__ import annotations

import logging
import math

import numpy as np
import scipy.linalg
from torch import nn

from edgeprune.compensation.solve import effective_ridge
from edgeprune.compensation.statistics import LayerStats
from edgeprune.dependency.graph import Group
from edgeprune.errors import EdgePruneError
from edgeprune.scoring.base import Ranking, consumer_weight, rank_l2
from edgeprune.scoring.signals import Signals

log = logging.getLogger(__name__)


# Relative ridge of the float32 greedy: above float32 round-off amplified by near-singular (rank-deficient)
# statistics, far below any gain that decides the order.
RIDGE = 1e-4


class _ConsumerState:
    """Conditional covariance of a consumer's group coordinates given the selected ones, and W̃ times it.

    The state is float32 and updated in place by BLAS (one rank-|T| downdate per step: `ssyrk` on Σ's upper
    triangle, half the flops of a full product; the lower triangle goes stale and is never read); the small per-step
    solves are float64. The greedy order only needs gains to a few digits, and the exact compensation (solve.py)
    is float64 throughout. Selected coordinates are dropped from the state whenever a third of it is dead, so a
    full ranking costs about a third of the flops of downdating the whole matrix every step.
    """

    def __init__(self, weight: np.ndarray, stats: LayerStats, coords: tuple[tuple[int, ...], ...]) -> None:
        sigma = stats.cov
        g = np.asarray([c for ch in coords for c in ch], dtype=np.int64)
        k = len(coords[0])
        if any(len(ch) != k for ch in coords):
            raise EdgePruneError("channels of one consumer occupy different numbers of coordinates")
        self.k = k
        self.local = np.arange(g.size).reshape(len(coords), k)  # channel j -> its rows in the group block
        fixed = np.setdiff1d(np.arange(sigma.shape[0]), g)
        w32 = weight.astype(np.float32)
        if not fixed.size:  # the common case: the group is the consumer's whole input; float32 products suffice
            # Σ is symmetric: its transpose is the F-ordered copy, converted without a transposing pass
            s32 = np.asfortranarray((sigma if np.array_equal(g, np.arange(g.size)) else sigma[np.ix_(g, g)]).T,
                                    dtype=np.float32)
            ws = w32[:, g] @ s32  # W Σ in the group's coordinate order
            var = np.sum(ws.astype(np.float64) * weight[:, g], axis=1)
        else:
            s32, ws = None, None
            var = np.sum((weight @ sigma) * weight, axis=1)
        # Normalise each output row by its standard deviation: the loss becomes the fraction of each output's
        # variance lost, which is what a following BatchNorm sees, and makes consumers of different scales comparable.
        floor = 1e-3 * float(var.mean()) if var.size and var.mean() > 0 else 1e-12
        norm = 1.0 / np.sqrt(np.maximum(var, floor))
        wg = weight[:, g] * norm[:, None]
        floor_scale = 1e-6 * max(float(np.mean(np.diag(sigma)[g])), 1e-30)
        if s32 is None:  # channels of other groups (after a concat) stay: condition on them, in float64
            s_gg = sigma[np.ix_(g, g)]
            s_gf = sigma[np.ix_(g, fixed)]
            s_ff = sigma[np.ix_(fixed, fixed)]
            base = max(float(np.mean(np.diag(s_ff))), 1e-12)
            cf = None
            # rank-deficient statistics (fewer samples than dimensions) need a ridge that grows with the deficiency
            for r in (max(1e-6, effective_ridge(stats)), 1e-2, 1.0):
                try:
                    m = s_ff.copy()
                    m[np.diag_indices_from(m)] += r * base
                    cf = scipy.linalg.cho_factor(m, lower=True, overwrite_a=True)
                    break
                except np.linalg.LinAlgError:
                    continue
            if cf is not None:
                s_gg = s_gg - s_gf @ scipy.linalg.cho_solve(cf, s_gf.T)
            # the part of W acting on the fixed coordinates is explained exactly; only W_G matters from here
            s_gg = (s_gg + s_gg.T) / 2
            s32 = np.asfortranarray(s_gg, dtype=np.float32)
            a = wg @ s_gg
        else:
            a = ws * norm[:, None].astype(np.float32)
        self.sigma = s32
        self.a = np.asfortranarray(a, dtype=np.float32)  # (N, |G|)
        self.loss = float(np.sum(a.astype(np.float64) * wg))
        self.rows = weight.shape[0]
        self.pos = np.arange(g.size)  # group coordinate -> its row in the (compacted) state, -1 once selected
        # floor relative to the unconditioned variance: a group the fixed channels explain almost entirely must not
        # turn float32 round-off into huge gains
        self.scale = max(float(np.mean(np.diag(self.sigma), dtype=np.float64)), floor_scale)

    def gains(self, cand: np.ndarray) -> np.ndarray:
        """gain(t|S) = tr(R M⁻¹ Rᵀ) = tr(M⁻¹ RᵀR) for each candidate channel t (CAP.md §4), batched."""
        idx = self.pos[self.local[cand]]  # (C', k) rows in the state
        out = np.zeros(len(cand))
        if self.k == 1:
            d = np.diag(self.sigma)[idx[:, 0]].astype(np.float64)
            r2 = np.sum(np.square(self.a[:, idx[:, 0]], dtype=np.float64), axis=0)
            ok = d > RIDGE * self.scale
            out[ok] = r2[ok] / (d[ok] + RIDGE * self.scale)
            return out
        m = self.sigma[idx[:, :, None], idx[:, None, :]].astype(np.float64)  # (C', k, k), rows increasing
        m = np.triu(m) + np.swapaxes(np.triu(m, 1), 1, 2)  # from the upper triangle
        r = self.a.T[idx]  # (C', k, N) float32, gathered as whole rows of the C-ordered transpose
        gram = np.matmul(r, np.transpose(r, (0, 2, 1))).astype(np.float64)  # RᵀR per candidate, (C', k, k)
        m = m + RIDGE * self.scale * np.eye(self.k)
        ok = np.all(np.diagonal(m, axis1=1, axis2=2) > 2 * RIDGE * self.scale, axis=1)
        if ok.any():
            try:
                x = np.linalg.solve(m[ok], gram[ok])
            except np.linalg.LinAlgError:
                x = np.stack([np.linalg.lstsq(mm, gg, rcond=None)[0] for mm, gg in zip(m[ok], gram[ok])])
            out[ok] = np.maximum(np.trace(x, axis1=1, axis2=2), 0.0)
        return out

    def select(self, chans: np.ndarray) -> float:
        """Condition on the coordinates of `chans` (Σ -= Z Zᵀ, A -= (A_T L⁻ᵀ) Zᵀ with Z = Σ_:,T L⁻ᵀ); returns the loss drop."""
        from scipy.linalg.blas import sgemm, ssyrk
        from scipy.linalg.lapack import dpotrf, dtrtri

        t = self.pos[self.local[chans].ravel()]
        above = np.arange(self.sigma.shape[0])[:, None] <= t[None, :]
        b = np.where(above, self.sigma[:, t], self.sigma[t, :].T)  # Σ_:,T from the upper triangle, float32
        bt = b[t, :].astype(np.float64)
        m = (bt + bt.T) / 2
        inv_low = None
        # raw LAPACK (potrf, trtri) for these |T|×|T| factors: scipy.linalg's wrappers cost 3-4x more on matrices
        # this small, thousands of times per ranking
        for r in (RIDGE, 1e-2, 1.0) if np.isfinite(m).all() else ():
            m_r = m.copy()
            m_r[np.diag_indices_from(m_r)] += r * self.scale
            low, info = dpotrf(m_r, lower=1, clean=1, overwrite_a=1)
            if info == 0:
                inv_low, info = dtrtri(low, lower=1, overwrite_c=1)
                if info == 0:
                    break
            inv_low = None
        if inv_low is None:  # numerically exhausted: these coordinates carry nothing the selection lacks
            inv_low = np.eye(t.size) / np.sqrt(self.scale)
        inv_t = np.asfortranarray(inv_low.T, dtype=np.float32)  # L⁻ᵀ; then two float32 products, as the state is
        z = sgemm(1.0, b, inv_t)  # Σ_:,T L⁻ᵀ, Fortran-ordered
        za = sgemm(1.0, self.a[:, t], inv_t)  # W̃ Σ_:,T L⁻ᵀ
        self.sigma = ssyrk(-1.0, z, beta=1.0, c=self.sigma, trans=0, lower=0, overwrite_c=1)
        self.a = sgemm(-1.0, za, z, beta=1.0, c=self.a, trans_b=1, overwrite_c=1)
        # exactly explained now: zero their columns (contiguous) so round-off cannot resurrect them; their rows are
        # left stale, which is safe: a selected row only ever reaches entries of other selected coordinates
        self.sigma[:, t] = 0.0
        self.a[:, t] = 0.0
        diag = np.einsum("ii->i", self.sigma)  # a view: clamp round-off below zero
        np.maximum(diag, 0.0, out=diag)
        self.pos[self.local[chans].ravel()] = -1
        alive = int(np.count_nonzero(self.pos >= 0))
        if 0 < alive < 2 * self.sigma.shape[0] // 3:
            self._compact()
        drop = float(np.sum(np.square(za, dtype=np.float64)))
        self.loss = max(self.loss - drop, 0.0)
        return drop

    def pool(self, cand: np.ndarray) -> _Pool:
        """The state restricted to the coordinates of channels `cand`, in float64: what an exact greedy among them
        needs (gain(t | S ∪ T') only reads the conditional covariance and W̃Σ on the candidates' coordinates)."""
        idx = self.pos[self.local[cand]].ravel()
        lo, hi = np.minimum.outer(idx, idx), np.maximum.outer(idx, idx)
        return _Pool(self.sigma[lo, hi].astype(np.float64), self.a[:, idx].astype(np.float64), self.k,
                     RIDGE * self.scale)

    def _compact(self) -> None:
        """Drop the rows and columns of selected coordinates: later downdates touch only what is left."""
        live = self.pos >= 0
        rows = self.pos[live]
        # one gather each, through the C-ordered transposes: the results are Fortran-ordered again, and the upper
        # triangle stays the upper triangle (rows are increasing)
        self.sigma = self.sigma.T[np.ix_(rows, rows)].T
        self.a = self.a.T[rows].T
        self.pos[live] = np.arange(rows.size)


class _Pool:
    """A consumer's greedy state on a pool of candidate channels (float64): gains and selections among them only."""

    def __init__(self, sigma: np.ndarray, a: np.ndarray, k: int, ridge: float) -> None:
        self.sigma, self.a, self.k, self.ridge = sigma, a, k, ridge

    def _rows(self, j: int) -> slice:
        return slice(j * self.k, (j + 1) * self.k)

    def gains(self, alive: list[int]) -> np.ndarray:
        """gain(t | picked) for each alive pool channel, batched as `_ConsumerState.gains`."""
        idx = np.asarray(alive)[:, None] * self.k + np.arange(self.k)  # (C', k) rows
        out = np.zeros(len(alive))
        m = self.sigma[idx[:, :, None], idx[:, None, :]] + self.ridge * np.eye(self.k)  # (C', k, k)
        ok = np.all(np.diagonal(m, axis1=1, axis2=2) > 2 * self.ridge, axis=1)
        if not ok.any():
            return out
        r = self.a.T[idx[ok]]  # (C', k, N)
        gram = np.matmul(r, np.transpose(r, (0, 2, 1)))
        if self.k == 1:
            out[ok] = gram[:, 0, 0] / m[ok, 0, 0]
        else:
            out[ok] = np.trace(np.linalg.solve(m[ok], gram), axis1=1, axis2=2)
        return np.maximum(out, 0.0)

    def select(self, j: int) -> None:
        r = self._rows(j)
        m = self.sigma[r, r] + self.ridge * np.eye(self.k)
        try:
            inv_low_t = np.linalg.inv(np.linalg.cholesky(m)).T  # L⁻ᵀ
        except np.linalg.LinAlgError:
            return  # numerically exhausted: selecting it explains nothing more
        z = self.sigma[:, r] @ inv_low_t
        za = self.a[:, r] @ inv_low_t
        self.sigma = self.sigma - z @ z.T
        self.a = self.a - za @ z.T


POOL = 4  # candidates per selected channel for the exact greedy inside a block


def _pooled_greedy(states: list[_ConsumerState], cand: np.ndarray, take: int) -> tuple[list[int], list[float]]:
    """The exact greedy among `cand` (positions into it, in pick order, and each pick's exact loss drop)."""
    pools = [s.pool(cand) for s in states]
    alive = list(range(len(cand)))
    picks, drops = [], []
    for _ in range(take):
        g = sum(p.gains(alive) for p in pools)
        n = int(np.argmax(g))  # ties: the first, i.e. the higher individual gain (the pool's order)
        picks.append(alive.pop(n))
        drops.append(float(g[n]))
        for p in pools:
            p.select(picks[-1])
    return picks, drops


def rank_cap(modules: dict[str, nn.Module], group: Group, stats: dict[str, LayerStats],
             signals: Signals | None = None, seed: int = 0, block: int | None = None) -> Ranking:
    """Greedy compensation-aware ranking, joint over the group's compensable consumers.

    Wide groups select `block` channels per step (at most 64 steps by default), but not by their stale individual
    gains: among the POOL·block best candidates of the step, an exact greedy (float64, on the pool's part of the
    state) picks them one by one, each given the ones picked before it, and the step's one joint downdate follows.
    Ranking blocks by stale gains kept redundant channels together (with duplicated channels up to 23x the exact
    greedy's loss; +19-24% at width 8 on the example's 128-wide groups, the audit's F4); the pooled greedy equals the
    exact greedy whenever the exact picks lie in the pool.

    Args:
        block: channels selected per step; 1 is the exact greedy over all candidates (default: at most 64 steps).
    """
    states = [_ConsumerState(consumer_weight(modules[c.module]), stats[c.module], c.coords)
              for c in group.consumers if c.compensable and c.module in stats]
    if not states:
        return rank_l2(modules, group, stats, signals, seed)  # nothing to compensate: magnitude is the best we know
    c = group.channels
    block = block or max(1, math.ceil(c / 64))
    rows = sum(s.rows for s in states)
    remaining = np.arange(c)
    order: list[int] = []
    loss = [sum(s.loss for s in states)]
    while remaining.size:
        gains = sum(s.gains(remaining) for s in states)
        take = min(block, remaining.size)
        # stable: the highest gain first, ties broken by channel index
        ranked = np.lexsort((remaining, -gains))
        if take == 1:
            pick, g = ranked[:1], np.maximum(gains[ranked[:1]], 0)
        else:
            pool = ranked[:min(POOL * take, remaining.size)]
            local, inner = _pooled_greedy(states, remaining[pool], take)
            pick, g = pool[local], np.maximum(np.asarray(inner), 0)
        chans = remaining[pick]
        for s in states:
            s.select(chans)
        new_loss = sum(s.loss for s in states)
        drop = loss[-1] - new_loss
        share = g / g.sum() if g.sum() > 0 else np.full(take, 1.0 / take)
        for j in range(take):  # within a block, the exact drop is shared as the picks' exact drops say
            loss.append(loss[-1] - drop * share[j])
        loss[-1] = new_loss
        order.extend(int(x) for x in chans)
        remaining = np.delete(remaining, pick)
    return Ranking(order=tuple(order), loss=tuple(x / rows for x in loss))
