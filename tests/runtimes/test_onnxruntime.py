from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from edgeprune.errors import DeviceUnreachable, EdgePruneError
from edgeprune.inputs.targets import MeasureConfig, Target, load_target
from edgeprune.runtimes import MeasurementCache, measure
from edgeprune.runtimes.stats import LatencyStats, stats_from_repeats


def test_measure_returns_consistent_stats(tiny_onnx: Path, fast_cpu: Target) -> None:
    s = measure(tiny_onnx, fast_cpu)
    cfg = fast_cpu.measure
    assert s.n == cfg.iterations * cfg.repeats and len(s.repeat_medians) == cfg.repeats
    assert 0 < s.min <= s.median <= s.max and s.min <= s.p90 <= s.max
    assert s.median == pytest.approx(float(np.median(s.repeat_medians)))
    assert s.source == "measured" and s.runtime == "onnxruntime" and s.target == "cpu"


def test_stats_from_repeats_median_of_medians() -> None:
    s = stats_from_repeats([[1.0, 2.0, 3.0], [10.0, 11.0, 12.0], [4.0, 5.0, 100.0]], target="t", runtime="r",
                           runtime_version="1", precision="fp32")
    assert s.repeat_medians == (2.0, 11.0, 5.0) and s.median == 5.0
    assert s.max == 100.0 and s.n == 9 and s.mean == pytest.approx(148 / 9)
    assert LatencyStats.from_dict(s.to_dict()) == s


def test_measure_cache_hit_then_miss_after_change(tiny_onnx: Path, fast_cpu: Target, tmp_path: Path) -> None:
    model = tmp_path / "m.onnx"
    shutil.copy(tiny_onnx, model)
    cache = MeasurementCache(tmp_path / "c")
    first = measure(model, fast_cpu, cache=cache)
    second = measure(model, fast_cpu, cache=cache)
    assert first.source == "measured" and second.source == "cache"
    assert dataclasses.replace(second, source="measured") == first
    # A changed file (same graph, different weights) is a different model: measured again.
    proto = onnx.load(str(model))
    init = proto.graph.initializer[0]
    arr = onnx.numpy_helper.to_array(init) * 1.5
    init.CopyFrom(onnx.numpy_helper.from_array(arr, init.name))
    onnx.save(proto, str(model))
    third = measure(model, fast_cpu, cache=cache)
    assert third.source == "measured" and third != first


def test_measure_cache_is_per_target(tiny_onnx: Path, fast_cpu: Target, tmp_path: Path) -> None:
    cache = MeasurementCache(tmp_path / "c")
    measure(tiny_onnx, fast_cpu, cache=cache)
    two = dataclasses.replace(fast_cpu, name="cpu-2t", threads=2)
    assert measure(tiny_onnx, two, cache=cache).source == "measured"


