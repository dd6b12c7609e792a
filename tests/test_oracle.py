"""The oracle layer: the measuring function one job uses, what reaches the runtime, what is counted."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgeprune.config import no_progress
from edgeprune.oracle import Measurer
from edgeprune.runtimes.stats import stats_from_repeats
from edgeprune.targets import load_target


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
