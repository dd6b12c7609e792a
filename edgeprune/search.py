"""Binary structural search with a step constraint, closed by measured latency (CAP.md §0 and §5).

Inner level: a `strength` s (the total tolerated loss) becomes per-group widths. Groups are taken in forward order;
after group i of L the network may have spent at most s·(i+1)/L of residual loss, or of squared output error for the
fidelity proxy (the step constraint), and each group takes the smallest width, in steps of the channel multiple, whose
loss fits in what is left, so slack carries forward. Outer level: s is searched against a latency oracle until the
latency lies in [(1 - tol)·C, C], where C is the budget less a noise margin of k standard errors of the figure.

    result = search(widths_for, oracle, budget_ms=10.0)

The oracle is only a callable: `pipeline.py` gives it a measured one (prune, export, simplify, measure on the
target) or a lookup-table one.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from edgeprune.errors import EdgePruneError
from edgeprune.graph import Graph
from edgeprune.importance import Ranking
from edgeprune.plan import round_width

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Probe:
    """One oracle answer: a latency, where it came from (measured | cache | lut | baseline), and how far to trust it.

    `spread` is the figure's relative standard error (std of the repeat medians / median / sqrt(repeats)); 0 takes
    the figure as exact, as for a latency table.
    """

    latency_ms: float
    source: str
    spread: float = 0.0


@dataclass(frozen=True)
class Candidate:
    step: int
    strength: float  # normalised search variable u in [0, 1]: 0 is the unpruned model, 1 every group at its minimum
    widths_digest: str
    latency_ms: float
    source: str
    widths: dict[str, int] = field(compare=False, repr=False)
    spread: float = 0.0  # relative standard error of latency_ms, see Probe
    error: float | None = None  # proxy error of the widths (lower is more faithful), when the search can compute it

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("widths")
        return d


@dataclass(frozen=True)
class SearchResult:
    best: Candidate | None  # the most faithful candidate within budget, noise margin included (None when none met it)
    fastest: Candidate  # the lowest latency reached
    trace: tuple[Candidate, ...]
    budget_ms: float
    converged: bool  # a candidate landed in the band [(1 - tol)·C, C], C = budget / (1 + k·spread)


def widths_digest(widths: dict[str, int]) -> str:
    return hashlib.sha256(json.dumps(sorted(widths.items())).encode()).hexdigest()[:12]


def min_widths(graph: Graph, multiple: int, min_width: int | None = None) -> dict[str, int]:
    return {g.name: min(g.channels, max(multiple, min_width or multiple)) for g in graph.groups}


def allowed_widths(channels: int, multiple: int, lo: int) -> list[int]:
    """Widths a group may take: multiples of `multiple` from `lo`, and the original width."""
    ws = list(range(lo, channels, multiple)) if lo < channels else []
    return sorted(set(ws + [channels]))


def step_constrained_widths(graph: Graph, rankings: dict[str, Ranking], strength: float, multiple: int,
                            min_width: int | None = None) -> dict[str, int]:
    """Widths for a total tolerated loss `strength`, under the step constraint (forward order, slack carried)."""
    lows = min_widths(graph, multiple, min_width)
    n = len(graph.groups)
    used = 0.0
    widths = {}
    for i, g in enumerate(graph.groups):
        loss = rankings[g.name].loss
        options = allowed_widths(g.channels, multiple, lows[g.name])
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
    return {g.name: round_width(g.channels * (1 - strength), g.channels, multiple, lows[g.name]) for g in graph.groups}


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
        options = allowed_widths(g.channels, multiple, lows[g.name])
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
        options = allowed_widths(g.channels, multiple, lows[g.name])

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


PROXIES = ("loss", "fidelity")
ALLOCATIONS = ("step", "latency")


def make_widths_fn(graph: Graph, rankings: dict[str, Ranking], multiple: int, min_width: int | None = None,
                   error: Callable[[dict[str, int]], float] | None = None, allocation: str = "step",
                   cost: Callable[[dict[str, int]], float] | None = None) -> Callable[[float], dict[str, int]]:
    """u in [0, 1] -> widths, with s = s_max·u² (resolution where losses are small; s is in squared-error units for
    both proxies).

    The proxy is the network's output error when `error` is given (`fidelity`), else the CaP loss curves (`loss`);
    criteria without curves fall back to removing the same fraction of every group. `allocation` "latency" (needs
    `cost`, a latency model of widths) trades the proxy against latency instead of the step constraint, with
    λ = λ0·(u / (1 - u))² (see `latency_aware_widths`).
    """
    import functools

    if allocation not in ALLOCATIONS:
        raise EdgePruneError(f"allocation must be {' or '.join(ALLOCATIONS)}, found {allocation!r}")
    has_curves = all(g.name in rankings and rankings[g.name].loss is not None for g in graph.groups)
    if allocation == "latency" and cost is not None and (error is not None or has_curves):
        return _latency_widths_fn(graph, rankings, multiple, min_width, error, cost)
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
    if not has_curves:
        lows = min_widths(graph, multiple, min_width)
        top = max(1 - lows[g.name] / g.channels for g in graph.groups)
        return lambda u: uniform_strength_widths(graph, u * top, multiple, min_width)
    s_max = strength_scale(graph, rankings, multiple, min_width)
    return lambda u: step_constrained_widths(graph, rankings, s_max * u * u, multiple, min_width)


def _latency_widths_fn(graph: Graph, rankings: dict[str, Ranking], multiple: int, min_width: int | None,
                       error: Callable[[dict[str, int]], float] | None,
                       cost: Callable[[dict[str, int]], float]) -> Callable[[float], dict[str, int]]:
    """make_widths_fn's "latency" allocation: u = 0 the unpruned model, u = 1 every group at its minimum, and between
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


