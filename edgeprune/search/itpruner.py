"""ITPruner allocation (Zheng et al., "An Information Theory-inspired Strategy for Automatic Network Pruning",
arXiv:2108.08532): layer importance by normalised HSIC, widths by a linear program under the resource constraint.

    importance = layer_importance(model, graph, x)                # nHSIC(group's feature maps, network output)
    widths_for = itpruner_widths_fn(graph, importance, cost, multiple=8)
    widths_for(0.0)   # the unpruned widths;  widths_for(1.0): every group at its minimum

The paper scores each layer by the normalised Hilbert-Schmidt Independence Criterion of its activations (the
information bottleneck: what a representation keeps of what the network outputs), then solves, once per resource
constraint and without any search, max Σ_g α_g·x_g over kept width fractions x_g under the budget.

Where this departs from the paper, and why:
  - The budget is latency, not FLOPs: the constraint is the job's latency model of widths (`latency/cost.py`: a latency
    table's prediction with `--lut`, else MACs), relative to the unpruned model. The search's strength u becomes the
    LP's resource bound, 1 - u·(1 - cost(minimum widths)), so that the outer level (`strength.py`) still closes on
    measured latency: the model's latency is what the user asked for, the LP only spreads it over groups.
  - The paper's constraint is quadratic in the widths (FLOPs of a conv are c_in·c_out); `scipy.optimize.linprog`
    takes a linear one, so each group's cost is its secant slope between its whole and its minimum width (the
    others whole). That model ignores the interaction of neighbouring groups, so the LP's widths, rounded down to
    allowed widths (channel multiple, units of grouped convs), are then checked against the real latency model:
    groups are narrowed one step at a time where the least importance per unit of saved latency is lost until the
    bound holds, and the slack rounding left is given back to the groups with the most importance per unit of cost.
  - Feature maps are average-pooled to at most 8x8 before the kernels (their Gram matrices would otherwise hold
    every pixel of every sample: hundreds of MB for a 224x224 model), on at most 128 calibration samples, once per
    job. A group's feature map is its producers' outputs side by side (a residual group has several).
  - The paper's linear-kernel nHSIC (its theorem about mutual information assumes Gaussian activations) is the
    default; `kernel="gaussian"` uses an RBF kernel with the median heuristic for its bandwidth, which keeps nHSIC
    invariant to isotropic scaling as the linear one is.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from edgeprune.dependency.graph import Graph
from edgeprune.errors import EdgePruneError
from edgeprune.inputs.outputs import flatten_outputs
from edgeprune.plan import width_step
from edgeprune.search.allocate import AllocationInputs, WidthsFn, allowed_widths, min_widths

KERNELS = ("linear", "gaussian")
SAMPLES = 128  # calibration samples the importances are computed on
POOL = 8  # feature maps average-pooled to at most POOL x POOL


def centred_gram(x: torch.Tensor, kernel: str = "linear") -> torch.Tensor:
    """H·K·H for the samples in the rows of `x` (N x D), K the linear or Gaussian kernel, H = I - 11ᵀ/N."""
    x = x.reshape(len(x), -1).double()
    gram = x @ x.T
    if kernel == "gaussian":
        sq = torch.diagonal(gram)
        d2 = (sq[:, None] + sq[None, :] - 2 * gram).clamp_min(0)
        off = d2[~torch.eye(len(x), dtype=torch.bool)]
        scale = float(off[off > 0].median()) if bool((off > 0).any()) else 1.0  # median heuristic
        gram = torch.exp(-d2 / scale)
    elif kernel != "linear":
        raise EdgePruneError(f"nHSIC kernel must be {' or '.join(KERNELS)}, found {kernel!r}")
    return gram - gram.mean(0, keepdim=True) - gram.mean(1, keepdim=True) + gram.mean()


def nhsic(x: torch.Tensor, y: torch.Tensor, kernel: str = "linear") -> float:
    """Normalised HSIC, HSIC(X, Y) / sqrt(HSIC(X, X)·HSIC(Y, Y)), in [0, 1]: 1 for X = Y; 0 when either is constant."""
    kx, ky = centred_gram(x, kernel), centred_gram(y, kernel)
    den = float(torch.sqrt((kx * kx).sum() * (ky * ky).sum()))
    return float((kx * ky).sum()) / den if den > 0 else 0.0


def _pooled(t: torch.Tensor) -> torch.Tensor:
    if t.dim() == 4 and (t.shape[2] > POOL or t.shape[3] > POOL):
        t = nn.functional.adaptive_avg_pool2d(t, (min(POOL, t.shape[2]), min(POOL, t.shape[3])))
    return t.detach().reshape(len(t), -1).float()


def feature_maps(model: nn.Module, graph: Graph, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Each group's feature maps (its producers' outputs, pooled, side by side; one row per sample) and the network's
    outputs (every output tensor flattened and joined), from one forward pass of `x`."""
    modules = dict(model.named_modules())
    got: dict[str, list[torch.Tensor]] = {}
    hooks = []
    for name in sorted({p for g in graph.groups for p in g.producers}):
        def hook(mod: nn.Module, args: tuple, out: object, name: str = name) -> None:
            if isinstance(out, torch.Tensor):
                got.setdefault(name, []).append(_pooled(out))
        hooks.append(modules[name].register_forward_hook(hook))
    try:
        with torch.no_grad():
            out = model(x)
    finally:
        for h in hooks:
            h.remove()
    y = torch.cat([t.detach().reshape(len(x), -1).float() for _, t in flatten_outputs(out)], 1)
    maps = {}
    for g in graph.groups:
        parts = [torch.cat(got[p]) for p in g.producers if p in got]
        if parts:
            maps[g.name] = torch.cat(parts, 1)
    return maps, y


