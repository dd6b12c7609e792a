from __future__ import annotations

import math
import random
from collections.abc import Callable

import pytest

from edgeprune.config import parse_budget
from edgeprune.dependency.graph import Graph, Group
from edgeprune.errors import EdgePruneError
from edgeprune.scoring.base import Ranking
from edgeprune.search.allocate import (AllocationInputs, WidthsFn, allowed_widths, fidelity_widths, min_widths,
                                       step_allocation, step_constrained_widths, uniform_strength_widths, width_options,
                                       widths_digest)
from edgeprune.search.strength import Band, Candidate, Probe, search


def toy_graph(widths: list[int]) -> Graph:
    return Graph(groups=[Group(name=f"g{i}", channels=c, producers=(f"g{i}",), consumers=(), members=())
                         for i, c in enumerate(widths)])


def curve(c: int, sharp: float) -> Ranking:
    """A convex, non-increasing loss curve: loss[k] = (1 - k/c)^sharp."""
    return Ranking(order=tuple(range(c)), loss=tuple((1 - k / c) ** sharp for k in range(c + 1)))


def step_fn(graph: Graph, rankings: dict[str, Ranking], multiple: int, **options: object) -> WidthsFn:
    """The `step` allocation's widths function."""
    return step_allocation(AllocationInputs(graph, rankings, multiple, **options))  # type: ignore[arg-type]


def latency_of(graph: Graph):
    """Latency proportional to the products of consecutive widths (a conv chain's MACs), plus a fixed overhead."""
    def f(widths: dict[str, int]) -> Probe:
        w = [widths[g.name] for g in graph.groups]
        return Probe(0.05 + sum(a * b for a, b in zip([3] + w, w)) / 1e4, "measured")
    return f


def test_step_constraint_spends_at_most_the_budget_per_step() -> None:
    g = toy_graph([64, 64, 128, 128])
    ranks = {gr.name: curve(gr.channels, 2.0) for gr in g.groups}
    s = 0.4
    widths = step_constrained_widths(g, ranks, s, multiple=8)
    used = 0.0
    for i, gr in enumerate(g.groups):
        used += ranks[gr.name].loss[widths[gr.name]]
        assert used <= s * (i + 1) / len(g.groups) + 1e-12
        assert widths[gr.name] % 8 == 0 and 8 <= widths[gr.name] <= gr.channels


def test_step_constrained_widths_shrink_with_strength() -> None:
    g = toy_graph([64, 96, 128])
    ranks = {gr.name: curve(gr.channels, 1.5) for gr in g.groups}
    prev = None
    for s in [0.0, 0.1, 0.3, 0.6, 1.0, 3.0]:
        w = step_constrained_widths(g, ranks, s, multiple=16)
        if prev is not None:
            assert all(w[k] <= prev[k] for k in w)
        prev = w
    assert step_constrained_widths(g, ranks, 0.0, 16) == {"g0": 64, "g1": 96, "g2": 128}


def test_uniform_widths_fallback_without_curves() -> None:
    g = toy_graph([64, 100])
    w = uniform_strength_widths(g, 0.5, multiple=16)
    assert w == {"g0": 32, "g1": 48}
    fn = step_fn(g, {gr.name: Ranking(order=tuple(range(gr.channels))) for gr in g.groups}, 16)
    assert fn(0.0) == {"g0": 64, "g1": 100} and fn(1.0) == {"g0": 16, "g1": 16}


def test_allowed_widths_include_original_and_multiples() -> None:
    assert allowed_widths(40, 16, 16) == [16, 32, 40]


@pytest.mark.parametrize("fraction", [0.7, 0.5, 0.3])
def test_search_lands_in_band(fraction: float) -> None:
    g = toy_graph([64, 128, 256, 256])
    ranks = {gr.name: curve(gr.channels, 1.5) for gr in g.groups}
    oracle = latency_of(g)
    base = oracle({gr.name: gr.channels for gr in g.groups}).latency_ms
    budget = fraction * base
    calls = []
    res = search(step_fn(g, ranks, 8), lambda w: (calls.append(w), oracle(w))[1], budget,
                 max_steps=12)
    assert res.best is not None and res.best.latency_ms <= budget
    assert res.best.latency_ms >= 0.85 * budget
    assert len(res.trace) <= 12 and len(calls) == len(res.trace)
    assert len({c.widths_digest for c in res.trace}) == len(res.trace)  # never the same widths twice
    assert res.trace[0].strength == 0.0 and math.isclose(res.trace[0].latency_ms, base)