@dataclass(frozen=True)
class _Band:
    """Where a figure stands against the budget, with a noise margin of k standard errors.

    A figure is feasible only when it stays within budget at k standard errors above it; the target band keeps its
    relative width under that margined ceiling, so that noise larger than the tolerance does not leave it empty.
    """

    budget_ms: float
    tolerance: float
    k: float

    def ceiling(self, spread: float) -> float:
        return self.budget_ms / (1 + self.k * spread)

    def feasible(self, c: Candidate | Probe) -> bool:
        return c.latency_ms <= self.ceiling(c.spread)

    def in_band(self, c: Candidate | Probe) -> bool:
        return (1 - self.tolerance) * self.ceiling(c.spread) <= c.latency_ms <= self.ceiling(c.spread)

    def ambiguous(self, p: Probe) -> bool:
        """The budget lies within k standard errors of the figure: one figure cannot tell on which side it is."""
        return p.latency_ms * (1 - self.k * p.spread) <= self.budget_ms < p.latency_ms * (1 + self.k * p.spread)

    def log_aim(self, spread: float) -> float:
        """The middle of the band for a figure of this spread (budget·(1 - tol/2) for an exact one)."""
        return math.log(self.ceiling(spread) * (1 - self.tolerance / 2))


def _combine(a: Probe, b: Probe) -> Probe:
    """Two figures of the same model: their mean, with the standard error of a mean of two."""
    source = f"{a.source} x2" if a.source == b.source else f"{a.source}+{b.source}"
    return Probe((a.latency_ms + b.latency_ms) / 2, source, math.hypot(a.spread, b.spread) / 2)


def _pick_best(feasible: list[Candidate]) -> Candidate | None:
    """The feasible candidate with the lowest proxy error (ties: the slower, less pruned one). Without errors, the
    least pruned by strength label, although widths are not monotone in u."""
    if not feasible:
        return None
    if all(c.error is not None for c in feasible):
        return min(feasible, key=lambda c: (c.error, -c.latency_ms))
    return min(feasible, key=lambda c: (c.strength, -c.latency_ms))


