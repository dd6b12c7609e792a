"""quantize.py: ONNX Runtime's static quantisation of edgeprune's exports, the calibration reader's checks, and the
quantised model run as an nn.Module."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from edgeprune.errors import EdgePruneError
from edgeprune.export.onnx import export_onnx
from edgeprune.export.quantize import OnnxModule, Quantizer, has_qdq, output_template, quantize_onnx
from edgeprune.inputs.targets import load_target

CALIB = np.random.default_rng(0).standard_normal((24, 3, 32, 32)).astype(np.float32)


def initializers(path: Path) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}


def test_quantize_onnx_writes_per_channel_qdq_and_the_same_file_for_the_same_inputs(tiny_onnx: Path,
                                                                                     tmp_path: Path) -> None:
    config = load_target("cpu-int8").quantization
    a = quantize_onnx(tiny_onnx, tmp_path / "a.onnx", CALIB, config)
    b = quantize_onnx(tiny_onnx, tmp_path / "b.onnx", CALIB, config)
    assert a.read_bytes() == b.read_bytes()
    model = onnx.load(str(a))
    assert has_qdq(model) and not has_qdq(onnx.load(str(tiny_onnx)))
    weights = {n.input[0]: n for n in model.graph.node if n.op_type == "DequantizeLinear"}
    inits = initializers(a)
    quantised = [inits[name] for name in weights if name in inits and inits[name].dtype == np.int8 and
                 inits[name].ndim == 4]
    assert sorted(w.shape[0] for w in quantised) == [16, 32]  # both convs, int8
    scales = [inits[weights[name].input[1]] for name in weights if name in inits and inits[name].ndim == 4]
    assert sorted(s.size for s in scales) == [16, 32]  # one scale per output channel
    # reduce_range (7-bit weights, the AVX2 setting) keeps every weight within +-64
    assert all(np.abs(w.astype(np.int32)).max() <= 64 for w in quantised)
    other = quantize_onnx(tiny_onnx, tmp_path / "c.onnx", 3 * CALIB, config)
    assert other.read_bytes() != a.read_bytes()  # other calibration data, other scales


@pytest.mark.parametrize("method", ["entropy", "percentile"])
def test_histogram_methods_are_deterministic(tiny_onnx: Path, tmp_path: Path, method: str) -> None:
    """(ONNX Runtime's entropy method, through quantize_static, histograms in 128 bins for 128 quantised bins: its
    search has the full range as its one candidate until later batches widen the histogram, so on this model it gives
    MinMax's scales; docs/implementation.md. The percentile cut shows the setting reaches the calibrator.)"""
    import dataclasses

    config = dataclasses.replace(load_target("cpu-int8").quantization, method=method, samples=8, percentile=99.0)
    a = quantize_onnx(tiny_onnx, tmp_path / "a.onnx", CALIB, config)
    b = quantize_onnx(tiny_onnx, tmp_path / "b.onnx", CALIB, config)
    assert a.read_bytes() == b.read_bytes()
    if method == "percentile":
        minmax = quantize_onnx(tiny_onnx, tmp_path / "m.onnx", CALIB, dataclasses.replace(config, method="minmax"))
        assert a.read_bytes() != minmax.read_bytes()


class ShapeReader:
    """A calibration data reader as ONNX Runtime's protocol has it, yielding 16x16 images to a 32x32 model."""

    def __init__(self) -> None:
        self.left = 3

    def get_next(self) -> dict[str, np.ndarray] | None:
        self.left -= 1
        return {"input": np.zeros((1, 3, 16, 16), np.float32)} if self.left >= 0 else None


@pytest.mark.parametrize("calibration", [ShapeReader(), np.zeros((4, 3, 16, 16), np.float32)],
                         ids=["reader", "array"])
def test_quantize_onnx_refuses_batches_of_the_wrong_shape_and_writes_nothing(tiny_onnx: Path, tmp_path: Path,
                                                                            calibration: object) -> None:
    out = tmp_path / "q" / "model.int8.onnx"
    with pytest.raises(EdgePruneError, match=r"input input of shape \[1, 3, 16, 16\] \(float32\) for batch 0; "
                                             r"the model takes float32 1x3x32x32"):
        quantize_onnx(tiny_onnx, out, calibration, load_target("cpu-int8").quantization)
    assert not out.exists() and not any(out.parent.iterdir())


def test_quantize_onnx_refuses_an_already_quantised_model(tiny_onnx: Path, tmp_path: Path) -> None:
    config = load_target("cpu-int8").quantization
    q = quantize_onnx(tiny_onnx, tmp_path / "q.onnx", CALIB, config)
    with pytest.raises(EdgePruneError, match="already quantised"):
        quantize_onnx(q, tmp_path / "qq.onnx", CALIB, config)


def test_tensorrt_settings_quantise_activations_symmetric_int8(tiny_onnx: Path, tmp_path: Path) -> None:
    """TensorRT builds int8 layers from Q/DQ pairs only with zero point 0 (symmetric int8)."""
    q = Quantizer(load_target("jetson-orin-nano-int8").quantization, CALIB)(tiny_onnx.parent / "tiny.onnx")
    model, inits = onnx.load(str(q)), initializers(q)
    zero_points = [inits[n.input[2]] for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert zero_points and all(z.dtype == np.int8 and not z.any() for z in zero_points)
    cpu = quantize_onnx(tiny_onnx, tmp_path / "cpu.onnx", CALIB, load_target("cpu-int8").quantization)
    cpu_inits = initializers(cpu)
    assert any(cpu_inits[n.input[2]].dtype == np.uint8 for n in onnx.load(str(cpu)).graph.node
               if n.op_type == "QuantizeLinear")


class TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Conv2d(3, 8, 3, padding=1)
        self.cls = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor | tuple[torch.Tensor, ...]]:
        f = torch.relu(self.body(x))
        return {"logits": self.cls(f.mean((2, 3))), "maps": (f[:, :2], f[:, 2:])}


def test_onnx_module_runs_the_file_and_returns_the_torch_models_structure(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = TwoHeads().eval()
    example = torch.randn(1, 3, 8, 8)
    path = export_onnx(model, example, tmp_path / "two.onnx", exporter="torchscript")
    module = OnnxModule(path, template=output_template(model, example))
    x = torch.randn(5, 3, 8, 8)  # the file takes batches of 1: run in five slices
    out, ref = module(x), model(x)
    assert set(out) == {"logits", "maps"} and isinstance(out["maps"], tuple) and len(out["maps"]) == 2
    torch.testing.assert_close(out["logits"], ref["logits"], rtol=1e-4, atol=1e-5)
    for got, want in zip(out["maps"], ref["maps"]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    import copy

    again = copy.deepcopy(module)  # the session does not copy: it is made again
    torch.testing.assert_close(again(x)["logits"], out["logits"])


def test_quantised_example_agrees_with_the_float_pruned_model(pruned_example: dict, tmp_path: Path) -> None:
    """The issue's bar: top-1 agreement of the quantised pruned example with the float pruned model on >= 98% of the
    held-out digits, its accuracy within 1 point of the float pruned model's."""
    from edgeprune.quality.fidelity import fidelity

    prep, pruned = pruned_example["prep"], pruned_example["pruned"]
    q = Quantizer(load_target("cpu-int8").quantization, prep.data.calib_x)(pruned_example["onnx"])
    qmodel = OnnxModule(q, template=output_template(pruned, prep.loaded.example_input))
    alone = fidelity(pruned, qmodel, prep.data)
    assert alone.samples == len(prep.data.heldout_x) == 199 and len(prep.data.calib_x) == 200
    from edgeprune.inputs.data import load_data
    from edgeprune.inputs.recipe import load_recipe

    default = load_data(load_recipe("digits"), prep.loaded.input_shape)  # the held-out digits of every example run
    assert np.array_equal(default.heldout_x, prep.data.heldout_x)
    assert alone.top1_agreement >= 0.98, alone
    assert alone.accuracy_drop_pp <= 1.0, alone
    assert 0 < alone.output_rel_error < 0.1  # quantised: close, not equal
