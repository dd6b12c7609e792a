from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from edgeprune.errors import EdgePruneError
from edgeprune.export.onnx import check_onnx, export, export_onnx, parity, simplify_onnx
from edgeprune.inputs.models import load_model

from tests.conftest import make_tiny


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "resnet50"])
def test_export_parity_torchvision(name: str, tmp_path: Path) -> None:
    """ONNX Runtime matches torch within 1e-4 of the output scale after export and onnxsim."""
    m = load_model(f"torchvision:{name}")
    result = export(m.module, m.example_input, tmp_path / f"{name}.onnx")
    assert result.simplified and result.parity is not None
    assert result.parity.rel_error <= 1e-4, result.parity
    assert result.parity.scale > 0
    model = check_onnx(tmp_path / f"{name}.onnx")
    assert model.opset_import[0].version >= 17


def test_export_torchscript_exporter_matches_dynamo(tmp_path: Path) -> None:
    m = make_tiny()
    x = torch.randn(1, 3, 32, 32)
    a = export(m, x, tmp_path / "a.onnx", exporter="dynamo")
    b = export(m, x, tmp_path / "b.onnx", exporter="torchscript")
    assert a.parity.rel_error <= 1e-5 and b.parity.rel_error <= 1e-5


class _TupleOutputs(torch.nn.Module):
    """Returns (logits, (features, features pooled)), as a segmenter returns (detections, mask prototypes)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> tuple:
        f = torch.relu(self.conv(x))
        return self.fc(f.mean((2, 3))), (f, f.amax((2, 3)))


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_a_model_returning_a_tuple_exports_with_every_output_named(exporter: str, tmp_path: Path) -> None:
    """yolov8n-seg exited 2: TorchScript refused the output name "0" (a name of digits alone); now the first output
    is "output_0", the nested ones keep their parity names, and ONNX Runtime matches torch on each."""
    import onnxruntime as ort

    torch.manual_seed(0)
    m, x = _TupleOutputs().eval(), torch.randn(1, 3, 16, 16)
    path = export_onnx(m, x, tmp_path / "m.onnx", exporter=exporter)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [o.name for o in sess.get_outputs()] == ["output_0", "1.0", "1.1"]
    with torch.no_grad():
        logits, (f, pooled) = m(x)
    for got, want in zip(sess.run(None, {"input": x.numpy()}), (logits, f, pooled)):
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=1e-5)


def test_simplify_folds_constant_subgraph(tmp_path: Path) -> None:
    """y = x * (c + 1): onnxsim folds the Add of two constants, leaving one Mul with the same result."""
    from onnx import TensorProto, helper, numpy_helper

    c = numpy_helper.from_array(np.full((1,), 2.0, np.float32), "c")
    one = numpy_helper.from_array(np.ones((1,), np.float32), "one")
    graph = helper.make_graph(
        [helper.make_node("Add", ["c", "one"], ["k"]), helper.make_node("Mul", ["x", "k"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 4, 4])], [c, one])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10), str(tmp_path / "f.onnx"))
    simplify_onnx(tmp_path / "f.onnx")
    model = check_onnx(tmp_path / "f.onnx")
    assert [n.op_type for n in model.graph.node] == ["Mul"]
    import onnxruntime as ort

    x = np.random.default_rng(0).standard_normal((1, 3, 4, 4)).astype(np.float32)
    (y,) = ort.InferenceSession(str(tmp_path / "f.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    np.testing.assert_allclose(y, x * 3.0, rtol=1e-6)


def test_export_leaves_no_temporary_files(tmp_path: Path) -> None:
    export(make_tiny(), torch.randn(1, 3, 32, 32), tmp_path / "m.onnx", exporter="torchscript")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_check_onnx_rejects_truncated(tiny_onnx: Path, tmp_path: Path) -> None:
    data = tiny_onnx.read_bytes()
    bad = tmp_path / "cut.onnx"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(EdgePruneError, match="cut.onnx"):
        check_onnx(bad)


def test_check_onnx_rejects_text_file(tmp_path: Path) -> None:
    bad = tmp_path / "notes.onnx"
    bad.write_text("this is not a model\n" * 10)
    with pytest.raises(EdgePruneError, match="notes.onnx"):
        check_onnx(bad)


def test_check_onnx_rejects_missing_file(tmp_path: Path) -> None:
    with pytest.raises(EdgePruneError, match="does not exist"):
        check_onnx(tmp_path / "none.onnx")


def test_export_untraceable_model_is_clear_error(tmp_path: Path) -> None:
    class DataDependent(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum() > 0:  # data-dependent control flow cannot be captured by the dynamo exporter
                return x * 2
            return x.nonzero().float().sum().reshape(1) * x

    with pytest.raises(EdgePruneError, match="exporter cannot export DataDependent"):
        export_onnx(DataDependent(), torch.ones(1, 3, 4, 4), tmp_path / "d.onnx", exporter="dynamo")
    assert not any(tmp_path.iterdir())


def test_parity_detects_a_different_model(tiny_onnx: Path) -> None:
    other = make_tiny()
    with torch.no_grad():
        other.head.weight.mul_(2.0)
    p = parity(other, torch.randn(1, 3, 32, 32), tiny_onnx)
    assert p.rel_error > 1e-2
    assert np.isfinite(p.max_abs)
