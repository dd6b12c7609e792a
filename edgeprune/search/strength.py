"""Binary structural search with a step constraint, closed by measured latency (CAP.md §0 and §5).

Inner level (`search/allocate.py`): a strength u becomes per-group widths. Outer level (here): u is searched against a
latency oracle until the latency lies in [(1 - tol)·C, C], where C is the budget less a noise margin of k standard
errors of the figure.

    result = search(widths_for, oracle, budget_ms=10.0)

The oracle is only a callable: `jobs/build_job.py` gives it a measured one (prune, export, simplify, measure on the
target) or a lookup-table one.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from edgeprune.errors import EdgePruneError
from edgeprune.search.allocate import widths_digest

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



@dataclass(frozen=True)
class Band:
    """Where a figure stands against the budget, with a noise margin of k standard errors.

    A figure is feasible only when it stays within budget at k standard errors above it; the target band keeps its
    relative width under that margined ceiling, so that noise larger than the tolerance does not leave it empty. The
    band never reaches below `floor` of the budget, however wide the spread: a figure whose spread pulled the ceiling
    that far down says little, and mobilenetv3_small_050 (0.7x) was released at 0.80 of its budget on a figure of
    11% spread, one step after a tight one at 0.92 fell 0.3% under the band; the search goes on instead, and
    `pick_best` releases the slowest feasible candidate.
    """

    budget_ms: float
    tolerance: float = 0.05
    k: float = 2.0  # BuildConfig.margin_k's default
    floor: float = 0.85

    def ceiling(self, spread: float) -> float:
        return self.budget_ms / (1 + self.k * spread)

    def feasible(self, c: Candidate | Probe) -> bool:
        return c.latency_ms <= self.ceiling(c.spread)

    def in_band(self, c: Candidate | Probe) -> bool:
        low = max((1 - self.tolerance) * self.ceiling(c.spread), self.floor * self.budget_ms)
        return low <= c.latency_ms <= self.ceiling(c.spread)

    def ambiguous(self, p: Probe) -> bool:
        """The budget lies within k standard errors of the figure: one figure cannot tell on which side it is."""
        return p.latency_ms * (1 - self.k * p.spread) <= self.budget_ms < p.latency_ms * (1 + self.k * p.spread)

    def log_aim(self, spread: float) -> float:
        """The middle of the band for a figure of this spread (budget·(1 - tol/2) for an exact one)."""
        return math.log(self.ceiling(spread) * (1 - self.tolerance / 2))


def _combine(a: Probe, b: Probe) -> Probe:
    """Two figures of the same model: their inverse-variance weighted mean and its standard error (a tight figure
    counts for more than a noisy one); the plain mean of two when either has no spread to weigh by."""
    source = f"{a.source} x2" if a.source == b.source else f"{a.source}+{b.source}"
    va, vb = (a.spread * a.latency_ms) ** 2, (b.spread * b.latency_ms) ** 2
    if va <= 0 or vb <= 0:
        return Probe((a.latency_ms + b.latency_ms) / 2, source, math.hypot(a.spread, b.spread) / 2)
    wa, wb = 1 / va, 1 / vb
    mean = (wa * a.latency_ms + wb * b.latency_ms) / (wa + wb)
    return Probe(mean, source, math.sqrt(1 / (wa + wb)) / mean)


def pick_best(feasible: list[Candidate]) -> Candidate | None:
    """The feasible candidate with the lowest proxy error (ties: the slower, less pruned one). Without errors, the
    slowest (ties: the lowest strength label): the least pruned by what the device says, where the strength label
    is not monotone in widths (mobilenetv3_small_050: u = 0.5027 measured 0.80 of the budget, u = 0.5077 0.92)."""
    if not feasible:
        return None
    if all(c.error is not None for c in feasible):
        return min(feasible, key=lambda c: (c.error, -c.latency_ms))
    return min(feasible, key=lambda c: (-c.latency_ms, c.strength))


class _Prober:
    """The measuring side of one search: each widths setting is measured once (twice when remeasure is given and
    its first figure cannot decide against the budget), and every candidate is recorded in order."""

    def __init__(self, band: Band, oracle: Callable[[dict[str, int]], Probe], max_steps: int,
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
        # a second figure only where max_steps has room for it besides this one, and never of a known figure: the
        # build's baseline was measured in this run, and the oracle has no candidate file of it to measure again
        if (self.remeasure is not None and digest not in self.known and self.band.ambiguous(p)
                and self.spent() + 2 <= self.max_steps):
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
        best = pick_best([c for c in self.trace if self.band.feasible(c)])
        return SearchResult(best=best, fastest=fastest, trace=tuple(self.trace), budget_ms=self.band.budget_ms,
                            converged=converged)


def _predicted_u(widths_for: Callable[[float], dict[str, int]], predict: Callable[[dict[str, int]], float],
                 lo: tuple[float, float], hi: tuple[float, float], aim_ms: float, steps: int = 12) -> float:
    """The strength in the bracket (`lo`, `hi`: u and measured latency, over and within budget) whose widths a
    latency model predicts at `aim_ms`: the model (`predict`) mapped linearly onto the two measured ends, then
    bisected in u (latency falls with u). Costs widths_for calls only, no measurement: where the allocation is cheap
    to run again (the separable latency allocation, whose proxy runs are bounded per group; the step constraint on
    loss curves) each measured step lands near the aim, where a regula falsi on u assumed a geometric curve
    (EfficientNet-Lite0 at 0.7x: its first step, u = 0.14, measured 0.91x of the unpruned latency; the model's
    first step 0.70x)."""
    (u_lo, l_lo), (u_hi, l_hi) = lo, hi
    p_lo, p_hi = predict(widths_for(u_lo)), predict(widths_for(u_hi))
    if not p_lo > p_hi:
        return (u_lo + u_hi) / 2

    def latency(u: float) -> float:
        return l_hi + (l_lo - l_hi) * (predict(widths_for(u)) - p_hi) / (p_lo - p_hi)

    a, b = u_lo, u_hi
    for _ in range(steps):
        m = (a + b) / 2
        a, b = (m, b) if latency(m) > aim_ms else (a, m)
    return round((a + b) / 2, 6)


def _narrow_strength(probe: _Prober, widths_for: Callable[[float], dict[str, int]], lo: Candidate,
                     hi: Candidate, u_lo: float = 0.0, u_hi: float = 1.0,
                     predict: Callable[[dict[str, int]], float] | None = None) -> tuple[bool, float, float]:
    """Narrow the u-bracket [u_lo, u_hi] (lo over budget, hi within it) by regula falsi on log latency(u) (pruning
    makes latency fall roughly geometrically in u), aiming at the middle of the band. Returns (landed in the band,
    u_lo, u_hi).

    Illinois modification: when the same end is retained twice in a row, its value is halved for the interpolation,
    so that a curve whose latency drops late in u cannot keep the step pinned next to the other end (a plain regula
    falsi then creeps by the clamp's 10% of the bracket per measurement). The interpolation fraction stays within
    [0.1, 0.9] as a safeguard against a figure that noise put on the wrong side of the aim.

    This is not "never slower than bisection" on every budget: where a bisection midpoint happens to fall in the
    band, bisection lands sooner. Over budgets from 0.31x to 0.95x on synthetic curves (geometric, late drop, early
    drop) it takes fewer measurements on average and never more than bisection's worst case
    (tests/search/test_strength.py).
    """
    band = probe.band
    l_lo, l_hi = lo.latency_ms, hi.latency_ms
    weight_lo = weight_hi = 1.0
    kept = ""  # the end the last step retained
    # once the bracket is within 2% of u, neighbouring strengths differ by a group or two, and measurement noise (a few
    # % on a CPU) decides more than u does: the group bisection takes over
    while not probe.exhausted() and u_hi - u_lo > max(1e-4, 0.02 * u_hi):
        aim = band.log_aim(probe.last_spread)
        if predict is not None:  # a latency model's aim (`_predicted_u`) in place of the interpolation in u
            u = _predicted_u(widths_for, predict, (u_lo, l_lo), (u_hi, l_hi), math.exp(aim))
            u = min(u_hi - 0.02 * (u_hi - u_lo), max(u_lo + 0.02 * (u_hi - u_lo), u))
        else:
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


_Step = tuple[dict[str, int], str, int, float]  # widths within budget, the group, its width over budget, a label u


def _bisect_groups(probe: _Prober, w_lo: dict[str, int], w_hi: dict[str, int], u_lo: float, u_hi: float,
                   options: Callable[[str], Sequence[int]] | None = None) -> tuple[bool, _Step | None]:
    """Bisect on how many of the groups that differ between the bracket ends, in forward order, take the slower
    side's widths; True when a candidate lands in the band. When the two settings either side of the budget then
    differ in one group only, bisect on that group's width (`_bisect_width`, with `options`); when that cannot land
    either, the step it ends on: the setting within budget, the group, its narrowest width over budget, the label u
    of that setting.

    The u-bracket closes on a jump when one step in u changes several groups at once (the step constraint carries
    slack forward, so a narrower early group leaves later ones wider) and no strength lands in the band.
    """
    diff = [g for g in w_hi if w_lo[g] != w_hi[g]]
    landed, a, b = _bisect(probe, 0, len(diff), lambda k: (u_hi - (u_hi - u_lo) * k / len(diff),
                                                          {**w_hi, **{g: w_lo[g] for g in diff[:k]}}))
    if landed or b - a != 1 or options is None or probe.exhausted():
        return landed, None
    within = {**w_hi, **{g: w_lo[g] for g in diff[:a]}}
    u_a, u_b = u_hi - (u_hi - u_lo) * a / len(diff), u_hi - (u_hi - u_lo) * b / len(diff)
    landed, over = _bisect_width(probe, within, diff[a], w_lo[diff[a]], options(diff[a]), u_a, u_b)
    return landed, (None if landed else (within, diff[a], over, u_a))


def _bisect_width(probe: _Prober, within: dict[str, int], group: str, slow: int, options: Sequence[int],
                  u_fast: float, u_slow: float) -> tuple[bool, int]:
    """Bisect on the width of `group` between `within[group]` (those widths are within budget) and `slow` (over
    it), over the widths it may take (`options`). Returns (landed in the band, the narrowest width found over it).

    The latency allocation is piecewise constant in its λ and can move one group from wide to narrow at a single λ
    (FashionNet at 0.3x: 0.159 ms to 0.112 ms for a 0.159 ms budget between u = 0.506 and 0.511, one group): without
    the widths in between, the release landed at 0.72 of the budget with 4 of 12 measurements unspent.
    """
    fast = within[group]
    between = sorted((w for w in options if min(fast, slow) < w < max(fast, slow)), key=lambda w: abs(w - fast))
    # index -1 is `fast` (within budget), len(between) is `slow` (over it)
    landed, _, b = _bisect(probe, -1, len(between), lambda k: (
        u_fast + (u_slow - u_fast) * (k + 1) / (len(between) + 1), {**within, group: between[k]}))
    return landed, (between[b] if b < len(between) else slow)


def _hold_step(probe: _Prober, widths_for: Callable[[float], dict[str, int]], step: _Step) -> bool:
    """When one group's narrowing is a latency step across the whole band (no admissible width between), hold that
    group at its width over budget and narrow the others further, along the allocation (u from the step to 1, with
    the group held), in the measurements left; True when a candidate lands in the band.

    FashionNet at 0.3x: `down1.0` from 32 to 16 channels took 30% of the latency (0.167 to 0.114 ms; widths are
    multiples of 16), and the release landed at 0.72 of its budget. The narrower settings this finds are pruned
    elsewhere, so they only win where the proxy error says they are more faithful (`pick_best`)."""
    within, group, over_width, u_step = step
    over = probe.seen.get(widths_digest({**within, group: over_width}))
    # the held settings lie on another allocation path, so their strength labels do not compare with the others':
    # without a proxy error to choose by, they could never be released, and would only spend measurements
    if over is None or probe.error_of is None or probe.exhausted():
        return False

    def held(u: float) -> dict[str, int]:
        return {**widths_for(u), group: over_width}

    hi = probe(1.0, held(1.0))
    if not probe.band.feasible(hi):
        return False
    if probe.band.in_band(hi):
        return True
    landed, u_lo, u_hi = _narrow_strength(probe, held, over, hi, u_step, 1.0)
    return landed or _bisect_groups(probe, held(u_lo), held(u_hi), u_lo, u_hi)[0]


def _bisect(probe: _Prober, a: int, b: int, setting: Callable[[int], tuple[float, dict[str, int]]]
            ) -> tuple[bool, int, int]:
    """Bisect an index between `a` (its setting within budget) and `b` (over it); `setting(k)` is the (strength
    label, widths) of index k. Returns (landed in the band, a, b) when it lands, the indices meet or steps run out."""
    while b - a > 1 and not probe.exhausted():
        k = (a + b) // 2
        c = probe(*setting(k))
        if probe.band.in_band(c):
            return True, a, b
        if probe.band.feasible(c):
            a = k
        else:
            b = k
    return False, a, b


def search(
    widths_for: Callable[[float], dict[str, int]],
    oracle: Callable[[dict[str, int]], Probe],
    budget_ms: float | Band,
    *,
    max_steps: int = 12,
    on_step: Callable[[Candidate], None] | None = None,
    known: dict[str, Probe] | None = None,
    remeasure: Callable[[dict[str, int]], Probe] | None = None,
    error_of: Callable[[dict[str, int]], float] | None = None,
    options: Callable[[str], Sequence[int]] | None = None,
    predict: Callable[[dict[str, int]], float] | None = None,
) -> SearchResult:
    """Find the most faithful widths whose oracle latency is within budget, noise margin included.

    Brackets with u = 0 (the unpruned model) and u = 1 (every group at its minimum), narrows u with an Illinois
    regula falsi on log latency (see `_narrow_strength`), then bisects over the groups that differ between the bracket
    ends, and, given `options` (a group's admissible widths), over the width of the one group left between them; when
    that group's narrowing steps over the whole band, it holds the group wider and narrows the others (`_hold_step`,
    with `error_of` only). `budget_ms` is a `Band` (the budget, its tolerance and noise margin k) or the budget alone
    (tolerance 0.05, k 2). A figure counts as within budget only when latency·(1 + k·spread) <= budget, and
    the search stops in the band [(1 - tolerance)·C, C] under that ceiling C. A figure whose ±k·spread
    straddles the budget is measured once more with `remeasure` (not the cache), when given, and the mean of the two
    enters the trace;
    remeasurements count towards `max_steps`. `best` is the feasible candidate with the lowest `error_of(widths)`
    when given, else the one with the lowest strength u. `predict` (a latency model of widths, relative to the
    unpruned ones) aims every step between the brackets (`_predicted_u`). Candidates whose widths repeat are not
    measured again, nor
    those in `known` (widths digest -> probe: the build's baseline measurement of the unpruned model, the u = 0
    bracket).

        result = search(widths_for, oracle, budget_ms=10.0, remeasure=oracle, error_of=error)
        print(result.best.widths if result.best else result.fastest.latency_ms)
    """
    band = budget_ms if isinstance(budget_ms, Band) else Band(budget_ms)
    if band.budget_ms <= 0:
        raise EdgePruneError(f"latency budget must be positive, found {band.budget_ms} ms")
    probe = _Prober(band, oracle, max_steps, known, remeasure, error_of, on_step)
    lo = probe(0.0, widths_for(0.0))
    if band.feasible(lo):
        return probe.result(True)  # nothing to prune
    hi = probe(1.0, widths_for(1.0))
    if not band.feasible(hi):
        return probe.result(False)
    if band.in_band(hi):
        return probe.result(True)
    landed, u_lo, u_hi = _narrow_strength(probe, widths_for, lo, hi, predict=predict)
    if landed:
        return probe.result(True)
    landed, step = _bisect_groups(probe, widths_for(u_lo), widths_for(u_hi), u_lo, u_hi, options)
    return probe.result(landed or (step is not None and _hold_step(probe, widths_for, step)))
