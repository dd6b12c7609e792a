"""The closed-form compensation of a consumer that loses input coordinates (CAP.md §3).

    w_new, b_new = compensate_layer(weight2d, bias, stats["layer2.0.conv1"], keep_coords, rescale=True)
    solver = PrefixSolver(weight2d, stats[name], order)        # every prefix of a channel order, one factor

The statistics come from `statistics.collect_statistics`; `surgery/repair.py` fits consumers sequentially instead.
"""

from __future__ import annotations

import logging
import math

import numpy as np

from edgeprune.compensation.statistics import LayerStats

log = logging.getLogger(__name__)


def _cholesky_solve(a: np.ndarray, b: np.ndarray, ridge: float, scale: float, prior: np.ndarray) -> np.ndarray:
    """Solve (a + r·I) x = b + r·prior with r = ridge·scale by Cholesky, raising the ridge when a is numerically
    singular: the ridge pulls x towards `prior` (the kept weights), not towards zero."""
    import scipy.linalg

    scale = scale if scale > 0 else 1.0
    for r in [ridge] + [x for x in (1e-4, 1e-2, 1.0) if x > ridge]:
        try:
            m = a.copy()
            m[np.diag_indices_from(m)] += r * scale  # a + r·scale·I without a D×D identity
            c = scipy.linalg.cho_factor(m, lower=True, overwrite_a=True, check_finite=False)
            return scipy.linalg.cho_solve(c, b + (r * scale) * prior, check_finite=False)
        except np.linalg.LinAlgError:
            log.debug("Cholesky failed with ridge %g, retrying with a larger one", r)
    # still indefinite at ridge 1: float32 statistics of inputs whose mean dwarfs their spread lose E[xx] - mu mu^T
    # to cancellation (random-weight detectors' heads did). Project onto the positive semi-definite matrices (negative
    # eigenvalues to zero), then solve with ridge 1 as above
    if not np.isfinite(a).all():
        raise np.linalg.LinAlgError("covariance holds NaN or infinity")
    w, v = np.linalg.eigh((a + a.T) / 2)
    w = np.maximum(w, 0.0) + scale
    return v @ ((v.T @ (b + scale * prior)) / w[:, None])


RESCALE_MIN_R2 = 0.25  # below this explained variance the rescale is worse than the mean-only repair (audit F8)


def rescale_rows(w_new: np.ndarray, var_old: np.ndarray, var_new: np.ndarray) -> np.ndarray:
    """Scale each repaired row so that its output keeps the original variance (a BatchNorm reads it), except rows
    whose fit explains less than `RESCALE_MIN_R2` of it: with explained share R², rescaling adds (1 - R)² of the
    variance to the error, which is more than predicting the mean when R < 0.5, so those rows stay as fitted."""
    ratio = np.divide(var_new, var_old, out=np.zeros_like(var_new), where=var_old > 1e-30)  # R² of each row
    s = np.ones_like(var_new)
    ok = ratio >= RESCALE_MIN_R2
    s[ok] = 1.0 / np.sqrt(ratio[ok])
    return w_new * s[:, None]