class _Prober:
    """The measuring side of one search: each widths setting is measured once (twice when remeasure is given and
    its first figure cannot decide against the budget), and every candidate is recorded in order."""

    def __init__(self, band: _Band, oracle: Callable[[dict[str, int]], Probe], max_steps: int,
                 known: dict[str, Probe] | None, remeasure: Callable[[dict[str, int]], Probe] | None,
                 error_of: Callable[[dict[str, int]], float] | None, on_step: Callable[[Candidate], None] | None):
        self.band, self.oracle, self.max_steps, self.known = band, oracle, max_steps, known or {}
        self.remeasure, self.error_of, self.on_step = remeasure, error_of, on_step
        self.trace: list[Candidate] = []
        self.seen: dict[str, Candidate] = {}
        self.remeasured = 0
        self.last_spread = 0.0  # of the oracle's last single figure: the next one will be about as noisy

    def spent(self) -> int:
        """Measurements so far, remeasurements included (a known figure counts as one, as it always has)."""
        return len(self.trace) + self.remeasured

    def exhausted(self) -> bool:
        return self.spent() >= self.max_steps

    def __call__(self, u: float, widths: dict[str, int]) -> Candidate:
        digest = widths_digest(widths)
        if digest in self.seen:
            return self.seen[digest]
        if digest in self.known:
            p = self.known[digest]
        else:
            p = self.oracle(widths)
            self.last_spread = p.spread
        # a second figure only where max_steps has room for it besides this one
        if self.remeasure is not None and self.band.ambiguous(p) and self.spent() + 2 <= self.max_steps:
            p = _combine(p, self.remeasure(widths))
            self.remeasured += 1
        error = self.error_of(widths) if self.error_of is not None else None
        c = Candidate(step=len(self.trace) + 1, strength=round(u, 6), widths_digest=digest, latency_ms=p.latency_ms,
                      source=p.source, widths=widths, spread=p.spread, error=error)
        self.trace.append(c)
        self.seen[digest] = c
        if self.on_step is not None:
            self.on_step(c)
        log.info("search step %d: u=%.4f latency %.3f ms ±%.1f%% (%s), budget %.3f", c.step, u, c.latency_ms,
                 100 * c.spread, c.source, self.band.budget_ms)
        return c

    def result(self, converged: bool) -> SearchResult:
        fastest = min(self.trace, key=lambda c: c.latency_ms)
        best = _pick_best([c for c in self.trace if self.band.feasible(c)])
        return SearchResult(best=best, fastest=fastest, trace=tuple(self.trace), budget_ms=self.band.budget_ms,
                            converged=converged)


def _narrow_strength(probe: _Prober, widths_for: Callable[[float], dict[str, int]], lo: Candidate,
                     hi: Candidate) -> tuple[bool, float, float]:
    """Narrow the u-bracket [0, 1] by regula falsi on log latency(u) (pruning makes latency fall roughly
    geometrically in u), aiming at the middle of the band. Returns (landed in the band, u_lo, u_hi).

    Illinois modification: when the same end is retained twice in a row, its value is halved for the interpolation,
    so that a curve whose latency drops late in u cannot keep the step pinned next to the other end (a plain regula
    falsi then creeps by the clamp's 10% of the bracket per measurement). The interpolation fraction stays within
    [0.1, 0.9] as a safeguard against a figure that noise put on the wrong side of the aim.

    This is not "never slower than bisection" on every budget: where a bisection midpoint happens to fall in the
    band, bisection lands sooner. Over budgets from 0.31x to 0.95x on synthetic curves (geometric, late drop, early
    drop) it takes fewer measurements on average and never more than bisection's worst case (tests/test_search.py).
    """
    band = probe.band
    u_lo, l_lo, u_hi, l_hi = 0.0, lo.latency_ms, 1.0, hi.latency_ms
    weight_lo = weight_hi = 1.0
    kept = ""  # the end the last step retained
    # once the bracket is within 2% of u, neighbouring strengths differ by a group or two, and measurement noise (a few
    # % on a CPU) decides more than u does: the group bisection takes over
    while not probe.exhausted() and u_hi - u_lo > max(1e-4, 0.02 * u_hi):
        aim = band.log_aim(probe.last_spread)
        f_lo = weight_lo * max(math.log(max(l_lo, 1e-9)) - aim, 1e-12)  # a prediction can be ~0, never a crash
        f_hi = weight_hi * min(math.log(max(l_hi, 1e-9)) - aim, -1e-12)
        u = u_lo + min(0.9, max(0.1, f_lo / (f_lo - f_hi))) * (u_hi - u_lo)
        c = probe(u, widths_for(u))
        if band.in_band(c):
            return True, u_lo, u_hi
        if band.feasible(c):
            u_hi, l_hi, weight_hi = u, c.latency_ms, 1.0
            weight_lo *= 0.5 if kept == "lo" else 1.0
            kept = "lo"
        else:
            u_lo, l_lo, weight_lo = u, c.latency_ms, 1.0
            weight_hi *= 0.5 if kept == "hi" else 1.0
            kept = "hi"
        if widths_digest(widths_for(u_lo)) == widths_digest(widths_for(u_hi)):
            break  # the bracket holds one width setting: nothing between to try
    return False, u_lo, u_hi


