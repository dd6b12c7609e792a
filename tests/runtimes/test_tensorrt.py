"""TensorRT Python API backend.

The engine-building and timing tests need TensorRT and a CUDA GPU and are skipped elsewhere; the missing-TensorRT
error runs everywhere. The model preparation, calibration feeder and cache keys are tested in test_trtonnx.py,
test_trtcalib.py and test_trtengine.py.
"""

from __future__ import annotations

import dataclasses
import importlib.util

import numpy as np
import pytest

from edgeprune.errors import DeviceUnreachable, EdgePruneError, ExitCode
from edgeprune.inputs.targets import MeasureConfig, load_target
from edgeprune.runtimes import tensorrt as trt_backend
from edgeprune.runtimes import trtengine, trtonnx

HAS_TRT = importlib.util.find_spec("tensorrt") is not None
GPU_REASON = trt_backend.unavailable_reason()


@pytest.mark.skipif(HAS_TRT, reason="tensorrt is installed here")
def test_measure_without_tensorrt_is_device_unreachable(tiny_onnx):
    assert trt_backend.version() is None
    assert "tensorrt Python package is not installed" in trt_backend.unavailable_reason()
    with pytest.raises(DeviceUnreachable, match="cannot measure tiny.onnx with TensorRT here") as info:
        trt_backend.measure(tiny_onnx, load_target("jetson"))
    assert info.value.code == ExitCode.DEVICE_UNREACHABLE


# ---------------------------------------------------------------- on a GPU with TensorRT


def gpu_target(precision: str):
    return dataclasses.replace(load_target("x86-trt"), runtime="tensorrt", precision=precision, arch="any",
                               measure=MeasureConfig(warmup=10, iterations=30, repeats=2))


@pytest.mark.trt
@pytest.mark.gpu
@pytest.mark.skipif(GPU_REASON is not None, reason=f"needs TensorRT and a CUDA GPU: {GPU_REASON}")
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_measure_times_engine_on_gpu(precision, tiny_onnx, tmp_path):
    import tensorrt

    done = []
    target = gpu_target(precision)
    s = trt_backend.measure(tiny_onnx, target, progress=lambda d, t: done.append((d, t)), cache_dir=tmp_path)
    assert (s.runtime, s.runtime_version, s.timing, s.precision) == \
        ("tensorrt", tensorrt.__version__, "gpu_compute", precision)
    assert s.n == 60 and len(s.repeat_medians) == 2 and done[-1] == (60, 60)
    assert 0 < s.min <= s.median <= s.max and s.min <= s.p90 <= s.max and s.std >= 0
    engines = list((tmp_path / "engines").glob("*.engine"))
    assert len(engines) == 1 and list(tmp_path.glob("timing-*.cache"))
    built = engines[0].stat().st_mtime_ns
    assert trtengine.build_engine(tiny_onnx, target, cache_dir=tmp_path) == engines[0]
    assert engines[0].stat().st_mtime_ns == built  # served from the cache, not rebuilt


@pytest.mark.trt
@pytest.mark.gpu
@pytest.mark.skipif(GPU_REASON is not None, reason=f"needs TensorRT and a CUDA GPU: {GPU_REASON}")
def test_measure_int8_calibrates_from_batches(tiny_onnx, tmp_path):
    import tensorrt

    target = gpu_target("int8")
    rng = np.random.default_rng(0)
    batches = [rng.standard_normal((1, 3, 32, 32)).astype(np.float32) for _ in range(4)]
    if trtonnx.parse_version(tensorrt.__version__)[0] >= 11:
        with pytest.raises(EdgePruneError, match="removed implicit INT8 calibration"):
            trt_backend.measure(tiny_onnx, target, calibration=batches, cache_dir=tmp_path)
        return
    s = trt_backend.measure(tiny_onnx, target, calibration=batches, cache_dir=tmp_path)
    assert s.precision == "int8" and s.n == 60 and s.median > 0
    other = [b + np.float32(1.0) for b in batches]
    trtengine.build_engine(tiny_onnx, target, calibration=other, cache_dir=tmp_path)
    assert len(list((tmp_path / "engines").glob("*.engine"))) == 2  # other calibration data, other engine
    stacked = np.concatenate(other)  # the recipe's samples as one N x C x H x W array, sliced into batches of 1
    assert trt_backend.measure(tiny_onnx, target, calibration=stacked, cache_dir=tmp_path).n == 60


@pytest.mark.trt
@pytest.mark.gpu
@pytest.mark.skipif(GPU_REASON is not None, reason=f"needs TensorRT and a CUDA GPU: {GPU_REASON}")
def test_int8_engine_builds_from_the_builds_qdq_model_without_a_calibrator(tiny_onnx, tmp_path):
    """What a build hands an int8 TensorRT target: the model quantised by export/quantize.py with the target's symmetric
    int8 settings. TensorRT builds it as explicitly quantized, with no calibrator, on every version (11 included)."""
    import tensorrt

    from edgeprune.export.quantize import Quantizer
    from edgeprune.runtimes.trtengine import _builder_config

    target = gpu_target("int8")
    calib = np.random.default_rng(0).standard_normal((32, 3, 32, 32)).astype(np.float32)
    q = Quantizer(load_target("jetson-orin-nano-int8").quantization, calib)(tiny_onnx.parent / "tiny.onnx")
    s = trt_backend.measure(q, target, cache_dir=tmp_path)
    assert s.precision == "int8" and s.median > 0
    logger = tensorrt.Logger(tensorrt.Logger.WARNING)
    builder = tensorrt.Builder(logger)
    _, calibrator = _builder_config(tensorrt, builder, trt_backend.cuda_backend(), q, target, calib)
    assert calibrator is None  # the scales come from the model
