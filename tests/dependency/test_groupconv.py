"""Grouped convolutions pruned in whole groups: the group a grouped conv reads and the group it makes are one group
whose units are the conv's groups; plans keep whole units, pruning removes whole conv groups, and what cannot be
merged is excluded with its reason."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from edgeprune.compensation.statistics import collect_statistics
from edgeprune.dependency.graph import trace
from edgeprune.errors import EdgePruneError
from edgeprune.plan import Plan, plan_from_rankings, uniform_widths
from edgeprune.scoring.registry import rank
from edgeprune.search.allocate import min_widths
from edgeprune.surgery.apply import prune
from tests.models import ZOO, conv_bn, settle


def grouped() -> tuple[nn.Module, torch.Tensor]:
    entry = ZOO["grouped"]
    return entry.build(), entry.example_input()


def test_trace_merges_the_groups_around_a_grouped_conv_into_units_of_its_groups() -> None:
    model, x = grouped()
    g = trace(model, x).group("conv1.0")
    assert g.units == ((0, 1, 2, 3), (4, 5, 6, 7)) and g.unit == 4
    assert "gconv.0" in g.members and [c.module for c in g.consumers] == ["conv3.0"]
    assert g.to_dict()["unit"] == 4


def test_pruning_whole_units_removes_conv_groups_and_equals_masking_their_channels() -> None:
    """Without compensation, the pruned model computes what the original computes with conv3's input columns of the
    removed unit zeroed: the kept conv group's kernels are the original ones, nothing else moved."""
    model, x = grouped()
    graph = trace(model, x)
    plan = Plan(kept={"conv1.0": (4, 5, 6, 7)}, channels={g.name: g.channels for g in graph.groups},
                compensation=False)
    pruned = prune(model, x, plan, graph=graph)
    gconv = pruned.gconv[0]
    assert (gconv.in_channels, gconv.out_channels, gconv.groups) == (4, 4, 1)
    assert torch.equal(gconv.weight, model.gconv[0].weight[4:])
    masked = copy.deepcopy(model)
    with torch.no_grad():
        masked.conv3[0].weight[:, :4] = 0
    xs = torch.randn(8, 3, 16, 16) + 0.3
    with torch.no_grad():
        assert torch.allclose(pruned(xs), masked(xs), atol=1e-5)


def test_compensated_unit_pruning_lowers_the_error_against_slicing() -> None:
    model, x = grouped()
    graph = trace(model, x)
    xs = [torch.randn(16, 3, 16, 16) + 0.3 for _ in range(4)]
    stats = collect_statistics(model, graph.consumer_modules(), xs)
    ranking = rank("cap", model, graph.group("conv1.0"), stats)
    kept = tuple(sorted(ranking.order[:4]))
    assert kept in ((0, 1, 2, 3), (4, 5, 6, 7))
    held = torch.randn(32, 3, 16, 16) + 0.3
    errs = {}
    for comp in (False, True):
        plan = Plan(kept={"conv1.0": kept}, channels={g.name: g.channels for g in graph.groups}, compensation=comp)
        pruned = prune(model, x, plan, stats, graph=graph)
        with torch.no_grad():
            y0, y = model(held), pruned(held)
        errs[comp] = float((y - y0).norm() / y0.norm())
    assert errs[True] < 0.8 * errs[False], errs


@pytest.mark.parametrize("criterion", ["cap", "l1", "fpgm", "random"])
def test_every_criterion_ranks_whole_units(criterion: str) -> None:
    model, x = grouped()
    graph = trace(model, x)
    stats = collect_statistics(model, graph.consumer_modules(), [torch.randn(16, 3, 16, 16) + 0.3 for _ in range(4)])
    r = rank(criterion, model, graph.group("conv1.0"), stats)
    assert {r.order[:4], r.order[4:]} == {(0, 1, 2, 3), (4, 5, 6, 7)}
    if r.loss is not None:
        assert len(r.loss) == 9 and r.loss[8] <= r.loss[4] + 1e-12 <= r.loss[0] + 2e-12


def test_widths_are_whole_units_and_plans_keep_whole_units() -> None:
    model, x = grouped()
    graph = trace(model, x)
    assert min_widths(graph, 1)["conv1.0"] == 4 and min_widths(graph, 1)["conv3.0"] == 1
    assert uniform_widths(graph, 0.4, 1)["conv1.0"] == 4  # 8 * 0.6 = 4.8: the nearest whole unit
    order = {"conv1.0": type("R", (), {"order": (5, 0, 1, 2, 3, 4, 6, 7)})(),
             "conv3.0": type("R", (), {"order": tuple(range(16))})()}
    plan = plan_from_rankings(graph, order, {"conv1.0": 3, "conv3.0": 16})  # 3 channels: one whole unit, (4..7)
    assert plan.kept["conv1.0"] == (4, 5, 6, 7)
    bad = Plan(kept={"conv1.0": (0, 1, 2, 4, 5, 6, 7)}, channels={g.name: g.channels for g in graph.groups})
    with pytest.raises(EdgePruneError, match=r"keeps part of a unit of group 'conv1.0' \(channels 0..3\)"):
        prune(model, x, bad, graph=graph)


