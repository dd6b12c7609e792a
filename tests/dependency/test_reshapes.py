"""The reshapes torch-pruning cannot map are cut out of its dependency graph: the grouping ends, and the groups that
reach one are excluded, said why."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from edgeprune.dependency.graph import trace
from edgeprune.dependency.reshapes import is_mapped


class HeadAttention(nn.Module):
    """yolo11's C2PSA attention in small: qkv viewed as heads, split, two matmuls, a depthwise positional encoding
    and a residual around it all. Without the cut, torch-pruning's grouping of it does not end."""

    def __init__(self, c: int = 32, heads: int = 2) -> None:
        super().__init__()
        self.heads, self.d = heads, c // heads
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.qkv = nn.Conv2d(c, 3 * c, 1)
        self.pe = nn.Conv2d(c, c, 3, padding=1, groups=c)
        self.proj = nn.Conv2d(c, c, 1)
        self.out = nn.Conv2d(c, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        b, c, h, w = x.shape
        q, k, v = self.qkv(x).view(b, self.heads, 3 * self.d, h * w).split([self.d] * 3, dim=2)
        attn = (q.transpose(-2, -1) @ k).softmax(-1)
        y = (v @ attn.transpose(-2, -1)).view(b, c, h, w) + self.pe(v.reshape(b, c, h, w))
        return self.out(self.proj(y) + x)


def test_trace_excludes_the_groups_through_attention_heads_when_torch_pruning_cannot_map_them(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGEPRUNE_TRACE_SECONDS", "30")  # uncut, the grouping runs past any limit
    graph = trace(HeadAttention().eval(), torch.randn(1, 3, 8, 8))
    assert set(graph.excluded) == {"qkv", "pe"}
    for why in graph.excluded.values():
        assert "reshape of a" in why and "torch-pruning cannot map" in why, why
    (stream,) = graph.groups  # the residual stream around the attention stays prunable
    assert set(stream.producers) == {"stem", "proj"} and {c.module for c in stream.consumers} == {"qkv", "out"}


@pytest.mark.parametrize(("sizes", "strides", "mapped"), [
    ((1, 8, 4, 4), set(), True),  # no mapping: channels stay where they are
    ((1, 8, 4, 4), {16}, True),  # N x C x H x W flattened into C*H*W features
    ((1, 256, 5, 5), {2}, False),  # qkv viewed as two heads
    ((1, 2, 64, 25), {2}, False),  # a head's values viewed back
    ((2, 64, 25), {4}, False),  # a 3-d view: not a flatten
    ((1, 128), {16}, True),  # a Linear's features unflattened into 8 channels of 4 x 4
    ((1, 8, 4, 4), {4, 16}, False),  # two strides: no one mapping
])
def test_is_mapped_accepts_only_a_real_flatten(sizes: tuple[int, ...], strides: set[int], mapped: bool) -> None:
    assert is_mapped(sizes, strides) is mapped
