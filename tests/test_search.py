from __future__ import annotations

import math

import pytest

from edgeprune.errors import EdgePruneError
from edgeprune.graph import Graph, Group
from edgeprune.importance import Ranking
from edgeprune.pipeline import parse_budget
from edgeprune.search import (Probe, allowed_widths, fidelity_widths, make_widths_fn, min_widths, search,
                              step_constrained_widths, uniform_strength_widths, widths_digest)


def toy_graph(widths: list[int]) -> Graph:
    return Graph(groups=[Group(name=f"g{i}", channels=c, producers=(f"g{i}",), consumers=(), members=())
                         for i, c in enumerate(widths)])


def curve(c: int, sharp: float) -> Ranking:
    """A convex, non-increasing loss curve: loss[k] = (1 - k/c)^sharp."""
    return Ranking(order=tuple(range(c)), loss=tuple((1 - k / c) ** sharp for k in range(c + 1)))


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
    fn = make_widths_fn(g, {gr.name: Ranking(order=tuple(range(gr.channels))) for gr in g.groups}, 16)
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
    res = search(make_widths_fn(g, ranks, 8), lambda w: (calls.append(w), oracle(w))[1], budget, tolerance=0.05,
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
    res = search(make_widths_fn(g, ranks, 8), lambda w: (calls.append(w), oracle(w))[1], 0.5 * base,
                 known={widths_digest(full): Probe(base, "baseline")})
    assert full not in calls  # the unpruned model is never measured by the search
    assert res.trace[0].source == "baseline" and res.trace[0].latency_ms == base
    assert len(calls) == len(res.trace) - 1
    assert res.best is not None and 0.95 * 0.5 * base <= res.best.latency_ms <= 0.5 * base


def test_search_unreachable_budget_reports_fastest() -> None:
    g = toy_graph([64, 64])
    ranks = {gr.name: curve(gr.channels, 1.0) for gr in g.groups}
    res = search(make_widths_fn(g, ranks, 8), latency_of(g), budget_ms=0.01)
    assert res.best is None and len(res.trace) == 2
    assert res.fastest.widths == {"g0": 8, "g1": 8}


def test_search_nothing_to_prune_when_base_meets_budget() -> None:
    g = toy_graph([32])
    res = search(make_widths_fn(g, {"g0": curve(32, 1.0)}, 8), latency_of(g), budget_ms=100.0)
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
        assert err(prefix) <= s * (i + 1) / n + 1e-12  # the step constraint, on the network error
        if widths[gr.name] > 16:  # and no narrower option would have kept it
            narrower = {**prefix, gr.name: widths[gr.name] - 16}
            assert err(narrower) > s * (i + 1) / n
    # bisection, not a scan: at most ceil(log2(options)) evaluations per group
    assert len(calls) <= sum(math.ceil(math.log2(len(allowed_widths(gr.channels, 16, 16)))) for gr in g.groups)


def test_fidelity_widths_fn_spans_unpruned_to_minimum_and_shrinks_with_u() -> None:
    g = toy_graph([64, 96, 128])
    fn = make_widths_fn(g, {}, 16, error=network_error(g))
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
    r = search(lambda u: wide if u < 0.5 else narrow, oracle, budget_ms=12.0, tolerance=0.05)  # 5.12 to 20.48 ms
    assert r.converged and r.best is not None and 11.4 <= r.best.latency_ms <= 12.0
    assert len(r.trace) <= 12 and r.best.strength < 0.5