def test_measure_rejects_corrupt_file(tiny_onnx: Path, fast_cpu: Target, tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(tiny_onnx.read_bytes()[:100])
    with pytest.raises(EdgePruneError):
        measure(bad, fast_cpu)


@pytest.mark.skipif(__import__("platform").machine() in ("aarch64", "arm64"), reason="this machine is arm64: rpi5 is local")
def test_measure_other_arch_target_is_unreachable(tiny_onnx: Path) -> None:
    with pytest.raises(DeviceUnreachable, match="aarch64 device.*\\[remote\\].*--lut"):
        measure(tiny_onnx, load_target("rpi5"))


def test_max_seconds_stops_a_repeat_after_the_minimum_runs(tiny_onnx: Path, fast_cpu: Target) -> None:
    capped = dataclasses.replace(fast_cpu, measure=MeasureConfig(warmup=1, iterations=40, repeats=2, max_seconds=1e-9))
    assert measure(tiny_onnx, capped).n == 2 * MeasureConfig.MIN_ITERATIONS
    uncapped = dataclasses.replace(capped, measure=dataclasses.replace(capped.measure, max_seconds=0.0))
    assert measure(tiny_onnx, uncapped).n == 2 * 40


@pytest.mark.parametrize("max_seconds", [0.0, 1e-9])  # every run, or each repeat cut at the minimum runs
def test_measure_progress_rises_to_its_total_when_max_seconds_cuts_repeats_short(
        tiny_onnx: Path, fast_cpu: Target, max_seconds: float) -> None:
    from edgeprune.runtimes import onnxruntime as ort_backend

    target = dataclasses.replace(fast_cpu, measure=MeasureConfig(warmup=1, iterations=40, repeats=2,
                                                                 max_seconds=max_seconds))
    seen: list[tuple[int, int]] = []
    ort_backend.measure(tiny_onnx, target, progress=lambda d, t: seen.append((d, t)))
    done = [d for d, _ in seen]
    assert {t for _, t in seen} == {80} and done == sorted(done) and done[-1] == 80
    assert 40 in done  # the first repeat's end is reported, however few runs it took


@pytest.mark.parametrize("done, elapsed, expected", [(4, 5.0, False), (5, 5.0, True), (10, 0.5, False),
                                                     (40, 0.0, True)])
def test_runs_done_rule(done: int, elapsed: float, expected: bool) -> None:
    assert MeasureConfig(iterations=40, max_seconds=1.0).runs_done(done, elapsed) is expected


def test_negative_max_seconds_is_refused() -> None:
    with pytest.raises(EdgePruneError, match="max_seconds"):
        MeasureConfig(max_seconds=-1.0)


def test_int8_target_times_a_float_model_quantised_and_a_quantised_model_as_it_is(tiny_onnx: Path, tmp_path: Path,
                                                                                   fast_cpu: Target) -> None:
    from edgeprune.export.quantize import has_qdq, quantize_onnx
    from edgeprune.runtimes.onnxruntime import timed_model

    int8 = dataclasses.replace(fast_cpu, precision="int8")
    assert int8.quantization is not None
    calib = np.random.default_rng(1).standard_normal((20, 3, 32, 32)).astype(np.float32)
    timed = onnx.load_from_string(timed_model(tiny_onnx, int8, calib))
    assert has_qdq(timed)
    assert timed_model(tiny_onnx, int8, calib) == timed_model(tiny_onnx, int8, calib)  # deterministic
    assert timed_model(tiny_onnx, int8, None) != timed_model(tiny_onnx, int8, calib)  # random inputs: other scales
    q = quantize_onnx(tiny_onnx, tmp_path / "q.onnx", calib, int8.quantization)
    assert timed_model(q, int8, calib) == q.read_bytes() and timed_model(tiny_onnx, fast_cpu, calib) == \
        tiny_onnx.read_bytes()
    s = measure(tiny_onnx, int8, calibration=calib)
    assert s.precision == "int8" and s.n == int8.measure.iterations * int8.measure.repeats and s.median > 0


def huge_input_onnx(path: Path) -> Path:
    """An 80-byte model that declares a 1 x 1 x 100000 x 100000 float input (37.3 GiB): audit AG-bomb_input."""
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 100000, 100000])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 100000, 100000])
    onnx.save(helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "huge", [x], [y]),
                                opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_profile_of_a_model_declaring_a_huge_input_exits_2_naming_its_size(tmp_path: Path) -> None:
    """Was exit 1 "out of memory (74.5 GiB ...); lower count or batch_size in the calibration recipe": the random
    input was drawn in float64 (twice the size), and profile has no recipe."""
    import subprocess
    import sys

    path = huge_input_onnx(tmp_path / "huge.onnx")
    r = subprocess.run([sys.executable, "-m", "edgeprune", "profile", str(path), "--no-cache"], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("edgeprune: error: model input x declares shape [1, 1, 100000, 100000]: 37.3 GiB of "
                           "float32"), line
    assert "smaller input" in line and "recipe" not in line
