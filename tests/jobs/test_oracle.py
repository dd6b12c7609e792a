"""The oracle layer: the measuring function one job uses, what reaches the runtime, what is counted."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from edgeprune.common.progress import no_progress
from edgeprune.inputs.targets import load_target
from edgeprune.jobs.oracle import Measurer
from edgeprune.runtimes.stats import LatencyStats, stats_from_repeats
from edgeprune.search.strength import Band, Probe


def recording(calls: list[dict], source: str = "measured"):
    def fn(path, target, cache=None, repeats=None, progress=None, **kw):  # noqa: ANN001, ANN202
        calls.append({"path": path, "cache": cache, "repeats": repeats, **kw})
        return stats_from_repeats([[1.0, 1.1]], target=target.name, runtime=target.runtime, runtime_version="x",
                                  precision=target.precision, source=source)
    return fn


def test_measurer_gives_an_int8_target_the_recipe_calibration_data_and_no_other_target() -> None:
    """DESIGN.md §5: INT8 engines are calibrated on the recipe's data (they were calibrated on random inputs)."""
    calib = np.random.default_rng(0).normal(size=(16, 1, 8, 8)).astype(np.float32)
    for name, gets in (("jetson-orin-nano-int8", True), ("cpu", False), ("jetson-orin-nano", False)):
        calls: list[dict] = []
        m = Measurer(load_target(name), "CACHE", no_progress, {}, recording(calls), calibration=calib)
        m(Path("a.onnx"), "measuring", repeats=3)
        assert ("calibration" in calls[0]) == gets, name
        if gets:
            assert calls[0]["calibration"] is calib


def test_measurer_counts_device_measurements_not_cached_figures_and_bypasses_the_cache_when_asked() -> None:
    calls: list[dict] = []
    t: dict[str, float] = {}
    m = Measurer(load_target("cpu"), "CACHE", no_progress, t, recording(calls))
    m(Path("a.onnx"), "measuring")
    m(Path("a.onnx"), "measuring again", cached=False, stage="verify")
    assert m.device_runs == 2 and [c["cache"] for c in calls] == ["CACHE", None]
    assert set(t) == {"measure", "verify"}
    cached = Measurer(load_target("cpu"), "CACHE", no_progress, {}, recording([], source="cache"))
    cached(Path("a.onnx"), "measuring")
    assert cached.device_runs == 0


def test_measurer_quantises_for_int8_targets_and_measures_float_figures_on_the_float_variant() -> None:
    calib = np.random.default_rng(0).normal(size=(16, 1, 8, 8)).astype(np.float32)
    for name, quantised in (("cpu-int8", True), ("jetson-orin-nano-int8", True), ("cpu", False)):
        m = Measurer(load_target(name), None, no_progress, {}, recording([]), calibration=calib)
        assert (m.quantizer is not None) == quantised, name
        if quantised:
            assert m.quantizer.config == load_target(name).quantization and m.quantizer.calibration is calib
    calls: list[dict] = []
    m = Measurer(load_target("cpu-int8"), "CACHE", no_progress, {}, recording(calls), calibration=calib)
    stats = m.float_figure(Path("base.onnx"), "measuring unpruned float model")
    assert stats.precision == "fp32" and "calibration" not in calls[0] and calls[0]["cache"] == "CACHE"
    assert m.device_runs == 1


class Machine:
    """A fake measuring function on a machine whose speed changes over time: each call times one model (its true
    latency from `true_ms`) at the machine's current slowness, which follows `spells` call by call."""

    def __init__(self, true_ms: dict[str, float], spells: list[float]) -> None:
        self.true_ms, self.spells, self.calls = true_ms, spells, []

    def __call__(self, path, target, cache=None, repeats=None, progress=None, **kw):  # noqa: ANN001, ANN204
        slow = self.spells[min(len(self.calls), len(self.spells) - 1)]
        self.calls.append((Path(path).name, cache, repeats))
        ms = self.true_ms[Path(path).name] * slow
        return stats_from_repeats([[ms, ms * 1.01]] * (repeats or 3), target=target.name, runtime=target.runtime,
                                  runtime_version="x", precision=target.precision)