def test_search_takes_known_baseline_without_calling_the_oracle() -> None:
    g = toy_graph([64, 128, 256, 256])
    ranks = {gr.name: curve(gr.channels, 1.5) for gr in g.groups}
    oracle = latency_of(g)
    full = {gr.name: gr.channels for gr in g.groups}
    base = oracle(full).latency_ms
    calls = []
    res = search(step_fn(g, ranks, 8), lambda w: (calls.append(w), oracle(w))[1], 0.5 * base,
                 known={widths_digest(full): Probe(base, "baseline")})
    assert full not in calls  # the unpruned model is never measured by the search
    assert res.trace[0].source == "baseline" and res.trace[0].latency_ms == base
    assert len(calls) == len(res.trace) - 1
    assert res.best is not None and 0.95 * 0.5 * base <= res.best.latency_ms <= 0.5 * base


def test_search_does_not_remeasure_a_known_baseline_when_its_figure_straddles_the_budget() -> None:
    """A noisy baseline (spread 30%) straddles a 0.7x budget: it is still not measured again (the measured oracle has
    no candidate file of the unpruned model; asking for one stopped a yolo11n build with exit 2)."""
    g = toy_graph([64, 128, 256, 256])
    ranks = {gr.name: curve(gr.channels, 1.5) for gr in g.groups}
    oracle = latency_of(g)
    full = {gr.name: gr.channels for gr in g.groups}
    base = oracle(full).latency_ms
    again = []
    res = search(step_fn(g, ranks, 8), oracle, 0.7 * base, known={widths_digest(full): Probe(base, "baseline",
                 0.3)}, remeasure=lambda w: (again.append(w), oracle(w))[1])
    assert full not in again and res.trace[0].source == "baseline" and res.best is not None


def test_search_unreachable_budget_reports_fastest() -> None:
    g = toy_graph([64, 64])
    ranks = {gr.name: curve(gr.channels, 1.0) for gr in g.groups}
    res = search(step_fn(g, ranks, 8), latency_of(g), budget_ms=0.01)
    assert res.best is None and len(res.trace) == 2
    assert res.fastest.widths == {"g0": 8, "g1": 8}


def test_search_nothing_to_prune_when_base_meets_budget() -> None:
    g = toy_graph([32])
    res = search(step_fn(g, {"g0": curve(32, 1.0)}, 8), latency_of(g), budget_ms=100.0)
    assert res.best is not None and res.best.strength == 0.0 and len(res.trace) == 1


@pytest.mark.parametrize("text,ms,relative", [("10ms", 10.0, False), ("2.5ms", 2.5, False), ("800us", 0.8, False),
                                              ("0.5x", 0.5, True), ("1s", 1000.0, False)])
def test_parse_budget(text: str, ms: float, relative: bool) -> None:
    b = parse_budget(text)
    assert b.relative == relative and math.isclose(b.ms(1.0), ms)


@pytest.mark.parametrize("text", ["10", "fast", "-3ms", "1.5x", "0x"])
def test_parse_budget_rejects(text: str) -> None:
    with pytest.raises(EdgePruneError, match="--latency"):
        parse_budget(text)


def network_error(graph: Graph):
    """A non-additive output error: each group's loss, amplified by how much the groups before it lost."""
    def f(widths: dict[str, int]) -> float:
        err, scale = 0.0, 1.0
        for g in graph.groups:
            lost = (1 - widths[g.name] / g.channels) ** 2
            err += scale * lost
            scale *= 1 + lost
        return err
    return f


def test_fidelity_inner_level_keeps_the_step_constraint_with_the_smallest_widths() -> None:
    g = toy_graph([64, 96, 128, 64])
    err = network_error(g)
    calls: list[dict[str, int]] = []

    def counted(w: dict[str, int]) -> float:
        calls.append(dict(w))
        return err(w)

    s, n = 0.3, len(g.groups)
    widths = fidelity_widths(g, s, 16, counted)
    full = {gr.name: gr.channels for gr in g.groups}
    for i, gr in enumerate(g.groups):
        prefix = {**full, **{x.name: widths[x.name] for x in g.groups[: i + 1]}}
        assert err(prefix) ** 2 <= s * (i + 1) / n + 1e-12  # the step constraint, on the squared network error
        if widths[gr.name] > 16:  # and no narrower option would have kept it
            narrower = {**prefix, gr.name: widths[gr.name] - 16}
            assert err(narrower) ** 2 > s * (i + 1) / n
    # bisection, not a scan: at most ceil(log2(options)) evaluations per group
    assert len(calls) <= sum(math.ceil(math.log2(len(allowed_widths(gr.channels, 16, 16)))) for gr in g.groups)