class AddedGrouped(nn.Module):
    """A grouped conv whose output joins a residual stream: its output channels are coupled with the stem's."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn(3, 8)
        self.conv1 = conv_bn(8, 8, k=1)
        self.gconv = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.stem(x)
        return self.head(s + self.gconv(self.conv1(s)))


class Widening(nn.Module):
    """A grouped conv that doubles its width (8 -> 16, groups=2): its input and output units differ."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = conv_bn(3, 8)
        self.gconv = conv_bn(8, 16, groups=2)
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.gconv(self.conv1(x)))


@pytest.mark.parametrize("make, words", [(AddedGrouped, "whose output channels are coupled with"),
                                         (Widening, "input and output widths differ (8 -> 16)")])
def test_unmergeable_grouped_convs_are_excluded_with_their_reason(make: type, words: str) -> None:
    torch.manual_seed(0)
    model = settle(make())
    graph = trace(model, torch.randn(1, 3, 16, 16))
    reasons = " | ".join(graph.excluded.values())
    assert words in reasons and "gconv" in reasons, graph.excluded
    assert all(not g.units for g in graph.groups)
    assert all("gconv" not in g.members for g in graph.groups)


def test_resnext_prunes_every_bottleneck_in_whole_groups() -> None:
    """resnext50_32x4d: every bottleneck's 1x1 -> grouped 3x3 pair is one group of 32 units (32 groups were excluded
    before), and a pruned copy keeps its outputs' shape with fewer conv groups."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnext50_32x4d(num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    graph = trace(model, x)
    units = [g for g in graph.groups if g.units]
    assert len(units) == 16 and not graph.excluded
    assert all(len(g.units) == 32 and g.unit == g.channels // 32 for g in units)
    layer = units[0]
    plan = Plan(kept={layer.name: tuple(range(layer.channels // 2))},
                channels={g.name: g.channels for g in graph.groups}, compensation=False)
    pruned = prune(model, x, plan, graph=graph)
    assert pruned.layer1[0].conv2.groups == 16 and pruned.layer1[0].conv2.in_channels == 64
    with torch.no_grad():
        assert pruned(x).shape == model(x).shape and np.isfinite(pruned(x).numpy()).all()


def test_latency_model_follows_a_grouped_conv_by_its_group_width(tmp_path) -> None:
    """Latency tables and the MACs cost see the grouped conv at the group's width, with as many conv groups as
    whole units remain, and its one-layer ONNX model at that width runs."""
    import onnxruntime as ort

    from edgeprune.latency.cost import layer_macs
    from edgeprune.latency.table import LayerModel
    from edgeprune.latency.measure_table import build_layer_onnx

    model, x = grouped()
    graph = trace(model, x)
    layers = {layer.name: layer for layer in LayerModel.from_model(model, x, graph).layers}
    g = layers["gconv.0"]
    assert g.spec["kind"] == "gconv" and g.spec["group_width"] == 4 and g.depthwise and g.out_group == "conv1.0"
    assert "groups" in layers["conv3.0"].spec  # dense convs keep their signature
    assert g.widths({"conv1.0": 4}, {"conv1.0": 8, "conv3.0": 16}) == (4, 4)
    assert layer_macs(g, 4, 4) == 4 * 4 * 9 * 16 * 16 and layer_macs(g, 8, 8) == 2 * layer_macs(g, 4, 4)
    path = build_layer_onnx(g.spec, 4, 4, tmp_path / "g.onnx")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    y = sess.run(None, {"x": np.zeros((1, 4, 16, 16), np.float32)})[0]
    assert y.shape == (1, 4, 16, 16)


class GatedGrouped(nn.Module):
    """RegNetY's shape: 1x1 -> grouped 3x3 -> squeeze-excite gate -> 1x1; the gate's last conv makes the grouped
    conv's channels too."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = conv_bn(3, 8, k=1)
        self.gconv = conv_bn(8, 8, groups=2)
        self.fc1, self.fc2 = nn.Conv2d(8, 4, 1), nn.Conv2d(4, 8, 1)
        self.conv3 = nn.Conv2d(8, 6, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.gconv(self.conv1(x))
        gate = torch.sigmoid(self.fc2(torch.relu(self.fc1(y.mean((2, 3), keepdim=True)))))
        return self.conv3(y * gate)


def test_a_squeeze_excite_gated_grouped_conv_prunes_its_gate_with_it() -> None:
    torch.manual_seed(0)
    model = settle(GatedGrouped())
    x = torch.randn(1, 3, 16, 16) + 0.3
    graph = trace(model, x)
    g = graph.group("conv1.0")
    assert g.producers == ("conv1.0", "fc2") and g.unit == 4 and {c.module for c in g.consumers} == {"fc1", "conv3"}
    stats = collect_statistics(model, graph.consumer_modules(), [torch.randn(16, 3, 16, 16) + 0.3 for _ in range(4)])
    kept = tuple(sorted(rank("cap", model, g, stats).order[:4]))
    held = torch.randn(32, 3, 16, 16) + 0.3
    errs = {}
    for comp in (False, True):
        plan = Plan(kept={"conv1.0": kept}, channels={q.name: q.channels for q in graph.groups}, compensation=comp)
        pruned = prune(model, x, plan, stats, graph=graph)
        assert pruned.fc2.out_channels == 4 and pruned.gconv[0].groups == 1 and pruned.fc1.in_channels == 4
        with torch.no_grad():
            errs[comp] = float((pruned(held) - model(held)).norm() / model(held).norm())
    assert errs[True] < errs[False], errs
