"""compensation/statistics.py: every consumer the model calls is observed in the calibration copy, whatever its class
(issue 31: timm's `Linear` classifier was traced into by torch.fx and never ran there), and a layer that truly never
runs is still refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from edgeprune.compensation.statistics import _calibration_copy, collect_statistics
from edgeprune.errors import EdgePruneError


class OutsideLinear(nn.Linear):
    """A Linear defined outside torch.nn, as timm's `timm.layers.Linear`: torch.fx traces into its forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class Head(nn.Module):
    """timm's mobile head in small: global pool -> conv_head -> flatten -> classifier; `functional` uses the
    classifier's weights without calling it (a layer that never runs); `unused` is never touched."""

    def __init__(self, functional: bool = False) -> None:
        super().__init__()
        self.functional = functional
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv_head = nn.Conv2d(8, 16, 1)
        self.classifier = OutsideLinear(16, 4)
        self.unused = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.conv(x))).mean((2, 3), keepdim=True)
        x = torch.flatten(torch.relu(self.conv_head(x)), 1)
        if self.functional:
            return F.linear(x, self.classifier.weight, self.classifier.bias)
        return self.classifier(x)


def batches(n: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(8, 3, 8, 8, generator=g) for _ in range(n)]


def test_a_linear_from_outside_torch_nn_runs_in_the_calibration_copy() -> None:
    torch.manual_seed(0)
    consumers = ["conv_head", "classifier"]
    copy, _ = _calibration_copy(Head().eval(), consumers)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in copy.modules())  # still folded: the speed-up kept
    stats = collect_statistics(Head().eval(), consumers, batches(), strict=False)
    assert stats["classifier"].count == 24  # one patch per sample, every batch seen


def test_a_layer_used_only_through_its_weights_is_refused() -> None:
    with pytest.raises(EdgePruneError, match="layer classifier never ran during calibration"):
        collect_statistics(Head(functional=True).eval(), ["conv_head", "classifier"], batches(), strict=False)


def test_a_layer_never_called_is_refused() -> None:
    with pytest.raises(EdgePruneError, match="layer unused never ran during calibration"):
        collect_statistics(Head().eval(), ["conv_head", "unused"], batches(), strict=False)


@pytest.mark.parametrize("name", ["mobilenetv4_conv_small_035", "ghostnet_050", "lcnet_035"])
def test_timm_mobile_heads_prune_and_export(name: str, tmp_path: Path) -> None:
    """The three families of issue 31 (head: global_pool -> conv_head -> flatten -> classifier) calibrate, prune at
    a fixed ratio, and their model.onnx computes what the pruned module does."""
    timm = pytest.importorskip("timm")
    import onnxruntime as ort

    import edgeprune

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10).eval()
    r = edgeprune.prune(model, ratio=0.5, input_shape=(1, 3, 64, 64), calibration="random", out=tmp_path / "out",
                        criterion="l1", exporter="torchscript")
    assert r.module.classifier.in_features < model.classifier.in_features  # the head's groups were pruned too
    x = np.random.default_rng(1).standard_normal((1, 3, 64, 64)).astype(np.float32)
    sess = ort.InferenceSession(str(r.onnx_path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    with torch.no_grad():
        want = r.module(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_a_linear_reading_tokens_takes_every_token_as_a_sample() -> None:
    """A transformer's Linear reads (B, N, C) tokens: its statistics are the mean and covariance over all B·N tokens
    (the token axis is a sample axis), as the closed-form repair of fc2 or proj needs (issue 31, item 3)."""

    class Tokens(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Conv2d(3, 6, 2, stride=2)
            self.fc = nn.Linear(6, 5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.tanh(self.embed(x)).flatten(2).transpose(1, 2))  # (B, 16, 6) tokens

    torch.manual_seed(0)
    model = Tokens().eval()
    xs = batches(2)
    stats = collect_statistics(model, ["fc"], xs, shrink=False)["fc"]
    with torch.no_grad():
        tokens = torch.cat([torch.tanh(model.embed(x)).flatten(2).transpose(1, 2).reshape(-1, 6) for x in xs])
    t = tokens.double().numpy()
    assert stats.count == 2 * 8 * 16 and stats.block == 1
    assert np.allclose(stats.mean, t.mean(0), atol=1e-6)
    assert np.allclose(stats.cov, np.cov(t, rowvar=False, bias=True), atol=1e-6)