def test_fidelity_widths_fn_spans_unpruned_to_minimum_and_shrinks_with_u() -> None:
    g = toy_graph([64, 96, 128])
    fn = step_fn(g, {}, 16, error=network_error(g))
    assert fn(0.0) == {gr.name: gr.channels for gr in g.groups}
    assert fn(1.0) == min_widths(g, 16)
    prev = fn(0.0)
    for u in (0.2, 0.4, 0.6, 0.8, 1.0):
        w = fn(u)
        assert all(w[k] <= prev[k] for k in w) and w != fn(0.0)
        prev = w


def test_search_bisects_over_groups_when_widths_jump_across_the_band() -> None:
    """widths_for jumps from all-wide to all-narrow at one strength: the strength bisection alone cannot land in the
    band, the per-group bisection that follows does."""
    g = toy_graph([64] * 32)
    wide, narrow = {gr.name: 64 for gr in g.groups}, {gr.name: 16 for gr in g.groups}
    oracle = lambda w: Probe(sum(w.values()) / 100, "measured")  # noqa: E731 - latency proportional to total width
    r = search(lambda u: wide if u < 0.5 else narrow, oracle, budget_ms=12.0)  # 5.12 to 20.48 ms
    assert r.converged and r.best is not None and 11.4 <= r.best.latency_ms <= 12.0
    assert len(r.trace) <= 12 and r.best.strength < 0.5


def test_search_bisects_one_groups_width_when_it_alone_jumps_across_the_band() -> None:
    """One group goes from 128 to 16 channels at a single strength (the latency allocation is piecewise constant in
    its λ): with the group's admissible widths the search tries the widths in between and lands in the band; without
    them the best it has is far under the budget (the FashionNet 0.3x release at 0.72 of its budget)."""
    g = toy_graph([64, 128, 64])
    wide, narrow = {"g0": 32, "g1": 128, "g2": 32}, {"g0": 32, "g1": 16, "g2": 32}
    oracle = lambda w: Probe(sum(w.values()) / 100, "measured")  # noqa: E731 - 0.80 ms to 1.92 ms
    widths_for = lambda u: {gr.name: gr.channels for gr in g.groups} if u == 0 else (wide if u < 0.5 else narrow)  # noqa: E731
    r = search(widths_for, oracle, budget_ms=1.5, options=width_options(g, 16).__getitem__)
    assert r.converged and r.best is not None and 1.425 <= r.best.latency_ms <= 1.5
    assert r.best.widths["g1"] not in (16, 128) and len(r.trace) <= 12
    r = search(widths_for, oracle, budget_ms=1.5)
    assert not r.converged and r.best is not None and r.best.latency_ms == 0.8


def test_search_holds_a_group_whose_narrowing_steps_over_the_band_and_narrows_the_others() -> None:
    """g1 from 32 to 16 channels (multiples of 16: no width between) takes the latency from over the budget to far
    under it at any setting of the others (FashionNet 0.3x: `down1.0`, 30% of the latency in one step). Holding g1 at
    32 and narrowing the others along the allocation lands in the band; without the group's widths (no width
    bisection, no hold) the best is far under the budget."""
    g = toy_graph([64, 32, 64])

    def widths_for(u: float) -> dict[str, int]:  # g1 narrows first, the others from 48 after it
        w = 64 if u < 0.3 else 48 if u < 0.7 else 32 if u < 0.9 else 16
        return {"g0": w, "g1": 32 if u < 0.5 else 16, "g2": w}

    oracle = lambda w: Probe((2 * w["g0"] + 5 * w["g1"] + 2 * w["g2"]) / 100, "measured")  # noqa: E731 - 4.16 to 1.44 ms
    def error_of(w: dict[str, int]) -> float:  # g1's channels matter three times as much as the others'
        return (1 - w["g0"] / 64) ** 2 + 3 * (1 - w["g1"] / 32) ** 2 + (1 - w["g2"] / 64) ** 2

    r = search(widths_for, oracle, budget_ms=3.0, error_of=error_of,
               options=width_options(g, 16).__getitem__)
    assert r.converged and r.best is not None and 2.85 <= r.best.latency_ms <= 3.0
    assert r.best.widths == {"g0": 32, "g1": 32, "g2": 32} and len(r.trace) <= 12
    # without a proxy error the held settings could not be chosen (their labels u lie on another path): no hold
    r = search(widths_for, oracle, budget_ms=3.0, options=width_options(g, 16).__getitem__)
    assert not r.converged and all(c.widths["g1"] == 16 or c.widths["g0"] >= 48 for c in r.trace)
    r = search(widths_for, oracle, budget_ms=3.0, error_of=error_of)
    assert not r.converged and r.best is not None and r.best.latency_ms == 2.72


