"""The input resized inside the model: the same outputs as resizing before it, in torch and in ONNX Runtime, with the
input shape unchanged; replayed by a plan and by pruned.pt; refused for outputs whose shape follows the input."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from torch import nn

from edgeprune.surgery.resize import input_size, size_free_outputs, with_input_size


class Classifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                  nn.Conv2d(16, 24, 3, stride=2, padding=1), nn.ReLU())
        self.head = nn.Linear(24, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x).mean((2, 3)))


class Segmenter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def test_a_resized_model_equals_the_model_on_a_resized_input_in_torch_and_onnx_runtime(tmp_path: Path) -> None:
    import onnxruntime as ort

    from edgeprune.export.onnx import export_onnx, simplify_onnx

    net = Classifier().eval()
    x = torch.randn(4, 3, 64, 64)
    resized = with_input_size(copy.deepcopy(net), (48, 40))
    with torch.no_grad():
        want = net(F.interpolate(x, size=(48, 40), mode="bilinear", align_corners=False))
        got = resized(x)
        assert not torch.allclose(net(x), want, atol=1e-3)  # the resize does change the outputs
    torch.testing.assert_close(got, want)
    assert input_size(resized) == (48, 40) and input_size(net) is None  # the original is left alone
    assert input_size(with_input_size(resized, (56, 56))) == (56, 56) and len(resized._forward_pre_hooks) == 1

    path = tmp_path / "m.onnx"
    export_onnx(with_input_size(resized, (48, 40)), x[:1], path, exporter="torchscript")
    simplify_onnx(path)
    dims = [d.dim_value for d in onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim]
    assert dims[1:] == [3, 64, 64]  # the user's pipeline feeds what it fed
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = np.concatenate([sess.run(None, {sess.get_inputs()[0].name: x[i:i + 1].numpy()})[0] for i in range(4)])
    np.testing.assert_allclose(out, want.numpy(), rtol=1e-4, atol=1e-4)


def test_a_plan_with_an_input_size_is_replayed_by_prune_and_by_pruned_pt(tmp_path: Path) -> None:
    from edgeprune.dependency.graph import trace
    from edgeprune.inputs.models import from_module
    from edgeprune.plan import Plan
    from edgeprune.report.artifacts import load_pruned, save_pruned
    from edgeprune.surgery.apply import prune

    net = Classifier().eval()
    example = torch.randn(1, 3, 64, 64)
    graph = trace(net, example)
    g = graph.groups[0]
    plan = Plan(model="python:Classifier", channels={g.name: g.channels}, kept={g.name: tuple(range(8))},
                criterion="l1", compensation=False, meta={"input_size": [48, 48]})
    pruned = prune(net, example, plan)
    assert input_size(pruned) == (48, 48) and input_size(net) is None
    x = torch.randn(3, 3, 64, 64)
    loaded = from_module(net, example)
    save_pruned(tmp_path / "pruned.pt", pruned, plan, loaded, ())
    again, replan = load_pruned(tmp_path / "pruned.pt")
    assert replan.meta["input_size"] == [48, 48] and input_size(again) == (48, 48)
    with torch.no_grad():
        torch.testing.assert_close(again(x), pruned(x))


def test_only_outputs_whose_shape_does_not_follow_the_input_count_as_size_free() -> None:
    example = torch.randn(1, 3, 64, 64)
    assert size_free_outputs(Classifier().eval(), example, (32, 32))
    assert not size_free_outputs(Segmenter().eval(), example, (32, 32))

    class Fixed(nn.Module):  # a model that only runs at its own size
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3 * 64 * 64, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x.flatten(1))

    assert not size_free_outputs(Fixed().eval(), example, (32, 32))
