"""NAP's importance (arXiv:2101.06608): the loss increase of removing a channel, from a Kronecker-factored (K-FAC)
approximation of the Hessian, on one scale across layers.

    g = output_factors(model, graph, [(x, y), ...])        # K-FAC's G of every consumer, from labelled batches
    delta = obs_scores(weight2d, stats.cov, g[name], consumer.coords)   # ΔL of each channel, in loss units

For a layer y = W a + b (a conv's unfolded patches, a linear's features), K-FAC approximates the Hessian of the mean
loss over (W, b) by G ⊗ Ā: G = E_samples[Σ_positions g gᵀ] with g = ∂ℓ/∂y of one sample's loss, and Ā = E[ã ãᵀ] with
ã = (a, 1), over samples and positions. Removing a channel takes its input coordinates J out of every row of W; the
optimal brain surgeon's loss increase with the remaining weights moved optimally (NAP's criterion) is

    ΔL = ½ tr(W_Jᵀ G W_J [(Ā⁻¹)_JJ]⁻¹),   and (Ā⁻¹)_JJ = (Σ⁻¹)_JJ

for Σ the input covariance (a Schur complement: the bias takes the mean), so the covariance CaP collects serves. The
surgeon's update of the other weights, -W_J (Σ⁻¹)_JJ⁻¹ (Σ⁻¹)_J,: , is the least-squares compensation edgeprune applies
(`solve.py`, up to its ridge and variance rescale). A group's channel sums ΔL over its consumers: K-FAC is block
diagonal across layers, and ΔL is in the loss's own units, which is what lets NAP compare channels of all layers.

Where it departs from the paper: NAP prunes in several rounds, re-estimating the curvature and fine-tuning between
them; edgeprune ranks once on the unpruned model (no training here: the repair is closed-form). G is the empirical
Fisher of the calibration labels (or of the unpruned model's own predictions, `--pseudo-labels`), not the Fisher of
labels sampled from the model. A channel is scored as the next layer's input (its consumers' columns), the side whose
removal changes the loss; its producer's filter then computes nothing anyone reads.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import torch
from torch import nn

from edgeprune.dependency.graph import Graph

RIDGE = 1e-6  # relative to the mean input variance: inverts rank-deficient covariances (dead channels)


def cross_entropy_sum(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The summed loss: each sample's gradient is its own loss's (G averages them over samples)."""
    from edgeprune.scoring.signals import logits

    return nn.functional.cross_entropy(logits(out, "criterion nap"), y, reduction="sum")


def dense(m: nn.Module | None) -> bool:
    return isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups == 1)


def output_factors(model: nn.Module, graph: Graph, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                   loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = cross_entropy_sum,
                   names: list[str] | None = None) -> dict[str, np.ndarray]:
    """K-FAC's output factor G = E_samples[Σ_positions g gᵀ] of every dense compensable consumer (or of `names`).

    Gradients are taken with respect to the layers' outputs only (`torch.autograd.grad`): the model's parameters and
    their `.grad` are left as they are."""
    modules = dict(model.named_modules())
    if names is None:
        names = sorted({c.module for g in graph.groups for c in g.consumers
                        if c.compensable and dense(modules.get(c.module))})
    sums = {n: np.zeros((modules[n].weight.shape[0],) * 2) for n in names}
    outs: dict[str, torch.Tensor] = {}

    def hook(name: str) -> Callable:
        def keep(m: nn.Module, args: tuple, out: torch.Tensor) -> None:
            outs[name] = out
        return keep

    handles = [modules[n].register_forward_hook(hook(n)) for n in names]
    count = 0
    try:
        for x, y in batches:
            outs.clear()
            with torch.enable_grad():
                x = x.detach().requires_grad_(True)  # a graph through the layers without touching parameters
                value = loss(model(x), y)
                grads = torch.autograd.grad(value, [outs[n] for n in names], allow_unused=True)
            for n, g in zip(names, grads):
                if g is None:
                    continue
                g = g.detach().double()
                if g.dim() == 4:  # conv: positions summed per sample, then over samples
                    sums[n] += torch.einsum("bohw,bphw->op", g, g).numpy()
                else:
                    g = g.reshape(-1, g.shape[-1])
                    sums[n] += (g.T @ g).numpy()
            count += len(x)
    finally:
        for h in handles:
            h.remove()
    return {n: s / max(count, 1) for n, s in sums.items()}


def obs_scores(weight: np.ndarray, cov: np.ndarray, g: np.ndarray, items: tuple[tuple[int, ...], ...],
               ridge: float = RIDGE) -> np.ndarray:
    """ΔL = ½ tr(W_Jᵀ G W_J [(Σ⁻¹)_JJ]⁻¹) for each item's coordinates J (see the module docstring).

    Args:
        weight: (N, D) float64, the consumer's weight in unfold order.
        cov: (D, D) covariance of its unfolded input.
        g: (N, N) K-FAC output factor.
    """
    d = cov.shape[0]
    scale = float(np.mean(np.diag(cov))) or 1.0
    prec = np.linalg.inv(cov + ridge * scale * np.eye(d))
    out = np.zeros(len(items))
    for i, coords in enumerate(items):
        j = np.asarray(coords, dtype=np.int64)
        wj = weight[:, j]
        curv = wj.T @ g @ wj  # (|J|, |J|)
        out[i] = 0.5 * float(np.trace(np.linalg.solve(prec[np.ix_(j, j)], curv)))
    return np.maximum(out, 0.0)