def test_fidelity_schedule_in_squared_error_gives_each_group_an_equal_share() -> None:
    """Independent per-group errors add in squares: the schedule in squared error gives identical groups the same
    width, where a schedule linear in the error's norm (emulated by handing fidelity_widths the square root of the
    error) gives group i a squared-error increment proportional to 2i + 1 and prunes late groups more."""
    g = toy_graph([64] * 4)
    err = lambda w: math.sqrt(sum((1 - w[x.name] / x.channels) ** 2 for x in g.groups))  # noqa: E731
    shares = [(1 - w / 64) ** 2 for w in fidelity_widths(g, 0.2, 1, err).values()]
    assert all(0.04 <= sh <= 0.06 for sh in shares)  # 0.2 / 4 each, up to one channel of quantisation
    assert all(sum(shares[: i + 1]) <= 0.05 * (i + 1) + 1e-12 for i in range(4))
    in_norm = [(1 - w / 64) ** 2 for w in fidelity_widths(g, 0.2, 1, lambda w: math.sqrt(err(w))).values()]
    assert in_norm == sorted(in_norm) and in_norm[3] >= 4 * in_norm[0]  # 1 : 3 : 5 : 7 up to quantisation


CURVES: dict[str, Callable[[float], float]] = {
    "geometric": lambda u: 10 * math.exp(-1.2 * u),
    "late drop": lambda u: 10 * (1 - 0.7 * u ** 4),
    "early drop": lambda u: 10 * (0.3 + 0.7 * (1 - u) ** 6),
}


def by_strength(u: float) -> dict[str, int]:
    """One synthetic group whose width encodes u, so that distinct strengths have distinct widths digests."""
    return {"g": round(u * 1e6)}


def strength_of(widths: dict[str, int]) -> float:
    return widths["g"] / 1e6


def exact_oracle(curve: Callable[[float], float]) -> Callable[[dict[str, int]], Probe]:
    return lambda w: Probe(curve(strength_of(w)), "measured")


def bisection_measurements(curve: Callable[[float], float], budget: float, tolerance: float = 0.05,
                           max_steps: int = 12) -> int:
    """The reference: plain bisection on u, measuring the brackets u = 0 and u = 1 as the search does."""
    lo, hi, n = 0.0, 1.0, 2
    while n < max_steps:
        u = (lo + hi) / 2
        n += 1
        lat = curve(u)
        if (1 - tolerance) * budget <= lat <= budget:
            return n
        lo, hi = (lo, u) if lat <= budget else (u, hi)
    return n


@pytest.mark.parametrize("name", list(CURVES))
def test_search_needs_no_more_measurements_than_bisection(name: str) -> None:
    """Noise-free curves, budgets 0.31x to 0.95x. The Illinois step removes the stall of the clamped regula falsi on
    the late-drop curve (9 measurements at 0.7x and 11 at 0.9x before, 7 and 8 now). On a single budget bisection can
    still be luckier, when one of its first midpoints happens to fall in the band (late drop at 0.7x and 0.9x: 6 and
    5), so the comparison is over the budgets: fewer measurements on average, never more than bisection's worst case,
    and at most 4 more than bisection on any budget (before: up to 6 more on the late- and early-drop curves)."""
    curve = CURVES[name]
    budgets = [10 * f / 100 for f in range(31, 96) if curve(1.0) <= 10 * f / 100]
    ours = [len(search(by_strength, exact_oracle(curve), b).trace) for b in budgets]
    ref = [bisection_measurements(curve, b) for b in budgets]
    assert sum(ours) <= sum(ref)
    assert max(ours) <= max(ref)
    assert all(a <= b + 4 for a, b in zip(ours, ref))
    if name == "late drop":
        steps = {f: len(search(by_strength, exact_oracle(curve), 10 * f).trace) for f in (0.5, 0.7, 0.9)}
        assert steps[0.5] <= bisection_measurements(curve, 5.0) and steps[0.7] <= 7 and steps[0.9] <= 8