def test_an_anchored_measurer_takes_candidates_beside_the_baseline_so_a_spell_of_the_machine_cancels() -> None:
    """The baseline is measured while the machine runs 30% slow (one figure: the anchor), the candidate after the spell
    ended: without interleaving the candidate reads 0.38x of the baseline for a true 0.5x; with it, 0.5x exactly,
    in the units of the baseline's figure, and never from the cache."""
    true = {"base.onnx": 2.0, "cand.onnx": 1.0}
    spells = [1.3, 1.3] + [1.0] * 20  # without interleaving, two agreeing baseline figures in the slow spell
    ratios = {}
    for interleave in (False, True):
        target = load_target("cpu")
        target = dataclasses.replace(target, measure=dataclasses.replace(target.measure, interleave=interleave))
        machine = Machine(true, spells[1:] if interleave else spells)  # interleaving: one baseline figure
        m = Measurer(target, "CACHE", no_progress, {}, machine, interleave=None if not interleave else True)
        base = m.baseline(Path("base.onnx"), relative=True)
        assert base.median == pytest.approx(2.6, rel=0.02)
        cand = m(Path("cand.onnx"), "measuring candidate")
        ratios[interleave] = cand.median / base.median
        if interleave:
            # three pairs of one fresh session each, baseline first, nothing from the cache
            assert machine.calls[1:] == [("base.onnx", None, 1), ("cand.onnx", None, 1)] * 3
            assert m.device_runs == 2  # one baseline figure (the anchor), one candidate figure
    assert ratios[False] == pytest.approx(1.0 / 2.6, rel=0.02)
    assert ratios[True] == pytest.approx(0.5, rel=1e-6)


def test_an_anchored_measurer_takes_more_pairs_of_a_noisy_model_until_its_ratio_is_resolved() -> None:
    """Pair ratios that scatter by ~7% (as lraspp's did here) leave a 3-pair figure with a standard error of ~4%, a
    noise margin of ~8%: the measurer takes more pairs, up to PAIRS_LIMIT x repeats, and the spread falls; a steady
    machine gets exactly `repeats` pairs."""
    from edgeprune.jobs.oracle import PAIR_SPREAD, PAIRS_LIMIT

    true = {"base.onnx": 2.0, "cand.onnx": 1.2}
    steady = [1.0] * 4 + [1.0] * 40
    # every session's speed scattered by 7% (a cycle of three speeds once stood here: most of its pair ratios were
    # exactly 1, which a spread robust to one spiked session rightly calls steady)
    noisy = [1.0] * 4 + list(1.0 + np.random.default_rng(0).normal(0.0, 0.07, 40))
    spreads = {}
    for name, spells in (("steady", steady), ("noisy", noisy)):
        machine = Machine(true, spells)
        m = Measurer(load_target("cpu"), None, no_progress, {}, machine, interleave=True)
        m.baseline(Path("base.onnx"), relative=True)
        before = len(machine.calls)
        cand = m(Path("cand.onnx"), "measuring candidate")
        pairs = (len(machine.calls) - before) // 2
        spreads[name] = cand.spread
        if name == "steady":
            assert pairs == 3 and cand.spread <= PAIR_SPREAD
        else:
            assert 3 < pairs <= PAIRS_LIMIT * 3
            assert cand.spread <= PAIR_SPREAD or pairs == PAIRS_LIMIT * 3
    assert spreads["noisy"] > spreads["steady"]