def compensate_layer(
    weight: np.ndarray,
    bias: np.ndarray | None,
    stats: LayerStats,
    keep: np.ndarray,
    rescale: bool = False,
    ridge: float = 1e-6,
    prior: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares repair of a consumer that loses the input coordinates not in `keep` (CAP.md §3).

    W' = W_S + W_P Σ_PS (Σ_SS + λI)⁻¹: each removed input is replaced by its ridge regression on the kept ones, and
    the kept weights are not shrunk (the form W Σ_:S (Σ_SS + λI)⁻¹ also shrinks them: at the fallback ridge 1 its
    held-out error was 58.6 against 6.3, the audit's F7). Solved as (Σ_SS + λI)⁻¹ (Σ_S: Wᵀ + λ W_Sᵀ), the same
    system PrefixSolver solves.

    Args:
        weight: (N, D) float64, the consumer's weight with D in unfold order.
        keep: indices of the kept coordinates S.
        rescale: keep each output's pre-BN variance (when a BatchNorm reads the output), see `rescale_rows`.
        prior: (N, |S|) weights the ridge pulls towards instead of W_S (merged channels: `surgery.merge.fold`).

    Returns:
        W' (N, |S|) and b' (N,) such that W' x_S + b' approximates W x + b.
    """
    sigma, mu = stats.cov, stats.mean
    ridge = effective_ridge(stats, ridge)  # rank-deficient statistics: shrink towards the diagonal, not overfit
    b = np.zeros(weight.shape[0]) if bias is None else bias.astype(np.float64)
    if keep.size == 0:
        return np.zeros((weight.shape[0], 0)), b + weight @ mu
    s_ss = sigma[np.ix_(keep, keep)]
    # with the rescale, W Σ serves both the right-hand side (its columns S) and each output's variance
    ws = weight @ sigma if rescale else None
    rhs = ws[:, keep].T if ws is not None else sigma[keep, :] @ weight.T
    # ridge relative to the whole input's mean variance, as PrefixSolver does: both paths solve the same system
    w_new = _cholesky_solve(s_ss, rhs, ridge, float(np.mean(np.diag(sigma))),
                            (weight[:, keep] if prior is None else prior).T).T
    if rescale:
        w_new = rescale_rows(w_new, np.sum(ws * weight, axis=1), np.sum((w_new @ s_ss) * w_new, axis=1))
    b_new = b + weight @ mu - w_new @ mu[keep]
    return w_new, b_new


def reconstruction_error(weight: np.ndarray, bias: np.ndarray | None, x: np.ndarray, keep: np.ndarray,
                         w_new: np.ndarray, b_new: np.ndarray) -> float:
    """Mean squared error of the repaired layer's output against the original on patches `x` (P, D)."""
    b = np.zeros(weight.shape[0]) if bias is None else bias
    ref = x @ weight.T + b
    return float(np.mean((ref - (x[:, keep] @ w_new.T + b_new)) ** 2))


def effective_ridge(stats: LayerStats, ridge: float = 1e-6) -> float:
    """The relative ridge `compensate_layer` uses: larger when the statistics are rank-deficient and not shrunk."""
    return max(ridge, 1e-2 * stats.dim / stats.count) if stats.count <= stats.dim and not stats.shrinkage else ridge


class PrefixSolver:
    """Compensation of one consumer for any prefix of a fixed coordinate order, from one growing Cholesky factor.

    Once channels are in CaP order, the factor of Σ permuted into that order has, as its leading block, the factor of
    Σ_SS for every prefix S (CAP.md §3, Numerics): the search tries many widths and never refactorises. The factor is
    built only as far as the longest prefix asked for so far and extended block-wise when a longer one comes
    (L21 = A21 L11⁻ᵀ, L22 = chol(A22 - L21 L21ᵀ)): a search that starts at the minimum widths and settles near half
    of them factors about an eighth of the matrix (resnet18: the first probe took 10 s with the whole factor).
    """

    GROWTH = 1.25  # an extension reaches at least this multiple of the current size: few extensions per search

    def __init__(self, weight: np.ndarray, stats: LayerStats, order: np.ndarray, ridge: float = 1e-6) -> None:
        sigma = stats.cov
        self.sigma = sigma
        self.order = order
        self.ridge = effective_ridge(stats, ridge) * (float(np.mean(np.diag(sigma))) or 1.0)
        self.low = np.zeros((0, 0))
        p = sigma @ weight.T  # (D, N)
        self.var_old = np.sum(weight * p.T, axis=1)
        self.p = (p + self.ridge * weight.T)[order]  # Σ Wᵀ + λ Wᵀ: the regression-form ridge (compensate_layer)
        self.wmu = weight @ stats.mean
        self.mu = stats.mean

    def _factor(self, kept: int) -> np.ndarray:
        """The factor of the leading `kept` block, extending it when needed (LinAlgError: not positive definite)."""
        import scipy.linalg

        m = self.low.shape[0]
        if kept > m:
            new = min(self.order.size, max(kept, math.ceil(m * self.GROWTH)))
            old_idx, new_idx = self.order[:m], self.order[m:new]
            a22 = self.sigma[np.ix_(new_idx, new_idx)]
            a22[np.diag_indices_from(a22)] += self.ridge
            low = np.zeros((new, new))
            low[:m, :m] = self.low
            if m:
                l21 = scipy.linalg.solve_triangular(self.low, self.sigma[np.ix_(old_idx, new_idx)], lower=True,
                                                    check_finite=False).T  # A21 L11⁻ᵀ
                a22 -= l21 @ l21.T
                low[m:, :m] = l21
            low[m:, m:] = scipy.linalg.cholesky(a22, lower=True, overwrite_a=True, check_finite=False)
            self.low = low
        return self.low[:kept, :kept]

    def solve(self, kept: int, bias: np.ndarray | None, rescale: bool) -> tuple[np.ndarray, np.ndarray]:
        """W' (N, kept) over coordinates `order[:kept]`, and b'."""
        import scipy.linalg

        low = self._factor(kept)
        y = scipy.linalg.solve_triangular(low, self.p[:kept], lower=True, check_finite=False)  # L⁻¹ (Σ_S,: + λ I_S,:) Wᵀ
        x = scipy.linalg.solve_triangular(low.T, y, lower=False, check_finite=False)  # W'ᵀ
        w_new = x.T
        if rescale:  # w'ᵀ Σ_SS w' = w'ᵀ (Σ_SS + λI) w' - λ‖w'‖² = ‖y‖² - λ‖w'‖²
            w_new = rescale_rows(w_new, self.var_old, np.sum(y * y, axis=0) - self.ridge * np.sum(x * x, axis=0))
        b = np.zeros(w_new.shape[0]) if bias is None else bias.astype(np.float64)
        return w_new, b + self.wmu - w_new @ self.mu[self.order[:kept]]
