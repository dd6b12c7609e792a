"""`agree`, `consensus`: one baseline figure from two or three, as a relative budget needs it."""

from __future__ import annotations

import numpy as np
import pytest

from edgeprune.runtimes.stats import LatencyStats, agree, consensus, interleaved, stats_from_repeats

META = {"target": "cpu", "runtime": "onnxruntime", "runtime_version": "1", "precision": "fp32"}


def figure(seed: int, centre: float, noise: float = 0.01, repeats: int = 3, runs: int = 20):
    rng = np.random.default_rng(seed)
    return [list(centre * (1 + noise * rng.standard_normal(runs))) for _ in range(repeats)], META


def test_agreeing_figures_pool_exactly_what_one_figure_of_all_runs_would_say() -> None:
    ra, _ = figure(0, 2.0, noise=0.1)  # repeat medians apart by more than the spread's floor
    rb, _ = figure(1, 2.0, noise=0.1)
    a, b, whole = stats_from_repeats(ra, **META), stats_from_repeats(rb, **META), stats_from_repeats(ra + rb, **META)
    assert agree(a, b)
    s = consensus([a, b])
    assert s.median == pytest.approx(whole.median) and s.mean == pytest.approx(whole.mean)
    assert s.std == pytest.approx(whole.std) and s.n == whole.n and s.min == whole.min and s.max == whole.max
    assert sorted(s.repeat_medians) == sorted(a.repeat_medians + b.repeat_medians)
    assert s.spread < max(a.spread, b.spread)  # more repeats: a smaller standard error


def test_of_three_figures_the_odd_one_out_is_dropped_whichever_way_it_is_off() -> None:
    a, b = (stats_from_repeats(figure(seed, 2.0)[0], **META) for seed in (0, 1))
    slow = stats_from_repeats(figure(2, 2.5)[0], **META)  # 25% slower: far beyond two standard errors of 1% noise
    fast = stats_from_repeats(figure(3, 1.6)[0], **META)  # a figure faster than the steady state
    assert not agree(a, slow) and not agree(fast, a)
    for odd in (slow, fast):
        got = consensus([odd, a, b])
        assert sorted(got.repeat_medians) == sorted(a.repeat_medians + b.repeat_medians)
        assert got.median == pytest.approx(2.0, rel=0.02)


def test_interleaved_figures_are_ratios_to_the_reference_in_its_units() -> None:
    """Each pair's ratio, times the anchor: a machine 40% slower during the second pair changes nothing; the spread is
    that of the ratios (here they agree, so the floor)."""
    def fig(ms: float) -> LatencyStats:
        return stats_from_repeats([[ms, ms]], target="cpu", runtime="onnxruntime", runtime_version="x",
                                  precision="fp32")

    figures = [fig(1.0), fig(1.4), fig(1.0)]
    bases = [fig(2.0), fig(2.8), fig(2.0)]
    out = interleaved(figures, bases, anchor_ms=2.5)
    assert out.median == pytest.approx(1.25) and out.repeat_medians == pytest.approx((1.25, 1.25, 1.25))
    assert out.spread == LatencyStats.SPREAD_FLOOR and out.n == 6
    noisy = interleaved([fig(1.0), fig(1.2), fig(1.1)], [fig(2.0)] * 3, anchor_ms=2.0)
    assert noisy.median == pytest.approx(1.1) and noisy.spread > 0.03
    with pytest.raises(ValueError):
        interleaved(figures, bases[:2], anchor_ms=2.0)


def test_from_five_repeats_one_spiked_repeat_leaves_the_spread_and_two_do_not() -> None:
    """The figure is the repeat medians' median, which one spike does not move; from five repeats the spread leaves
    out the one farthest from it too. Two values off, or scatter throughout, still widen it."""
    def of(medians: list[float]) -> LatencyStats:
        return stats_from_repeats([[m, m] for m in medians], **META)

    steady = [1.0] * 8
    assert of([*steady, 2.2]).spread == LatencyStats.SPREAD_FLOOR  # one session 2.2x slow of nine
    assert of([1.0, 1.0, 2.2]).spread > 0.3  # three repeats: all of them count
    assert of([1.0, 1.0, 1.0, 1.3, 0.7]).spread > 0.05  # two off either way: not one spike
    rng = np.random.default_rng(0)
    noisy = list(1 + 0.05 * rng.standard_normal(9))
    plain = float(np.std(noisy, ddof=1)) / of(noisy).median / 3
    assert 0.6 * plain < of(noisy).spread <= plain  # normal scatter: near the plain standard error
