"""`steadier`: one baseline figure from two, as a relative budget needs it."""

from __future__ import annotations

import numpy as np
import pytest

from edgeprune.runtimes.stats import steadier, stats_from_repeats

META = {"target": "cpu", "runtime": "onnxruntime", "runtime_version": "1", "precision": "fp32"}


def figure(seed: int, centre: float, noise: float = 0.01, repeats: int = 3, runs: int = 20):
    rng = np.random.default_rng(seed)
    return [list(centre * (1 + noise * rng.standard_normal(runs))) for _ in range(repeats)], META


def test_agreeing_figures_pool_exactly_what_one_figure_of_all_runs_would_say() -> None:
    ra, _ = figure(0, 2.0, noise=0.1)  # repeat medians apart by more than the spread's floor
    rb, _ = figure(1, 2.0, noise=0.1)
    a, b, whole = stats_from_repeats(ra, **META), stats_from_repeats(rb, **META), stats_from_repeats(ra + rb, **META)
    s = steadier(a, b)
    assert s.median == pytest.approx(whole.median) and s.mean == pytest.approx(whole.mean)
    assert s.std == pytest.approx(whole.std) and s.n == whole.n and s.min == whole.min and s.max == whole.max
    assert sorted(s.repeat_medians) == sorted(a.repeat_medians + b.repeat_medians)
    assert s.spread < max(a.spread, b.spread)  # more repeats: a smaller standard error


def test_a_figure_slowed_by_load_is_dropped_for_the_lower_one() -> None:
    a = stats_from_repeats(figure(0, 2.0)[0], **META)
    slow = stats_from_repeats(figure(1, 2.5)[0], **META)  # 25% slower: far beyond two standard errors of 1% noise
    assert steadier(slow, a) == a and steadier(a, slow) == a