def noisy_oracle(curve: Callable[[float], float], rng: random.Random, sigma: float = 0.03,
                 repeats: int = 3) -> Callable[[dict[str, int]], Probe]:
    """Each of `repeats` timed repeats carries multiplicative Gaussian noise `sigma`; the figure is their mean, and
    its spread the standard error sigma/sqrt(repeats), as the pipeline derives it from the repeat medians."""
    def measure(widths: dict[str, int]) -> Probe:
        true = curve(strength_of(widths))
        return Probe(sum(true * (1 + rng.gauss(0.0, sigma)) for _ in range(repeats)) / repeats, "measured",
                     sigma / math.sqrt(repeats))
    return measure


@pytest.mark.parametrize("name", list(CURVES))
def test_search_rarely_chooses_a_model_truly_over_budget_under_noise(name: str) -> None:
    """Seeded simulation: 3% multiplicative Gaussian noise on every timed repeat, 3 repeats per figure (spread
    0.03/sqrt(3)), a budget of 0.6x, 200 runs. Judged on the noise-free curve, the chosen model is over budget in at
    most 2% of runs (before the noise margin and remeasurement: 8, 31 and 6 of 200 for these three curves)."""
    curve, budget = CURVES[name], 6.0
    over, chosen = 0, 0
    for seed in range(200):
        oracle = noisy_oracle(curve, random.Random(seed))
        r = search(by_strength, oracle, budget, remeasure=oracle)
        if r.best is not None:
            chosen += 1
            over += curve(strength_of(r.best.widths)) > budget
    assert chosen >= 190 and over <= 4


def test_search_margin_rejects_a_figure_within_noise_of_the_budget() -> None:
    """At 0.99x budget a figure with a 1% standard error is not taken as within budget (k = 2); the same figure
    taken as exact is, and a Band with k = 0 turns the margin off."""
    widths = {0.0: 12.0, 1.0: 9.9}
    wf = lambda u: {"g": int(u)}  # noqa: E731 - two width settings only
    noisy = lambda w: Probe(widths[w["g"]], "measured", 0.01)  # noqa: E731
    assert search(wf, noisy, 10.0).best is None
    assert search(wf, noisy, Band(10.0, 0.05, 0.0)).best is not None
    assert search(wf, lambda w: Probe(widths[w["g"]], "measured"), 10.0).best is not None


def test_search_remeasures_an_ambiguous_figure_once_and_counts_it() -> None:
    """A figure whose ±2 standard errors straddle the budget is measured once more before it moves a bracket; the
    inverse-variance mean of the two enters the trace, and the second measurement counts towards max_steps."""
    curve, budget = CURVES["late drop"], 6.0
    calls: list[str] = []

    def oracle(w: dict[str, int]) -> Probe:
        calls.append("oracle")
        return Probe(curve(strength_of(w)), "measured", 0.02)

    def again(w: dict[str, int]) -> Probe:
        calls.append("again")
        return Probe(curve(strength_of(w)) * 0.98, "measured", 0.02)

    r = search(by_strength, oracle, budget, max_steps=9, remeasure=again)
    assert r.converged and len(calls) <= 9 and calls.count("oracle") == len(r.trace)
    twice = [c for c in r.trace if c.source == "measured x2"]
    assert len(twice) == calls.count("again") >= 1
    for c in r.trace:
        first = curve(c.strength)
        ambiguous = first * (1 - 0.04) <= budget < first * (1 + 0.04)
        assert (c in twice) == ambiguous  # remeasured exactly when the first figure could not decide
        if c in twice:  # the inverse-variance mean of the two figures (the second, lower one is the tighter in ms)
            wa, wb = 1 / (0.02 * first) ** 2, 1 / (0.02 * 0.98 * first) ** 2
            mean = (wa * first + wb * 0.98 * first) / (wa + wb)
            assert first * 0.98 < mean < first * 0.99 and math.isclose(c.latency_ms, mean)
            assert math.isclose(c.spread, math.sqrt(1 / (wa + wb)) / mean)
            assert c.spread < 0.02 / math.sqrt(2) * 1.01  # about a mean of two's standard error
    plain = search(by_strength, oracle, budget, max_steps=9)
    assert all(c.source == "measured" for c in plain.trace)  # without remeasure nothing is measured twice


