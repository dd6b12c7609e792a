"""TensorRT Python API backend.

The engine-building and timing tests need TensorRT and a CUDA GPU and are skipped elsewhere; the model preparation
for TensorRT 11 (fp16 copy, Q/DQ check), the cache keys and the missing-TensorRT error run everywhere.
"""

from __future__ import annotations

import dataclasses
import importlib.util

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeprune.errors import DeviceUnreachable, EdgePruneError, ExitCode
from edgeprune.runtimes import tensorrt as trt_backend
from edgeprune.targets import MeasureConfig, load_target

HAS_TRT = importlib.util.find_spec("tensorrt") is not None
GPU_REASON = trt_backend.unavailable_reason()


def run_ort(path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def test_parse_version_reads_package_versions():
    assert trt_backend.parse_version("10.3.0.26") == (10, 3, 0)
    assert trt_backend.parse_version("8.6.1.post1") == (8, 6, 1)
    assert trt_backend.parse_version("11.0") == (11, 0, 0)
    with pytest.raises(EdgePruneError, match="MAJOR.MINOR.PATCH"):
        trt_backend.parse_version("unknown")


@pytest.mark.skipif(HAS_TRT, reason="tensorrt is installed here")
def test_measure_without_tensorrt_is_device_unreachable(tiny_onnx):
    assert trt_backend.version() is None
    assert "tensorrt Python package is not installed" in trt_backend.unavailable_reason()
    with pytest.raises(DeviceUnreachable, match="cannot measure tiny.onnx with TensorRT here") as info:
        trt_backend.measure(tiny_onnx, load_target("jetson"))
    assert info.value.code == ExitCode.DEVICE_UNREACHABLE


def test_engine_key_changes_with_model_precision_version_gpu_and_calibration():
    base = ("a" * 64, "fp16", "10.3.0", "Orin", "")
    keys = {trt_backend.engine_key(*base)}
    for i, other in enumerate(("b" * 64, "int8", "10.4.0", "NVIDIA H100", "calib")):
        changed = list(base)
        changed[i] = other
        keys.add(trt_backend.engine_key(*changed))
    assert len(keys) == 6
    assert trt_backend.engine_key(*base) == trt_backend.engine_key(*base)


def test_calibration_digest_follows_the_data():
    rng = np.random.default_rng(0)
    a = [rng.standard_normal((1, 3, 8, 8)).astype(np.float32) for _ in range(2)]
    assert trt_backend.calibration_digest(a) == trt_backend.calibration_digest([x.copy() for x in a])
    b = [a[0], a[1] + np.float32(1e-3)]
    assert trt_backend.calibration_digest(a) != trt_backend.calibration_digest(b)
    assert trt_backend.calibration_digest(None) == "random"


def test_calibration_batches_splits_stacked_arrays_and_casts_to_input_dtype():
    shapes = {"input": ((1, 3, 4, 4), False)}
    dtypes = {"input": np.dtype(np.float32)}
    stacked = np.arange(4 * 48, dtype=np.float64).reshape(4, 3, 4, 4)
    batches = trt_backend._calibration_batches([stacked, {"input": np.ones((1, 3, 4, 4))}], shapes, dtypes)
    assert len(batches) == 5 and all(b["input"].dtype == np.float32 for b in batches)
    assert np.array_equal(np.concatenate([b["input"] for b in batches[:4]]), stacked.astype(np.float32))
    with pytest.raises(EdgePruneError, match=r"has shape \(3, 4, 4\); the engine is built for \(1, 3, 4, 4\)"):
        trt_backend._calibration_batches([np.zeros((3, 4, 4))], shapes, dtypes)
    random = trt_backend._calibration_batches(None, shapes, dtypes)
    assert len(random) == trt_backend.RANDOM_CALIBRATION_BATCHES and random[0]["input"].shape == (1, 3, 4, 4)


def test_input_shapes_makes_symbolic_dimensions_one(tiny_onnx):
    model = onnx.load(tiny_onnx)
    assert trt_backend.input_shapes(model) == {"input": ((1, 3, 32, 32), False)}
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    assert trt_backend.input_shapes(model) == {"input": ((1, 3, 32, 32), True)}


def test_fp16_onnx_keeps_io_fp32_and_matches_fp32_outputs(tiny_onnx, tmp_path):
    dst = trt_backend.fp16_onnx(tiny_onnx, tmp_path / "tiny.fp16.onnx")
    model = onnx.load(str(dst))
    onnx.checker.check_model(model)  # nodes topologically sorted again after the converter's appended Casts
    assert {i.type.tensor_type.elem_type for i in model.graph.input} == {TensorProto.FLOAT}
    assert {o.type.tensor_type.elem_type for o in model.graph.output} == {TensorProto.FLOAT}
    float_inits = [i for i in model.graph.initializer if i.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16)]
    assert float_inits and all(i.data_type == TensorProto.FLOAT16 for i in float_inits)
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    ref, half = run_ort(tiny_onnx, x), run_ort(dst, x)
    assert half.dtype == np.float32
    # fp16 keeps ~3 significant digits: the outputs agree to a small fraction of their scale.
    assert np.abs(half - ref).max() <= 5e-3 * np.abs(ref).max()


