"""The ONNX file each TensorRT version builds from: version strings, input shapes, the fp16 copy and the Q/DQ check
for TensorRT 11 (no TensorRT needed)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeprune.errors import EdgePruneError
from edgeprune.runtimes import trtonnx


def run_ort(path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def test_parse_version_reads_package_versions():
    assert trtonnx.parse_version("10.3.0.26") == (10, 3, 0)
    assert trtonnx.parse_version("8.6.1.post1") == (8, 6, 1)
    assert trtonnx.parse_version("11.0") == (11, 0, 0)
    with pytest.raises(EdgePruneError, match="MAJOR.MINOR.PATCH"):
        trtonnx.parse_version("unknown")


def test_input_shapes_makes_symbolic_dimensions_one(tiny_onnx):
    model = onnx.load(tiny_onnx)
    assert trtonnx.input_shapes(model) == {"input": ((1, 3, 32, 32), False)}
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    assert trtonnx.input_shapes(model) == {"input": ((1, 3, 32, 32), True)}


def test_fp16_onnx_keeps_io_fp32_and_matches_fp32_outputs(tiny_onnx, tmp_path):
    dst = trtonnx.fp16_onnx(tiny_onnx, tmp_path / "tiny.fp16.onnx")
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
        assert trtonnx.prepare_onnx(tiny_onnx, precision, (10, 3, 0), tmp_path) == tiny_onnx


def test_prepare_onnx_for_trt11(tiny_onnx, tmp_path):
    assert trtonnx.prepare_onnx(tiny_onnx, "fp32", (11, 0, 0), tmp_path) == tiny_onnx
    fp16 = trtonnx.prepare_onnx(tiny_onnx, "fp16", (11, 0, 0), tmp_path)
    assert fp16 != tiny_onnx and onnx.load(str(fp16)).graph.initializer[0].data_type == TensorProto.FLOAT16
    with pytest.raises(EdgePruneError, match="removed implicit INT8 calibration"):
        trtonnx.prepare_onnx(tiny_onnx, "int8", (11, 0, 0), tmp_path)
    qdq = tmp_path / "qdq.onnx"
    qdq_model(qdq)
    assert trtonnx.has_qdq(onnx.load(str(qdq))) and not trtonnx.has_qdq(onnx.load(tiny_onnx))
    assert trtonnx.prepare_onnx(qdq, "int8", (11, 0, 0), tmp_path) == qdq
