"""latency/cost.py: the allocation's latency model without a table: MACs plus the values each layer moves."""

from __future__ import annotations

import torch
from torch import nn

from edgeprune.dependency.graph import trace
from edgeprune.latency.cost import VALUE_MACS, layer_macs, layer_values, macs_cost, relative_cost, roofline_cost
from edgeprune.latency.table import LayerModel


class Inverted(nn.Module):
    """An inverted residual's three convs at 32x32: 1x1 expansion, 3x3 depthwise, 1x1 projection, then a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.expand = nn.Conv2d(8, 64, 1, bias=False)
        self.dw = nn.Conv2d(64, 64, 3, padding=1, groups=64, bias=False)
        self.project = nn.Conv2d(64, 16, 1, bias=False)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.project(torch.relu(self.dw(torch.relu(self.expand(x)))))
        return self.fc(x.mean((2, 3)))


def layer_model() -> LayerModel:
    model, x = Inverted().eval(), torch.randn(1, 8, 32, 32)
    return LayerModel.from_model(model, x, trace(model, x))


def test_values_count_input_output_and_weights() -> None:
    layers = {layer.name: layer for layer in layer_model().layers}
    dw, expand, fc = layers["dw"], layers["expand"], layers["fc"]
    assert layer_values(expand, 8, 64) == 8 * 32 * 32 + 64 * 32 * 32 + 64 * 8
    assert layer_values(dw, 64, 64) == 2 * 64 * 32 * 32 + 64 * 9
    assert layer_values(fc, 16, 10) == 16 + 10 + 160
    assert layer_macs(dw, 64, 64) == 64 * 9 * 32 * 32 and layer_macs(expand, 8, 64) == 8 * 64 * 32 * 32


def test_the_roofline_prices_the_depthwise_conv_above_its_macs_share() -> None:
    """The depthwise conv's 9 MACs per output value are cheap in MACs and dear in memory traffic: its share of the
    roofline cost is well above its share of the MACs; both models are 1 for the unpruned widths and fall with them."""
    lm = layer_model()
    full = lm.full()
    half = {g: w // 2 for g, w in full.items()}
    macs, roof = relative_cost(macs_cost(lm), full), relative_cost(roofline_cost(lm), full)
    assert macs(full) == roof(full) == 1.0 and 0.0 < roof(half) < 1.0 and 0.0 < macs(half) < 1.0
    layers = {layer.name: layer for layer in lm.layers}
    dw_share_macs = layer_macs(layers["dw"], 64, 64) / sum(layer_macs(layer, *layer.widths(full, lm.channels))
                                                           for layer in lm.layers)
    dw_cost = layer_macs(layers["dw"], 64, 64) + VALUE_MACS * layer_values(layers["dw"], 64, 64)
    assert dw_cost / roofline_cost(lm)(full) > 1.2 * dw_share_macs  # 0.36 against 0.27