def layer_importance(model: nn.Module, graph: Graph, x: torch.Tensor, kernel: str = "linear") -> dict[str, float]:
    """nHSIC between each group's feature maps and the network output (0 for a group whose producers the forward
    pass never showed, which the LP then prunes first)."""
    maps, y = feature_maps(model, graph, x[:SAMPLES])
    return {g.name: nhsic(maps[g.name], y, kernel) if g.name in maps else 0.0 for g in graph.groups}


def lp_widths(graph: Graph, importance: dict[str, float], cost: Callable[[dict[str, int]], float], bound: float,
              multiple: int, min_width: int | None = None) -> dict[str, int]:
    """Allowed widths maximising Σ importance·(kept fraction) with cost(widths) <= bound (`cost` relative: 1.0 for
    the unpruned model): the LP on secant slopes, rounded down, then held to the real cost (see the module)."""
    from scipy.optimize import linprog

    lows = min_widths(graph, multiple, min_width)
    full = {g.name: g.channels for g in graph.groups}
    names = [g.name for g in graph.groups]
    lo_frac = np.array([lows[n] / full[n] for n in names])
    total = cost(full)
    # cost per unit of kept fraction, each group alone between its minimum and its whole width
    slope = np.array([max(total - cost({**full, n: lows[n]}), 1e-12) / max(1 - lo_frac[i], 1e-12)
                      for i, n in enumerate(names)])
    imp = np.array([max(float(importance.get(n, 0.0)), 0.0) for n in names]) + 1e-9
    if bound >= total:
        return dict(full)
    # cost(x) ~ total - Σ slope·(1 - x) <= bound   <=>   -Σ slope·x <= bound - total - Σ slope
    res = linprog(-imp, A_ub=-slope[None, :], b_ub=[bound - total - slope.sum()],
                  bounds=list(zip(lo_frac, np.ones(len(names)))), method="highs")
    frac = res.x if res.status == 0 else lo_frac  # infeasible under the linear model: everything at its minimum
    options = {g.name: allowed_widths(g.channels, width_step(g, multiple), lows[g.name]) for g in graph.groups}
    widths = {}
    for n, f in zip(names, frac):
        fit = [w for w in options[n] if w <= f * full[n] + 1e-6]
        widths[n] = fit[-1] if fit else options[n][0]
    return _hold_to_bound(widths, options, importance, cost, bound, full)


def _hold_to_bound(widths: dict[str, int], options: dict[str, list[int]], importance: dict[str, float],
                   cost: Callable[[dict[str, int]], float], bound: float, full: dict[str, int]) -> dict[str, int]:
    """Narrow (while over `bound`) then widen (while a step fits) one allowed step at a time, choosing by importance
    lost or gained per unit of cost: the LP's widths held to the real latency model."""
    widths = dict(widths)

    def ratio(n: str, new: int, now: float, then: float) -> float:
        return max(float(importance.get(n, 0.0)), 1e-9) * abs(new - widths[n]) / full[n] / max(abs(then - now), 1e-12)

    now = cost(widths)
    while now > bound:
        steps = {n: o[o.index(widths[n]) - 1] for n, o in options.items() if o.index(widths[n]) > 0}
        if not steps:
            return widths  # every group at its minimum: the bound is out of reach
        after = {n: cost({**widths, n: w}) for n, w in steps.items()}
        n = min(steps, key=lambda n: (ratio(n, steps[n], now, after[n]), n))
        widths[n], now = steps[n], after[n]
    while True:
        steps = {n: o[o.index(widths[n]) + 1] for n, o in options.items() if o.index(widths[n]) < len(o) - 1}
        after = {n: cost({**widths, n: w}) for n, w in steps.items()}
        fits = {n: w for n, w in steps.items() if after[n] <= bound}
        if not fits:
            return widths
        n = max(fits, key=lambda n: (ratio(n, fits[n], now, after[n]), n))
        widths[n], now = fits[n], after[n]


def itpruner_widths_fn(graph: Graph, importance: dict[str, float], cost: Callable[[dict[str, int]], float],
                       multiple: int, min_width: int | None = None) -> Callable[[float], dict[str, int]]:
    """u in [0, 1] -> widths: the LP at resource bound cost(full) - u·(cost(full) - cost(minimum widths))."""
    import functools

    lows = min_widths(graph, multiple, min_width)
    full = {g.name: g.channels for g in graph.groups}
    top, bottom = cost(full), cost(lows)

    @functools.cache
    def inner(u: float) -> tuple[tuple[str, int], ...]:
        return tuple(lp_widths(graph, importance, cost, top - u * (top - bottom), multiple, min_width).items())

    return lambda u: dict(lows) if u >= 1.0 else dict(full) if u <= 0.0 else dict(inner(u))


def itpruner_allocation(a: AllocationInputs, kernel: str = "linear") -> WidthsFn:
    """The `itpruner` allocation: importances on the first calibration samples, computed once, then the LP for each
    strength under the latency model `a.cost`."""
    if a.model is None or a.samples is None or a.cost is None:
        raise EdgePruneError("the itpruner allocation needs the model, its calibration samples and a latency model")
    x = torch.from_numpy(a.samples[:SAMPLES].copy())
    importance = layer_importance(a.model, a.graph, x, kernel)
    return itpruner_widths_fn(a.graph, importance, a.cost, a.multiple)