def test_search_best_is_the_feasible_candidate_with_the_lowest_error() -> None:
    """Widths are not monotone in u, so the strength label does not say which candidate is most faithful: with
    error_of, best is the feasible candidate of lowest error, never an over-budget one however low its error."""
    curve, budget = CURVES["late drop"], 7.0
    plain = search(by_strength, exact_oracle(curve), budget)
    feasible = [c for c in plain.trace if c.latency_ms <= budget]
    assert len(feasible) >= 3 and all(c.error is None for c in plain.trace)
    target = max(feasible, key=lambda c: c.strength)  # the most pruned: what the strength rule never picks
    over = max((c for c in plain.trace if c.latency_ms > budget), key=lambda c: c.strength)

    def error_of(w: dict[str, int]) -> float:  # lowest over budget, then lowest at the target
        return 0.0 if widths_digest(w) == over.widths_digest else 0.01 + abs(strength_of(w) - target.strength)

    r = search(by_strength, exact_oracle(curve), budget, error_of=error_of)
    assert [c.widths_digest for c in r.trace] == [c.widths_digest for c in plain.trace]  # error_of does not steer
    assert r.best is not None and r.best.widths_digest == target.widths_digest
    assert plain.best is not None and plain.best.widths_digest != target.widths_digest
    assert all(c.error == error_of(c.widths) for c in r.trace) and r.best.to_dict()["error"] == 0.01
    ties = search(by_strength, exact_oracle(curve), budget, error_of=lambda w: 1.0)
    assert ties.best is not None and ties.best.latency_ms == max(c.latency_ms for c in feasible)


def test_candidate_to_dict_carries_spread_and_error() -> None:
    c = Candidate(step=1, strength=0.5, widths_digest="abc", latency_ms=1.0, source="measured x2", widths={"g": 1},
                  spread=0.01, error=0.2)
    assert c.to_dict() == {"step": 1, "strength": 0.5, "widths_digest": "abc", "latency_ms": 1.0,
                           "source": "measured x2", "spread": 0.01, "error": 0.2}


def test_fidelity_widths_fn_reaches_the_minimum_widths_at_u_1_even_when_errors_are_not_monotone() -> None:
    """Slicing without a repair saturates: one group pruned alone can give a larger error than all groups pruned. u = 1
    must still be every group at its minimum, or the search calls a reachable budget unreachable."""
    g = toy_graph([64, 64, 64])
    lows = min_widths(g, 16)

    def error(widths: dict[str, int]) -> float:
        pruned = sum(widths[k] < 64 for k in widths)
        return {0: 0.0, 1: 1.2, 2: 1.0, 3: 0.95}[pruned]  # saturating, not monotone

    widths_for = step_fn(g, {}, 16, error=error)
    assert widths_for(1.0) == lows
    assert widths_for(0.0) == {gr.name: 64 for gr in g.groups}


def test_a_figure_whose_wide_spread_pulled_the_band_down_does_not_land_and_the_slowest_feasible_is_released() -> None:
    """mobilenetv3_small_050 at 0.7x: a tight figure at 0.917 of the budget fell 0.3% under the band, the next one
    read 0.80 with an 11% spread, which the band (its floor falls with the spread) accepted, and the release went
    out at 0.80. The band now stops at `floor` (0.85) of the budget, and without a proxy error the slowest feasible
    candidate is the best, not the one with the lowest strength label (widths are not monotone in u)."""
    from edgeprune.search.strength import pick_best

    band = Band(1.0)
    assert not band.in_band(Probe(0.80, "measured", 0.11))  # accepted before: ceiling 0.82, its floor 0.78
    assert band.in_band(Probe(0.90, "measured", 0.03)) and band.feasible(Probe(0.917, "measured", 0.016))
    tight = Candidate(step=4, strength=0.5077, widths_digest="a", latency_ms=0.917, source="measured",
                      widths={"g": 492}, spread=0.016)
    wide = Candidate(step=5, strength=0.5027, widths_digest="b", latency_ms=0.80, source="measured",
                     widths={"g": 497}, spread=0.11)
    assert band.feasible(wide) and pick_best([tight, wide]) is tight

    def widths_for(u: float) -> dict[str, int]:
        return {"g": 1000 - round(1000 * u)}

    def oracle(w: dict[str, int]) -> Probe:  # latency falls with u, except one noisy setting read low and wide
        u = 1 - w["g"] / 1000
        if 0.50 <= u < 0.51:
            return Probe(0.80, "measured", 0.11)
        return Probe(1.6 - 1.3 * u, "measured", 0.016)

    r = search(widths_for, oracle, band, max_steps=12)
    assert r.best is not None and r.best.latency_ms >= 0.85 and band.feasible(r.best)
