"""A tiny model zoo for the pruning core: each entry pairs a small, fast model with the channel groups it must trace to.

    from tests.models import ZOO
    for entry in ZOO.values():
        model, x = entry.build(), entry.example_input()
        entry.check_graph(trace(model, x))

Every model has the structures pruning must respect (a residual stream, a depthwise conv, a concat, a squeeze-excite
gate, a Linear after a flatten, a grouped conv) at 16x16 inputs. BatchNorm layers get non-trivial running statistics
and affine parameters (`settle`), so that compensation and the variance rescale are meaningful.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from edgeprune.dependency.graph import Graph

INPUT_SHAPE = (1, 3, 16, 16)


def conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1, dilation: int = 1) -> nn.Sequential:
    pad = dilation * (k // 2)
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, pad, dilation=dilation, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU())


class ConvChain(nn.Module):
    """Plain conv-BN-ReLU chain (one strided, one dilated), global pool, Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = conv_bn(3, 8)
        self.conv2 = conv_bn(8, 16, stride=2)
        self.conv3 = conv_bn(16, 16, dilation=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv3(self.conv2(self.conv1(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


class Block(nn.Module):
    """Basic residual block: conv-BN-ReLU, conv-BN, + identity, ReLU."""

    def __init__(self, width: int, inner: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(width, inner, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(inner)
        self.conv2 = nn.Conv2d(inner, width, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + x)


class Residual(nn.Module):
    """A stem and two residual blocks on one 16-channel stream: the stream has three producers."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn(3, 16)
        self.block1 = Block(16, 8)
        self.block2 = Block(16, 12)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block2(self.block1(self.stem(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


class DepthwiseSeparable(nn.Module):
    """MobileNet style: stem, depthwise 3x3 (BN, ReLU), pointwise 1x1 (BN, ReLU), head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn(3, 16)
        self.dw = conv_bn(16, 16, groups=16)
        self.pw = conv_bn(16, 24, k=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(24, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pw(self.dw(self.stem(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


class Concat(nn.Module):
    """Inception/DenseNet style: two branches of different widths concatenated, then a 3x3 conv reads both."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn(3, 8)
        self.branch_a = conv_bn(8, 6, k=1)
        self.branch_b = conv_bn(8, 10)
        self.fuse = conv_bn(16, 16)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.fuse(torch.cat([self.branch_a(x), self.branch_b(x)], 1))
        return self.fc(torch.flatten(self.pool(x), 1))


class SqueezeExcite(nn.Module):
    """Squeeze-excite gate: avgpool, 1x1 conv (fc1), ReLU, 1x1 conv (fc2), sigmoid, multiplying the features."""

    def __init__(self, width: int, squeeze: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(width, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.fc2(torch.relu(self.fc1(self.pool(x)))))


class SENet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn(3, 8)
        self.conv = conv_bn(8, 16)
        self.se = SqueezeExcite(16, 8)
        self.proj = conv_bn(16, 16)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(self.se(self.conv(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


class FlattenHead(nn.Module):
    """A Linear reading a flattened 2x2 map (each channel occupies 4 features), then a second Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = conv_bn(3, 8)
        self.conv2 = conv_bn(8, 8, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc1 = nn.Linear(8 * 4, 16)
        self.fc2 = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.conv2(self.conv1(x)))
        return self.fc2(torch.relu(self.fc1(torch.flatten(x, 1))))


class GroupedConv(nn.Module):
    """A grouped conv (groups=2, not depthwise): the group it reads and the group it makes are pruned as one, in whole
    conv groups of 4 channels (edgeprune/groupconv.py)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = conv_bn(3, 8)
        self.gconv = conv_bn(8, 8, groups=2)
        self.conv3 = conv_bn(8, 16)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv3(self.gconv(self.conv1(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def settle(model: nn.Module, seed: int = 0, batches: int = 4) -> nn.Module:
    """Deterministic weights, random BN affine parameters and BN running statistics from a few batches; eval mode.

    Inputs are shifted normals (not zero-mean), so activations have non-trivial means for the bias terms to absorb.
    """
    torch.manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.3, 0.3)
            m.momentum = None  # cumulative average over the settling batches
    model.train()
    with torch.no_grad():
        for _ in range(batches):
            model(torch.randn(16, *INPUT_SHAPE[1:]) + 0.3)
    return model.eval()


@dataclass(frozen=True)
class ExpectedGroup:
    channels: int
    producers: tuple[str, ...]
    consumers: tuple[str, ...]  # in any order
    members: tuple[str, ...] = ()  # in any order; pass-through layers with weights (BN, depthwise convs)
    coords: dict[str, tuple[int, int]] = field(default_factory=dict)  # consumer -> (offset, block): channel j at
    # coordinates offset + j*block .. offset + (j+1)*block - 1; consumers not listed use (0, kh*kw or 1)


@dataclass(frozen=True)
class ZooEntry:
    """A zoo model, the groups it must trace to (in forward order), its output layers and excluded groups."""

    name: str
    make: Callable[[], nn.Module]
    groups: dict[str, ExpectedGroup]
    output_layers: tuple[str, ...]
    excluded: dict[str, str] = field(default_factory=dict)  # group root -> words its reason must contain

    def build(self, seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)  # before construction: the same weights in every process (the audit's F11)
        return settle(self.make(), seed)

    def example_input(self, batch: int = 1, seed: int = 0) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return torch.randn((batch, *INPUT_SHAPE[1:]), generator=g) + 0.3

    def check_graph(self, graph: Graph, model: nn.Module) -> None:
        """The traced groups are exactly the expected ones: widths, producers, members, consumers, coordinates."""
        modules = dict(model.named_modules())
        # (the order of the groups is checked by test_trace_groups_are_in_forward_order)
        assert sorted(g.name for g in graph.groups) == sorted(self.groups), [g.name for g in graph.groups]
        for g in graph.groups:
            e = self.groups[g.name]
            assert g.channels == e.channels, (g.name, g.channels)
            assert sorted(g.producers) == sorted(e.producers), (g.name, g.producers)
            assert sorted(g.members) == sorted(e.members), (g.name, g.members)
            assert sorted(c.module for c in g.consumers) == sorted(e.consumers), (g.name, g.consumers)
            for c in g.consumers:
                m = modules[c.module]
                block = m.kernel_size[0] * m.kernel_size[1] if isinstance(m, nn.Conv2d) else 1
                offset, block = e.coords.get(c.module, (0, block))
                want = tuple(tuple(range(offset + j * block, offset + (j + 1) * block)) for j in range(e.channels))
                assert c.coords == want, (g.name, c.module, c.coords)
                assert c.compensable
        assert set(graph.excluded) == set(self.excluded), graph.excluded
        for name, words in self.excluded.items():
            assert words in graph.excluded[name], (name, graph.excluded[name])
        assert set(graph.output_layers) == set(self.output_layers), graph.output_layers


def _g(channels: int, producers: str | tuple[str, ...], consumers: tuple[str, ...], members: tuple[str, ...] = (),
       coords: dict[str, tuple[int, int]] | None = None) -> ExpectedGroup:
    producers = (producers,) if isinstance(producers, str) else producers
    return ExpectedGroup(channels, producers, consumers, members, coords or {})


ZOO: dict[str, ZooEntry] = {e.name: e for e in [
    ZooEntry("chain", ConvChain, {
        "conv1.0": _g(8, "conv1.0", ("conv2.0",), ("conv1.1",)),
        "conv2.0": _g(16, "conv2.0", ("conv3.0",), ("conv2.1",)),
        "conv3.0": _g(16, "conv3.0", ("fc",), ("conv3.1",)),
    }, output_layers=("fc",)),
    ZooEntry("residual", Residual, {
        "stem.0": _g(16, ("stem.0", "block1.conv2", "block2.conv2"), ("block1.conv1", "block2.conv1", "fc"),
                     ("stem.1", "block1.bn2", "block2.bn2")),
        "block1.conv1": _g(8, "block1.conv1", ("block1.conv2",), ("block1.bn1",)),
        "block2.conv1": _g(12, "block2.conv1", ("block2.conv2",), ("block2.bn1",)),
    }, output_layers=("fc",)),
    ZooEntry("depthwise", DepthwiseSeparable, {
        "dw.0": _g(16, "stem.0", ("pw.0",), ("stem.1", "dw.0", "dw.1")),  # named after its root, the depthwise conv
        "pw.0": _g(24, "pw.0", ("fc",), ("pw.1",)),
    }, output_layers=("fc",)),
    ZooEntry("concat", Concat, {
        "stem.0": _g(8, "stem.0", ("branch_a.0", "branch_b.0"), ("stem.1",)),
        "branch_a.0": _g(6, "branch_a.0", ("fuse.0",), ("branch_a.1",)),
        "branch_b.0": _g(10, "branch_b.0", ("fuse.0",), ("branch_b.1",), coords={"fuse.0": (6 * 9, 9)}),
        "fuse.0": _g(16, "fuse.0", ("fc",), ("fuse.1",)),
    }, output_layers=("fc",)),
    ZooEntry("se", SENet, {
        "stem.0": _g(8, "stem.0", ("conv.0",), ("stem.1",)),
        "se.fc2": _g(16, ("conv.0", "se.fc2"), ("se.fc1", "proj.0"), ("conv.1",)),  # gated features x * s
        "se.fc1": _g(8, "se.fc1", ("se.fc2",)),
        "proj.0": _g(16, "proj.0", ("fc",), ("proj.1",)),
    }, output_layers=("fc",)),
    ZooEntry("flatten_head", FlattenHead, {
        "conv1.0": _g(8, "conv1.0", ("conv2.0",), ("conv1.1",)),
        "conv2.0": _g(8, "conv2.0", ("fc1",), ("conv2.1",), coords={"fc1": (0, 4)}),
        "fc1": _g(16, "fc1", ("fc2",)),
    }, output_layers=("fc2",)),
    ZooEntry("grouped", GroupedConv, {
        "conv1.0": _g(8, "conv1.0", ("conv3.0",), ("conv1.1", "gconv.0", "gconv.1")),  # in units of 4
        "conv3.0": _g(16, "conv3.0", ("fc",), ("conv3.1",)),
    }, output_layers=("fc",)),
]}

# Models whose every group is prunable.
PRUNABLE = tuple(ZOO)
