"""Binary structural search with a step constraint, closed by measured latency (CAP.md §0 and §5).

Inner level: a `strength` s (the total tolerated loss) becomes per-group widths. Groups are taken in forward order;
after group i of L the network may have spent at most s·(i+1)/L of residual loss (the step constraint), and each group
takes the smallest width, in steps of the channel multiple, whose CaP loss fits in what is left, so slack carries
forward. Outer level: s is searched against a latency oracle until the latency lies in [(1 - tol)·budget, budget].

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
    """One oracle answer: a latency and where it came from (measured | cache | lut | baseline)."""

    latency_ms: float
    source: str


@dataclass(frozen=True)
class Candidate:
    step: int
    strength: float  # normalised search variable u in [0, 1]: 0 is the unpruned model, 1 every group at its minimum
    widths_digest: str
    latency_ms: float
    source: str
    widths: dict[str, int] = field(compare=False, repr=False)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("widths")
        return d


@dataclass(frozen=True)
class SearchResult:
    best: Candidate | None  # the widest candidate within budget (None when nothing met it)
    fastest: Candidate  # the lowest latency reached
    trace: tuple[Candidate, ...]
    budget_ms: float
    converged: bool  # a candidate landed in [(1 - tol)·budget, budget]


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
    network error (earlier groups at their chosen widths, later ones whole) stays within strength·(i+1)/L."""
    lows = min_widths(graph, multiple, min_width)
    widths = {g.name: g.channels for g in graph.groups}
    n = len(graph.groups)
    for i, g in enumerate(graph.groups):
        options = allowed_widths(g.channels, multiple, lows[g.name])
        limit = strength * (i + 1) / n
        lo, hi = 0, len(options) - 1  # the whole width always fits: it adds no error to what is already spent
        while lo < hi:
            mid = (lo + hi) // 2
            if error({**widths, g.name: options[mid]}) <= limit:
                hi = mid
            else:
                lo = mid + 1
        widths[g.name] = options[hi]
    return widths


PROXIES = ("loss", "fidelity")


def make_widths_fn(graph: Graph, rankings: dict[str, Ranking], multiple: int, min_width: int | None = None,
                   error: Callable[[dict[str, int]], float] | None = None) -> Callable[[float], dict[str, int]]:
    """u in [0, 1] -> widths, with s = s_max·u² (resolution where losses are small).

    The proxy is the network's output error when `error` is given (`fidelity`), else the CaP loss curves (`loss`);
    criteria without curves fall back to removing the same fraction of every group.
    """
    import functools

    if error is not None:
        memo: dict[str, float] = {}

        def cached(widths: dict[str, int]) -> float:
            key = widths_digest(widths)
            if key not in memo:
                memo[key] = error(widths)
            return memo[key]

        # at u = 1 every group may reach its minimum: each step's share covers the error of all groups at minimum
        s_max = max(cached(min_widths(graph, multiple, min_width)), 1e-12) * len(graph.groups) * 1.0001
        inner = functools.lru_cache(maxsize=None)(
            lambda u: fidelity_widths(graph, s_max * u * u, multiple, cached, min_width))
        return lambda u: dict(inner(u))
    has_curves = all(rankings[g.name].loss is not None for g in graph.groups)
    if not has_curves:
        lows = min_widths(graph, multiple, min_width)
        top = max(1 - lows[g.name] / g.channels for g in graph.groups)
        return lambda u: uniform_strength_widths(graph, u * top, multiple, min_width)
    s_max = strength_scale(graph, rankings, multiple, min_width)
    return lambda u: step_constrained_widths(graph, rankings, s_max * u * u, multiple, min_width)