def qdq_model(path) -> None:
    """Conv with QuantizeLinear/DequantizeLinear on its input and weight: an explicitly quantized graph."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    inits = [
        numpy_helper.from_array(w, "w"),
        numpy_helper.from_array(np.array(0.05, np.float32), "sx"),
        numpy_helper.from_array(np.array(0, np.int8), "zx"),
        numpy_helper.from_array(np.array(0.02, np.float32), "sw"),
        numpy_helper.from_array(np.array(0, np.int8), "zw"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"]),
        helper.make_node("QuantizeLinear", ["w", "sw", "zw"], ["wq"]),
        helper.make_node("DequantizeLinear", ["wq", "sw", "zw"], ["wd"]),
        helper.make_node("Conv", ["xd", "wd"], ["y"], pads=[1, 1, 1, 1]),
    ]
    graph = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def test_prepare_onnx_keeps_model_before_trt11(tiny_onnx, tmp_path):
    for precision in ("fp32", "fp16", "int8"):
        assert trt_backend.prepare_onnx(tiny_onnx, precision, (10, 3, 0), tmp_path) == tiny_onnx


def test_prepare_onnx_for_trt11(tiny_onnx, tmp_path):
    assert trt_backend.prepare_onnx(tiny_onnx, "fp32", (11, 0, 0), tmp_path) == tiny_onnx
    fp16 = trt_backend.prepare_onnx(tiny_onnx, "fp16", (11, 0, 0), tmp_path)
    assert fp16 != tiny_onnx and onnx.load(str(fp16)).graph.initializer[0].data_type == TensorProto.FLOAT16
    with pytest.raises(EdgePruneError, match="removed implicit INT8 calibration"):
        trt_backend.prepare_onnx(tiny_onnx, "int8", (11, 0, 0), tmp_path)
    qdq = tmp_path / "qdq.onnx"
    qdq_model(qdq)
    assert trt_backend.has_qdq(onnx.load(str(qdq))) and not trt_backend.has_qdq(onnx.load(tiny_onnx))
    assert trt_backend.prepare_onnx(qdq, "int8", (11, 0, 0), tmp_path) == qdq


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
    assert trt_backend.build_engine(tiny_onnx, target, cache_dir=tmp_path) == engines[0]
    assert engines[0].stat().st_mtime_ns == built  # served from the cache, not rebuilt


@pytest.mark.trt
@pytest.mark.gpu
@pytest.mark.skipif(GPU_REASON is not None, reason=f"needs TensorRT and a CUDA GPU: {GPU_REASON}")
def test_measure_int8_calibrates_from_batches(tiny_onnx, tmp_path):
    import tensorrt

    target = gpu_target("int8")
    rng = np.random.default_rng(0)
    batches = [rng.standard_normal((1, 3, 32, 32)).astype(np.float32) for _ in range(4)]
    if trt_backend.parse_version(tensorrt.__version__)[0] >= 11:
        with pytest.raises(EdgePruneError, match="removed implicit INT8 calibration"):
            trt_backend.measure(tiny_onnx, target, calibration=batches, cache_dir=tmp_path)
        return
    s = trt_backend.measure(tiny_onnx, target, calibration=batches, cache_dir=tmp_path)
    assert s.precision == "int8" and s.n == 60 and s.median > 0
    other = [b + np.float32(1.0) for b in batches]
    trt_backend.build_engine(tiny_onnx, target, calibration=other, cache_dir=tmp_path)
    assert len(list((tmp_path / "engines").glob("*.engine"))) == 2  # other calibration data, other engine
