"""The inner level's latency-aware allocation: error + λ·latency per group (search/allocate.py)."""

from __future__ import annotations

import math
import random
from collections.abc import Callable

import pytest

from edgeprune.dependency.graph import Graph
from edgeprune.errors import EdgePruneError
from edgeprune.search.allocate import AllocationInputs, allowed_widths, latency_allocation, min_widths, step_allocation
from edgeprune.search.registry import make_widths_fn
from tests.search.test_strength import toy_graph


def separable(g: Graph, sharp: dict[str, float], price: dict[str, float]):
    """A separable toy: squared error Σ (1 - w/C)^sharp, cost Σ price·w/C (no interaction between groups)."""
    def penalty(w: dict[str, int]) -> float:
        return sum((1 - w[gr.name] / gr.channels) ** sharp[gr.name] for gr in g.groups)

    def cost(w: dict[str, int]) -> float:
        return sum(price[gr.name] * w[gr.name] / gr.channels for gr in g.groups) / sum(price.values())
    return penalty, cost


def test_argmin_options_matches_a_scan_on_unimodal_objectives() -> None:
    from edgeprune.search.allocate import _argmin_options

    rng = random.Random(0)
    for _ in range(300):
        n = rng.randint(1, 64)
        sharp, lam, shift = rng.uniform(1.2, 6), rng.uniform(0, 3), rng.uniform(-1, 1)
        calls: list[int] = []

        def f(j: int) -> float:
            calls.append(j)
            x = j / max(n - 1, 1)
            return (1 - x) ** sharp + lam * x + shift

        scan = min(range(n), key=lambda j: (f(j), -j))
        calls.clear()
        assert _argmin_options(f, n) == scan
        assert len(set(calls)) <= min(n, 24)


def test_latency_allocation_is_the_exact_lagrangian_optimum_on_a_separable_problem() -> None:
    """Forward order is exact when groups do not interact: compare with a brute force over every combination."""
    import itertools

    from edgeprune.search.allocate import latency_aware_widths

    g = toy_graph([32, 48, 64])
    penalty, cost = separable(g, {"g0": 2.0, "g1": 3.0, "g2": 1.5}, {"g0": 1.0, "g1": 4.0, "g2": 2.0})
    options = [allowed_widths(gr.channels, 8, 8) for gr in g.groups]
    for lam in (0.05, 0.3, 1.0, 3.0):
        got = latency_aware_widths(g, lam, 8, penalty, cost)
        best = min((dict(zip(["g0", "g1", "g2"], combo)) for combo in itertools.product(*options)),
                   key=lambda w: penalty(w) + lam * cost(w))
        assert penalty(got) + lam * cost(got) == pytest.approx(penalty(best) + lam * cost(best), abs=1e-12)


def test_latency_allocation_beats_the_step_constraint_at_equal_cost() -> None:
    """Same error curves, one group four times as expensive: the step constraint gives it the same share of error as
    the cheap ones, the latency allocation prunes it first. At every cost both reach, the latency allocation's error
    is no higher, and strictly lower somewhere."""
    g = toy_graph([64, 64, 64])
    penalty, cost = separable(g, {n: 2.0 for n in ("g0", "g1", "g2")}, {"g0": 1.0, "g1": 4.0, "g2": 1.0})
    step = step_allocation(AllocationInputs(g, {}, 8, error=lambda w: math.sqrt(penalty(w))))
    lat = latency_allocation(AllocationInputs(g, {}, 8, error=lambda w: math.sqrt(penalty(w)), cost=cost))
    assert lat(0.0) == {"g0": 64, "g1": 64, "g2": 64} and lat(1.0) == min_widths(g, 8)

    def at(fn: Callable[[float], dict[str, int]], target: float) -> dict[str, int]:
        lo, hi = 0.0, 1.0
        for _ in range(30):
            u = (lo + hi) / 2
            lo, hi = (u, hi) if cost(fn(u)) > target else (lo, u)
        return fn(hi)

    gaps = []
    for target in (0.8, 0.6, 0.4):
        ws, wl = at(step, target), at(lat, target)
        assert cost(wl) <= target + 1e-9 and cost(ws) <= target + 1e-9
        gaps.append(penalty(ws) - penalty(wl))
        assert penalty(wl) <= penalty(ws) + 1e-12
    assert max(gaps) > 0.05


def test_latency_allocation_widths_shrink_with_u_and_need_a_known_name() -> None:
    g = toy_graph([32, 64])
    penalty, cost = separable(g, {"g0": 2.0, "g1": 2.0}, {"g0": 1.0, "g1": 2.0})
    fn = latency_allocation(AllocationInputs(g, {}, 8, error=lambda w: math.sqrt(penalty(w)), cost=cost))
    costs = [cost(fn(u)) for u in (0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0)]
    assert costs == sorted(costs, reverse=True) and costs[0] > costs[-1]
    with pytest.raises(EdgePruneError, match="allocation must be"):
        make_widths_fn("lagrange", AllocationInputs(g, {}, 8))


def test_alone_curve_runs_the_proxy_on_its_grid_only_exact_there_and_monotone_between() -> None:
    """The separable allocation's curve of one group: 72 admissible widths, the proxy run on 8 of them (the whole width
    is no error without a run), the true values at those, and between them a monotone interpolation that stays
    within the neighbouring grid values."""
    from edgeprune.search.allocate import SEPARABLE_GRID, _AloneCurve

    options = list(range(16, 1153, 16))
    runs: list[int] = []

    def truth(w: int) -> float:
        runs.append(w)
        return ((1152 - w) / 1152) ** 3

    curve = _AloneCurve(options, truth, SEPARABLE_GRID)
    values = [curve(w) for w in options]
    assert len(runs) == SEPARABLE_GRID - 1 and 1152 not in runs and curve(1152) == 0.0
    assert all(values[options.index(w)] == ((1152 - w) / 1152) ** 3 for w in runs)
    assert all(a >= b for a, b in zip(values, values[1:]))  # narrower never less error
    assert max(abs(v - ((1152 - w) / 1152) ** 3) for v, w in zip(values, options)) < 0.01
    small = _AloneCurve([16, 32, 48, 64], lambda w: (64 - w) / 64, SEPARABLE_GRID)
    assert [small(w) for w in (16, 32, 48, 64)] == [0.75, 0.5, 0.25, 0.0]  # few widths: every one run, none guessed