def _bisect_groups(probe: _Prober, w_lo: dict[str, int], w_hi: dict[str, int], u_lo: float, u_hi: float) -> bool:
    """Bisect on how many of the groups that differ between the bracket ends, in forward order, take the slower
    side's widths; True when a candidate lands in the band.

    The u-bracket closes on a jump when one step in u changes several groups at once (the step constraint carries
    slack forward, so a narrower early group leaves later ones wider) and no strength lands in the band.
    """
    diff = [g for g in w_hi if w_lo[g] != w_hi[g]]
    a, b = 0, len(diff)  # a: widths known within budget, b: known over it
    while b - a > 1 and not probe.exhausted():
        k = (a + b) // 2
        c = probe(u_hi - (u_hi - u_lo) * k / len(diff), {**w_hi, **{g: w_lo[g] for g in diff[:k]}})
        if probe.band.in_band(c):
            return True
        if probe.band.feasible(c):
            a = k
        else:
            b = k
    return False


def search(
    widths_for: Callable[[float], dict[str, int]],
    oracle: Callable[[dict[str, int]], Probe],
    budget_ms: float,
    tolerance: float = 0.05,
    max_steps: int = 12,
    on_step: Callable[[Candidate], None] | None = None,
    known: dict[str, Probe] | None = None,
    *,
    margin_k: float = 2.0,
    remeasure: Callable[[dict[str, int]], Probe] | None = None,
    error_of: Callable[[dict[str, int]], float] | None = None,
) -> SearchResult:
    """Find the most faithful widths whose oracle latency is within budget, noise margin included.

    Brackets with u = 0 (the unpruned model) and u = 1 (every group at its minimum), narrows u with an Illinois
    regula falsi on log latency (see `_narrow_strength`), then bisects over the groups that differ between the bracket
    ends. A figure counts as within budget only when latency·(1 + margin_k·spread) <= budget, and the search stops in
    the band [(1 - tolerance)·C, C] under that ceiling C. A figure whose ±margin_k·spread straddles the budget is
    measured once more with `remeasure` (not the cache), when given, and the mean of the two enters the trace;
    remeasurements count towards `max_steps`. `best` is the feasible candidate with the lowest `error_of(widths)`
    when given, else the one with the lowest strength u. Candidates whose widths repeat are not measured again, nor
    those in `known` (widths digest -> probe: the build's baseline measurement of the unpruned model, the u = 0
    bracket).

        result = search(widths_for, oracle, budget_ms=10.0, remeasure=oracle, error_of=error)
        print(result.best.widths if result.best else result.fastest.latency_ms)
    """
    if budget_ms <= 0:
        raise EdgePruneError(f"latency budget must be positive, found {budget_ms} ms")
    band = _Band(budget_ms, tolerance, margin_k)
    probe = _Prober(band, oracle, max_steps, known, remeasure, error_of, on_step)
    lo = probe(0.0, widths_for(0.0))
    if band.feasible(lo):
        return probe.result(True)  # nothing to prune
    hi = probe(1.0, widths_for(1.0))
    if not band.feasible(hi):
        return probe.result(False)
    if band.in_band(hi):
        return probe.result(True)
    landed, u_lo, u_hi = _narrow_strength(probe, widths_for, lo, hi)
    if landed:
        return probe.result(True)
    return probe.result(_bisect_groups(probe, widths_for(u_lo), widths_for(u_hi), u_lo, u_hi))