def test_a_noisy_figure_whose_side_of_the_budget_is_clear_takes_no_more_pairs_than_repeats() -> None:
    """With the build's budget known (`aim`), pairs scattering by ~8% stop at `repeats` once the budget lies outside
    the figure's noise margin (k standard errors): a candidate at 0.8x of the budget, or a verification at 0.6x;
    one within 2% of the budget keeps taking pairs up to the limit, as without an aim."""
    from edgeprune.jobs.oracle import PAIRS_LIMIT

    true = {"base.onnx": 2.0, "cand.onnx": 1.2}
    noisy = [1.0] * 2 + [1.0 if i % 2 == 0 else 1.0 + 0.08 * ((i // 2) % 3 - 1) for i in range(80)]
    pairs = {}
    for budget, stage, repeats in ((1.5, "measure", 3), (2.0, "verify", 5), (1.19, "measure", 3)):
        machine = Machine(true, noisy)
        m = Measurer(load_target("cpu"), None, no_progress, {}, machine, interleave=True)
        m.baseline(Path("base.onnx"), relative=True)
        m.aim = Band(budget)
        before = len(machine.calls)
        fig = m(Path("cand.onnx"), "measuring", repeats=repeats, stage=stage)
        pairs[budget] = (len(machine.calls) - before) // 2
        assert fig.spread > 0.0125  # the scatter is real: the spread alone would not stop it
    assert pairs == {1.5: 3, 2.0: 5, 1.19: PAIRS_LIMIT * 3}


def test_candidates_measured_beside_the_anchor_get_no_second_round() -> None:
    """`MeasuredOracle.remeasure` is None once the measurer has an anchor: its pairs already ran until the budget's
    side was clear or the pair limit was spent; without one (an absolute budget) a candidate near the budget may be
    measured again."""
    from types import SimpleNamespace

    from edgeprune.jobs.oracle import MeasuredOracle

    machine = Machine({"base.onnx": 2.0}, [1.0] * 10)
    for relative in (True, False):
        m = Measurer(load_target("cpu"), None, no_progress, {}, machine, interleave=True)
        m.baseline(Path("base.onnx"), relative=relative)
        oracle = MeasuredOracle(SimpleNamespace(), m, Path("."), "torchscript")
        assert (oracle.remeasure is None) == relative


def test_a_candidate_far_from_the_budget_takes_one_pair_and_one_near_it_or_a_verification_takes_them_all() -> None:
    """With the build's budget known (`aim`), a search candidate whose first two pairs put it more than FAR_FROM_AIM
    from it is measured by those pairs alone; one near the budget, and any verification, take every pair."""
    from edgeprune.jobs.oracle import FAR_FROM_AIM

    true = {"base.onnx": 2.0, "far.onnx": 0.4, "near.onnx": 1.0}
    pairs = {}
    for name, stage in (("far.onnx", "measure"), ("near.onnx", "measure"), ("far.onnx", "verify")):
        machine = Machine(true, [1.0] * 40)
        m = Measurer(load_target("cpu"), None, no_progress, {}, machine, interleave=True)
        m.baseline(Path("base.onnx"), relative=True)
        m.aim = Band(1.0)
        before = len(machine.calls)
        fig = m(Path(name), "measuring", stage=stage)
        pairs[name, stage] = (len(machine.calls) - before) // 2
        assert fig.median == pytest.approx(true[name], rel=0.02)
    assert abs(0.4 / 1.0 - 1) > FAR_FROM_AIM
    assert pairs == {("far.onnx", "measure"): 2, ("near.onnx", "measure"): 3, ("far.onnx", "verify"): 3}


def spiked_candidate(true_ms: float, slow: float) -> tuple[LatencyStats, int]:
    """A search candidate of `true_ms` (budget 1 ms, unpruned model 2 ms) measured beside the anchor while its first
    pair's candidate session runs `slow` times slower: its figure and the pairs it took."""
    machine = Machine({"base.onnx": 2.0, "cand.onnx": true_ms}, [1.0, 1.0, slow] + [1.0] * 40)  # baseline, pair 1
    m = Measurer(load_target("cpu"), None, no_progress, {}, machine, interleave=True)
    m.baseline(Path("base.onnx"), relative=True)
    m.aim = Band(1.0)
    before = len(machine.calls)
    fig = m(Path("cand.onnx"), "measuring", stage="measure")
    return fig, (len(machine.calls) - before) // 2


def test_one_spiked_pair_does_not_make_a_near_candidate_far() -> None:
    """resnet18 at 0.5x: one pair read a candidate at 0.97 of the budget as 1.49 (the machine slow for the candidate's
    session only), which stopped its measurement and sent the search through 8 more candidates. A near candidate
    whose first pair spikes takes its pairs as any near one, and its figure stays near its true latency."""
    fig, pairs = spiked_candidate(0.97, 1.55)
    assert pairs >= 3
    assert fig.median == pytest.approx(0.97, rel=0.03)


def test_two_far_pairs_that_disagree_across_the_budget_take_more_pairs() -> None:
    """resnet18 at 0.5x (2026-12-07): one slow session made a candidate of about 0.9 of the budget read 1.40 over its
    first two pairs, with a 30% spread; as a far figure it stopped there and became the search's over-budget end.
    Two pairs whose noise margin straddles the budget are not far: more pairs, and a figure near the true 0.9."""
    fig, pairs = spiked_candidate(0.9, 2.2)
    assert pairs >= 3
    assert fig.median == pytest.approx(0.9, rel=0.03) and Band(1.0).feasible(Probe(fig.median, "", fig.spread))


def test_a_verification_counts_the_search_pairs_of_its_candidate_and_takes_two_fresh_ones_at_least() -> None:
    """The release of a candidate measured beside the anchor in 3 pairs is verified over 5 (`final_repeats`): 2 new
    pairs, pooled with the 3 (ratios to the anchor, as taken); without `reuse`, or for a file never measured, all 5."""
    from edgeprune.jobs.oracle import FRESH_PAIRS

    true = {"base.onnx": 2.0, "cand.onnx": 1.0, "final.onnx": 1.0}
    machine = Machine(true, [1.0] * 80)
    m = Measurer(load_target("cpu"), None, no_progress, {}, machine, interleave=True)
    m.baseline(Path("base.onnx"), relative=True)
    m(Path("cand.onnx"), "measuring candidate")
    for reuse, new_pairs in ((Path("cand.onnx"), FRESH_PAIRS), (None, 5), (Path("other.onnx"), 5)):
        before = len(machine.calls)
        fig = m(Path("final.onnx"), "verifying", repeats=5, stage="verify", reuse=reuse)
        assert (len(machine.calls) - before) // 2 == new_pairs
        assert len(fig.repeat_medians) == 5 and fig.median == pytest.approx(1.0, rel=0.02)
    assert machine.calls[-1] == ("final.onnx", None, 1)  # fresh sessions, never the cache


def test_an_absolute_budget_a_non_interleaving_target_or_a_pool_measures_as_before() -> None:
    """Only the cpu profiles interleave, only for a relative budget, and not through a measure_fn of their own
    unless asked (a pool of boards would split each pair over two boards)."""
    assert load_target("cpu").measure.interleave and not load_target("jetson-orin-nano").measure.interleave
    for name, relative, ask in (("cpu", False, True), ("jetson-orin-nano", True, None), ("cpu", True, None)):
        machine = Machine({"base.onnx": 2.0, "cand.onnx": 1.0}, [1.0])
        m = Measurer(load_target(name), "CACHE", no_progress, {}, machine, interleave=ask)
        m.baseline(Path("base.onnx"), relative=relative)
        m(Path("cand.onnx"), "measuring candidate")
        assert m.anchor is None and machine.calls[-1] == ("cand.onnx", "CACHE", None), name


def test_a_table_oracle_warns_of_a_table_below_90_percent_within_10_or_without_a_check(
        table_env: dict, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """`build --lut`: the table's stored self-check is read, and an untrusted table is named in a warning."""
    import logging
    from types import SimpleNamespace

    from edgeprune.dependency.graph import trace
    from edgeprune.inputs.models import load_model
    from edgeprune.jobs.oracle import TableOracle
    from edgeprune.latency.table import load_lut

    loaded = load_model("example")
    session = SimpleNamespace(loaded=loaded, graph=trace(loaded.module, loaded.example_input),
                              config=SimpleNamespace(channel_multiple=None))
    target = load_target(str(table_env["target"]))
    table = load_lut(table_env["table"])
    good = {**table.models["example"]["check"], "within_10": 0.9}
    for check, warned in ((good, None), ({**good, "within_10": 0.7}, "only 70% of 10 random plans"),
                          (None, "holds no self-check")):
        table.models["example"]["check"] = check
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            oracle = TableOracle(session, table, target, "lut.json")  # type: ignore[arg-type]
        assert oracle.check["check"] == check
        assert (warned in caplog.text) if warned else "latency table" not in caplog.text


def test_a_wide_figure_far_under_budget_that_the_band_would_accept_takes_more_pairs() -> None:
    """A candidate at 0.86 of the budget with a ~6% standard error after `repeats` pairs is on a clear side of the
    budget, but the search's band (its floor falls with the spread) would accept it and release a model far under
    budget (mobilenetv3_small_050 at 0.86, hardcorenas_a at 0.87 of theirs): it takes more pairs, until its spread no
    longer lets the band accept it (or the limit); a figure at 0.70 of the budget with the same scatter, which the
    band rejects whatever its spread, stops at `repeats`."""
    from edgeprune.jobs.oracle import FAR_UNDER, PAIRS_LIMIT

    true = {"base.onnx": 2.0, "cand.onnx": 1.2}
    noisy = [1.0] * 2 + [1.0 if i % 2 == 0 else 1.0 + 0.16 * ((i // 2) % 3 - 1) for i in range(80)]
    pairs, figures = {}, {}
    for share in (0.86, 0.70):
        machine = Machine(true, noisy)
        m = Measurer(load_target("cpu"), None, no_progress, {}, machine, interleave=True)
        m.baseline(Path("base.onnx"), relative=True)
        m.aim = Band(1.2 / share)
        before = len(machine.calls)
        fig = m(Path("cand.onnx"), "measuring", repeats=3, stage="measure")
        figures[share] = Probe(fig.median, fig.source, fig.spread)
        pairs[share] = (len(machine.calls) - before) // 2
        assert not m.aim.ambiguous(figures[share])  # the side of the budget is clear
        assert fig.median < FAR_UNDER * m.aim.budget_ms
        assert not m.aim.in_band(figures[share])  # the search goes on to a wider candidate
    assert 3 < pairs[0.86] <= PAIRS_LIMIT * 3 and pairs[0.70] == 3