def search(
    widths_for: Callable[[float], dict[str, int]],
    oracle: Callable[[dict[str, int]], Probe],
    budget_ms: float,
    tolerance: float = 0.05,
    max_steps: int = 12,
    on_step: Callable[[Candidate], None] | None = None,
    known: dict[str, Probe] | None = None,
) -> SearchResult:
    """Find the widest widths whose oracle latency is within budget.

    Brackets with u = 0 (the unpruned model) and u = 1 (every group at its minimum), then narrows with a safeguarded
    regula falsi on latency: faster than bisection when latency is smooth in u, never slower than a bisection step.
    Candidates whose widths repeat are not measured again, nor those in `known` (widths digest -> probe: the build's
    baseline measurement of the unpruned model, which is the u = 0 bracket).
    """
    if budget_ms <= 0:
        raise EdgePruneError(f"latency budget must be positive, found {budget_ms} ms")
    trace: list[Candidate] = []
    seen: dict[str, Candidate] = {}

    def probe(u: float, widths: dict[str, int] | None = None) -> Candidate:
        widths = widths_for(u) if widths is None else widths
        digest = widths_digest(widths)
        if digest in seen:
            return seen[digest]
        p = known[digest] if known and digest in known else oracle(widths)
        c = Candidate(step=len(trace) + 1, strength=round(u, 6), widths_digest=digest, latency_ms=p.latency_ms,
                      source=p.source, widths=widths)
        trace.append(c)
        seen[digest] = c
        if on_step is not None:
            on_step(c)
        log.info("search step %d: u=%.4f latency %.3f ms (%s), budget %.3f", c.step, u, c.latency_ms, c.source, budget_ms)
        return c

    def in_band(c: Candidate) -> bool:
        return (1 - tolerance) * budget_ms <= c.latency_ms <= budget_ms

    def done(converged: bool) -> SearchResult:
        fastest = min(trace, key=lambda c: c.latency_ms)
        feasible = [c for c in trace if c.latency_ms <= budget_ms]
        best = min(feasible, key=lambda c: (c.strength, -c.latency_ms)) if feasible else None  # least pruned
        return SearchResult(best=best, fastest=fastest, trace=tuple(trace), budget_ms=budget_ms, converged=converged)

    lo = probe(0.0)
    if lo.latency_ms <= budget_ms:
        return done(True)  # nothing to prune
    hi = probe(1.0)
    if hi.latency_ms > budget_ms:
        return done(False)
    if in_band(hi):
        return done(True)
    u_lo, l_lo, u_hi, l_hi = 0.0, lo.latency_ms, 1.0, hi.latency_ms
    # once the bracket is within 2% of u, neighbouring strengths differ by a group or two, and measurement noise (a few
    # % on a CPU) decides more than u does: the group bisection below takes over
    while len(trace) < max_steps and u_hi - u_lo > max(1e-4, 0.02 * u_hi):
        # regula falsi on log latency(u) (pruning makes latency fall roughly geometrically in u), aiming at the
        # middle of the target band and kept inside the middle 80% of the bracket
        aim = math.log(budget_ms * (1 - tolerance / 2))
        log_lo, log_hi = math.log(max(l_lo, 1e-9)), math.log(max(l_hi, 1e-9))  # a prediction can be ~0, never a crash
        frac = (log_lo - aim) / max(log_lo - log_hi, 1e-12)
        frac = min(0.9, max(0.1, frac))
        u = u_lo + frac * (u_hi - u_lo)
        c = probe(u)
        if c.latency_ms <= budget_ms:
            u_hi, l_hi = u, c.latency_ms
            if in_band(c):
                return done(True)
        else:
            u_lo, l_lo = u, c.latency_ms
        if widths_digest(widths_for(u_lo)) == widths_digest(widths_for(u_hi)):
            break  # the bracket holds one width setting: nothing between to try
    # The bracket closed on a jump: one step in u changes several groups at once (the step constraint carries slack
    # forward, so a narrower early group leaves later ones wider) and no strength lands in the band. Bisect instead on
    # how many of the differing groups, in forward order, take the slower side's widths.
    w_lo, w_hi = widths_for(u_lo), widths_for(u_hi)
    diff = [g for g in w_hi if w_lo[g] != w_hi[g]]
    a, b = 0, len(diff)  # a: widths known within budget, b: known over it
    while b - a > 1 and len(trace) < max_steps:
        k = (a + b) // 2
        c = probe(u_hi - (u_hi - u_lo) * k / len(diff), {**w_hi, **{g: w_lo[g] for g in diff[:k]}})
        if c.latency_ms <= budget_ms:
            a = k
            if in_band(c):
                return done(True)
        else:
            b = k
    return done(False)
