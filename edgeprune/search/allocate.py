"""Inner level of the width search: a strength u in [0, 1] becomes per-group widths (CAP.md §5).

    widths_for = latency_allocation(AllocationInputs(graph, rankings, multiple=8, error=proxy_error, cost=cost))
    widths_for(0.0)   # the unpruned widths;  widths_for(1.0): every group at its minimum

Allocations: `step`, the step constraint (groups in forward order; after group i of L the network may have spent at
most s·(i+1)/L of residual loss, or of squared output error for the fidelity proxy, and each group takes the smallest
width, in steps of the channel multiple, whose loss fits in what is left, so slack carries forward), and `latency`
(error + λ·latency cost per group, see `latency_aware_widths`); `registry.ALLOCATIONS` names them and the others. The
outer level (`strength.py`) searches u against a latency oracle.
"""

from __future__ import annotations

import bisect
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from torch import nn

from edgeprune.dependency.graph import Graph
from edgeprune.plan import round_width, width_step
from edgeprune.scoring.base import Ranking


def widths_digest(widths: dict[str, int]) -> str:
    return hashlib.sha256(json.dumps(sorted(widths.items())).encode()).hexdigest()[:12]


def min_widths(graph: Graph, multiple: int, min_width: int | None = None) -> dict[str, int]:
    """Each group's narrowest width: one step (see `plan.width_step`), or `min_width` rounded up to steps."""
    out = {}
    for g in graph.groups:
        step = width_step(g, multiple)
        out[g.name] = min(g.channels, max(step, -(-(min_width or step) // step) * step))
    return out


def allowed_widths(channels: int, multiple: int, lo: int) -> list[int]:
    """Widths a group may take: multiples of `multiple` from `lo`, and the original width."""
    ws = list(range(lo, channels, multiple)) if lo < channels else []
    return sorted(set(ws + [channels]))


def width_options(graph: Graph, multiple: int, min_width: int | None = None) -> dict[str, list[int]]:
    """Each group's admissible widths (`allowed_widths` in its own step, from its minimum): what the search may try
    for one group between two width settings."""
    lows = min_widths(graph, multiple, min_width)
    return {g.name: allowed_widths(g.channels, width_step(g, multiple), lows[g.name]) for g in graph.groups}


def step_constrained_widths(graph: Graph, rankings: dict[str, Ranking], strength: float, multiple: int,
                            min_width: int | None = None) -> dict[str, int]:
    """Widths for a total tolerated loss `strength`, under the step constraint (forward order, slack carried)."""
    lows = min_widths(graph, multiple, min_width)
    n = len(graph.groups)
    used = 0.0
    widths = {}
    for i, g in enumerate(graph.groups):
        loss = rankings[g.name].loss
        options = allowed_widths(g.channels, width_step(g, multiple), lows[g.name])
        if loss is None:
            widths[g.name] = g.channels
            continue
        left = strength * (i + 1) / n - used
        # the curve is non-increasing in width: bisect for the smallest width whose loss fits
        losses = [loss[w] for w in options]
        j = bisect.bisect_left([-x for x in losses], -left)  # first option with loss <= left
        j = min(j, len(options) - 1)
        widths[g.name] = options[j]
        used += losses[j]
    return widths


def uniform_strength_widths(graph: Graph, strength: float, multiple: int, min_width: int | None = None) -> dict[str, int]:
    """Fallback for criteria without a loss curve: remove the same fraction `strength` of every group."""
    lows = min_widths(graph, multiple, min_width)
    return {g.name: round_width(g.channels * (1 - strength), g.channels, width_step(g, multiple), lows[g.name]) for g in graph.groups}


def strength_scale(graph: Graph, rankings: dict[str, Ranking], multiple: int, min_width: int | None = None) -> float:
    """A strength at which every group reaches its minimum width."""
    lows = min_widths(graph, multiple, min_width)
    worst = max((rankings[g.name].loss[lows[g.name]] for g in graph.groups if rankings[g.name].loss is not None),
                default=0.0)
    return max(worst, 1e-12) * len(graph.groups) * 1.0001


def fidelity_widths(graph: Graph, strength: float, multiple: int, error: Callable[[dict[str, int]], float],
                    min_width: int | None = None) -> dict[str, int]:
    """Inner level on output fidelity (CAP.md §5): per group in forward order, bisect for the smallest width whose
    network error (earlier groups at their chosen widths, later ones whole) has a square within strength·(i+1)/L.

    The schedule is linear in squared error because independent errors add in squares: a schedule linear in the norm
    would give group i an increment of squared error proportional to 2i + 1 and favour pruning late groups.
    """
    lows = min_widths(graph, multiple, min_width)
    widths = {g.name: g.channels for g in graph.groups}
    n = len(graph.groups)
    for i, g in enumerate(graph.groups):
        options = allowed_widths(g.channels, width_step(g, multiple), lows[g.name])
        limit = strength * (i + 1) / n
        lo, hi = 0, len(options) - 1  # the whole width always fits: it adds no error to what is already spent
        while lo < hi:
            mid = (lo + hi) // 2
            if error({**widths, g.name: options[mid]}) ** 2 <= limit:
                hi = mid
            else:
                lo = mid + 1
        widths[g.name] = options[hi]
    return widths


def latency_aware_widths(graph: Graph, lam: float, multiple: int, penalty: Callable[[dict[str, int]], float],
                         cost: Callable[[dict[str, int]], float], min_width: int | None = None) -> dict[str, int]:
    """Inner level that weighs error against latency (issue 13): per group in forward order, the width that minimises
    penalty(widths) + lam·cost(widths), earlier groups at their chosen widths and later ones whole.

    `penalty` is the network's squared output error (fidelity proxy) or the summed CaP losses (loss proxy), `cost`
    a latency model relative to the unpruned model (a latency table's prediction, or MACs): the step constraint gives
    every group the same share of error whatever it saves, where this gives the error to the groups whose channels
    cost most. Options are scanned coarse to fine (`_argmin_options`), so a group of 64 widths costs about 20
    evaluations, not 64.
    """
    lows = min_widths(graph, multiple, min_width)
    widths = {g.name: g.channels for g in graph.groups}
    for g in graph.groups:
        options = allowed_widths(g.channels, width_step(g, multiple), lows[g.name])

        def objective(j: int, name: str = g.name, options: list[int] = options) -> float:
            w = {**widths, name: options[j]}
            return penalty(w) + lam * cost(w)

        widths[g.name] = options[_argmin_options(objective, len(options))]
    return widths


def _argmin_options(objective: Callable[[int], float], n: int, coarse: int = 8) -> int:
    """The index in range(n) minimising a unimodal `objective`: scan every ⌈width/coarse⌉-th index of the interval
    (and its last), keep the interval within one stride of the best, repeat down to stride 1; exhaustive for
    n <= coarse + 1, about 20 evaluations for 64 options. Ties go to the larger index (the wider, less pruned width),
    so that an error the proxy cannot resolve never prunes."""
    seen: dict[int, float] = {}

    def key(j: int) -> tuple[float, int]:
        if j not in seen:
            seen[j] = objective(j)
        return seen[j], -j

    lo, hi = 0, n - 1
    while True:
        stride = max(1, -(-(hi - lo) // coarse))
        best = min([*range(lo, hi + 1, stride), hi], key=key)
        if stride == 1:
            return best
        lo, hi = max(lo, best - stride + 1), min(hi, best + stride - 1)


WidthsFn = Callable[[float], dict[str, int]]  # u in [0, 1] -> widths: 0 the unpruned model, 1 every group at minimum


@dataclass(frozen=True)
class AllocationInputs:
    """What an allocation (`registry.ALLOCATIONS`) turns into a widths function: the groups and their rankings, the
    channel multiple and minimum width, the proxy (`error`: the network's output error by widths; None: the CaP loss
    curves), a latency model of widths relative to the unpruned model (`cost`), and for the allocations that read
    feature maps the model and its calibration samples."""

    graph: Graph
    rankings: dict[str, Ranking]
    multiple: int
    min_width: int | None = None
    error: Callable[[dict[str, int]], float] | None = None
    cost: Callable[[dict[str, int]], float] | None = None
    model: nn.Module | None = None
    samples: np.ndarray | None = None

    def has_curves(self) -> bool:
        return all(g.name in self.rankings and self.rankings[g.name].loss is not None for g in self.graph.groups)


def step_allocation(a: AllocationInputs) -> WidthsFn:
    """`step`: u in [0, 1] -> widths, with s = s_max·u² (resolution where losses are small; s is in squared-error
    units for both proxies) under the step constraint.

    The proxy is the network's output error when `a.error` is given (`fidelity`), else the CaP loss curves (`loss`);
    criteria without curves fall back to removing the same fraction of every group.
    """
    import functools

    graph, multiple, min_width, error = a.graph, a.multiple, a.min_width, a.error
    if error is not None:
        memo: dict[str, float] = {}

        def cached(widths: dict[str, int]) -> float:
            key = widths_digest(widths)
            if key not in memo:
                memo[key] = error(widths)
            return memo[key]

        # at u = 1 every group may reach its minimum: each step's share covers the squared error of all groups at
        # minimum (the schedule is in squared error, see fidelity_widths)
        s_max = max(cached(min_widths(graph, multiple, min_width)) ** 2, 1e-12) * len(graph.groups) * 1.0001
        inner = functools.lru_cache(maxsize=None)(
            lambda u: fidelity_widths(graph, s_max * u * u, multiple, cached, min_width))
        lows = min_widths(graph, multiple, min_width)
        # u = 1 is every group at its minimum by definition: where errors are not monotone (slicing without a repair
        # saturates near 1), pruning one group alone can cost more than pruning all, and the schedule then left
        # groups wide at u = 1 (an L1 build called a budget unreachable that the minimum widths met)
        return lambda u: dict(lows) if u >= 1.0 else dict(inner(u))
    if not a.has_curves():
        lows = min_widths(graph, multiple, min_width)
        top = max(1 - lows[g.name] / g.channels for g in graph.groups)
        return lambda u: uniform_strength_widths(graph, u * top, multiple, min_width)
    s_max = strength_scale(graph, a.rankings, multiple, min_width)
    return lambda u: step_constrained_widths(graph, a.rankings, s_max * u * u, multiple, min_width)


def latency_allocation(a: AllocationInputs) -> WidthsFn:
    """`latency-joint`: the proxy traded against the latency model `a.cost` instead of the step constraint, with
    λ = λ0·(u / (1 - u))² (see `latency_aware_widths`); without a latency model, or without a proxy (no error and no
    loss curves), the step allocation."""
    if a.cost is None or (a.error is None and not a.has_curves()):
        return step_allocation(a)
    return _latency_widths_fn(a.graph, a.rankings, a.multiple, a.min_width, a.error, a.cost)


def separable_latency_allocation(a: AllocationInputs) -> WidthsFn:
    """`latency` (the default on real data) with the proxy's error read as separable: a plan's squared error the sum
    of each narrowed group's squared error alone, `error({every group whole, g: w})**2` (independent errors add in
    squares, see `fidelity_widths`). Each (group, width) is evaluated once for every strength the outer level tries,
    replayed from the group's own first layer rather than from the first narrowed group's. `latency-joint`
    (`latency_allocation`) judges each group with the earlier ones at their chosen widths: a proxy run per group,
    width and strength. A/B, both on a quiet machine: EfficientNet-Lite0 (pretrained, 640 photo crops) at 0.7x: the
    proxy took 64 s instead of 195 s (the build 205 s instead of 339 s), agreement with the unpruned model on 300
    crops of held-out photos 44.3% against 39.7% (at 0.68x and 0.66x); FashionNet (tools.bench_accuracy, seed 0) kept
    99.3 / 98.1 / 95.4% of its test accuracy at 0.43 / 0.29 / 0.17x against 99.3 / 98.2 / 95.1% at 0.44 / 0.29 /
    0.19x. Each group's curve is run on at most `SEPARABLE_GRID` widths (`_AloneCurve`): on Lite0 159 proxy runs
    instead of 333, the proxy 35 s instead of 60 s, the build 113 s; agreement on the held-out crops 42.0% against
    44.3% (300 crops: a standard error of about 2.9 points), KL divergence 0.812 against 0.814; FashionNet's and the
    example's groups have at most 9 admissible widths, so their curves are run whole, as before."""
    if a.cost is None or a.error is None:
        return latency_allocation(a)
    error, full = a.error, {g.name: g.channels for g in a.graph.groups}
    curves = {name: _AloneCurve(opts, lambda w, n=name: error({**full, n: w}) ** 2, SEPARABLE_GRID)
              for name, opts in width_options(a.graph, a.multiple, a.min_width).items()}

    def sum_alone(widths: dict[str, int]) -> float:
        return sum(curves[g](w) for g, w in widths.items() if w < full[g]) ** 0.5

    return _latency_widths_fn(a.graph, a.rankings, a.multiple, a.min_width, sum_alone, a.cost)


SEPARABLE_GRID = 9  # widths per group the separable allocation runs the proxy on; between them, interpolated


class _AloneCurve:
    """One group's squared error alone by width: the proxy run on at most `grid` of its admissible widths, evenly
    spaced by index (the narrowest and the whole width among them; the whole width costs nothing: no error), and a
    monotone cubic (SciPy's PCHIP) through them elsewhere. Smooth, so the allocation's argmin can fall between grid
    widths; monotone, so it never invents a dip that the proxy did not see. Evaluated lazily: a group the search
    never narrows runs nothing."""

    def __init__(self, options: list[int], run: Callable[[int], float], grid: int) -> None:
        n = len(options)
        self.options, self.run, self.index = options, run, {w: j for j, w in enumerate(options)}
        self.grid = sorted({round(j * (n - 1) / (grid - 1)) for j in range(grid)}) if n > grid else list(range(n))
        self.values: dict[int, float] = {}
        self.fit: Callable[[float], float] | None = None

    def _at(self, j: int) -> float:
        if j not in self.values:
            self.values[j] = 0.0 if j == len(self.options) - 1 else float(self.run(self.options[j]))
        return self.values[j]

    def __call__(self, w: int) -> float:
        j = self.index[w]
        if j in self.grid:
            return self._at(j)
        if self.fit is None:
            from scipy.interpolate import PchipInterpolator

            self.fit = PchipInterpolator(self.grid, [self._at(i) for i in self.grid])
        return max(float(self.fit(j)), 0.0)


def _latency_widths_fn(graph: Graph, rankings: dict[str, Ranking], multiple: int, min_width: int | None,
                       error: Callable[[dict[str, int]], float] | None,
                       cost: Callable[[dict[str, int]], float]) -> Callable[[float], dict[str, int]]:
    """The "latency" allocations: u = 0 the unpruned model, u = 1 every group at its minimum, and between
    them λ from λ0·(u/(1-u))², λ0 the penalty of the minimum widths per unit of the latency they save."""
    import functools

    memo: dict[str, float] = {}

    def penalty(widths: dict[str, int]) -> float:
        key = widths_digest(widths)
        if key not in memo:
            if error is not None:
                memo[key] = error(widths) ** 2
            else:
                memo[key] = sum(float(rankings[g].loss[w]) for g, w in widths.items())  # type: ignore[index]
        return memo[key]

    lows = min_widths(graph, multiple, min_width)
    full = {g.name: g.channels for g in graph.groups}
    saved = max(cost(full) - cost(lows), 1e-12)
    lam0 = max(penalty(lows) - penalty(full), 1e-12) / saved

    @functools.lru_cache(maxsize=None)
    def inner(u: float) -> tuple[tuple[str, int], ...]:
        lam = lam0 * (u / (1 - u)) ** 2
        return tuple(latency_aware_widths(graph, lam, multiple, penalty, cost, min_width).items())

    return lambda u: dict(lows) if u >= 1.0 else dict(full) if u <= 0.0 else dict(inner(u))
