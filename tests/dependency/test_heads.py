"""Attention heads pruned whole (dependency/heads.py, issue 31 item 3): the head groups of timm's ViT and Swin, their
layout checked numerically against masking, the MLP widths beside them, and the attentions left whole with a reason."""

from __future__ import annotations

import copy
import itertools

import numpy as np
import pytest
import torch
from torch import nn

from edgeprune.compensation.statistics import collect_statistics
from edgeprune.dependency.graph import trace
from edgeprune.dependency.heads import prune_heads
from edgeprune.plan import width_step
from edgeprune.scoring.base import consumer_weight
from edgeprune.scoring.registry import rank
from tests.vits import images, timm_mobilevit, timm_swin, timm_vit, tv_swin, tv_vit

X = torch.zeros(1, 3, 32, 32)
MOBILEVIT = [f"stages.{s}.1.transformer.{b}.attn" for s, n in ((2, 2), (3, 4), (4, 3)) for b in range(n)]
TIMM = {"vit": (timm_vit, ["blocks.0.attn", "blocks.1.attn"], {"blocks.0.attn": 4, "blocks.1.attn": 4}),
        "vit_qk_norm": (lambda: timm_vit(qk_norm=True), ["blocks.0.attn", "blocks.1.attn"],  # LayerNorms of head_dim
                        {"blocks.0.attn": 4, "blocks.1.attn": 4}),
        "mobilevit": (timm_mobilevit, MOBILEVIT, dict.fromkeys(MOBILEVIT, 4)),  # a hybrid: convs, then transformers
        "swin": (timm_swin, [f"layers.{s}.blocks.{b}.attn" for s in (0, 1) for b in (0, 1)],
                 {"layers.0.blocks.0.attn": 2, "layers.0.blocks.1.attn": 2, "layers.1.blocks.0.attn": 4,
                  "layers.1.blocks.1.attn": 4})}


@pytest.mark.parametrize("name", list(TIMM))
def test_timm_attention_gives_a_head_group_beside_the_mlp_width_and_the_stream_stays_whole(name: str) -> None:
    build, attns, heads = TIMM[name]
    model = build()
    graph = trace(model, X)
    groups = {g.name: g for g in graph.groups}
    for attn in attns:
        g = groups[f"{attn}.qkv"]
        h = heads[attn]
        d = g.channels // h
        assert g.heads == attn and g.producers == (f"{attn}.qkv",) and g.unit == d
        assert g.units == tuple(tuple(range(i * d, (i + 1) * d)) for i in range(h))
        (proj,) = g.consumers
        assert proj.module == f"{attn}.proj" and proj.compensable and proj.coords == tuple((j,) for j in range(g.channels))
        mlp = groups[attn.replace("attn", "mlp.fc1")]  # the MLP's hidden width: an ordinary group, fc2 its consumer
        assert [c.module for c in mlp.consumers] == [attn.replace("attn", "mlp.fc2")] and not mlp.heads
        assert width_step(g, 8) == np.lcm(8, d)  # whole heads, at the target's alignment
    assert not any("attn" in k or "fc1" in k for k in graph.excluded)
    assert any("residual stream" in why for why in graph.excluded.values())  # the embedding width, LayerNorm'd


@pytest.mark.parametrize("name", list(TIMM))
def test_prune_heads_computes_what_the_model_computes_with_those_heads_masked(name: str) -> None:
    """Slicing q, k, v, proj and Swin's relative position table of the dropped heads, with num_heads rewritten,
    gives the unpruned model's outputs with the dropped heads' proj columns zeroed (nothing else reads them)."""
    build, _, _ = TIMM[name]
    model = build()
    graph = trace(model, X)
    x = images(4, seed=3)
    masked, pruned = copy.deepcopy(model), copy.deepcopy(model)
    for g in (g for g in graph.groups if g.heads):
        keep = tuple(ch for u in g.units[1:] for ch in u)  # every head but the first
        with torch.no_grad():
            masked.get_submodule(g.heads).proj.weight[:, : g.unit] = 0
        prune_heads(pruned, g, keep)
        assert pruned.get_submodule(g.heads).num_heads == len(g.units) - 1
    with torch.no_grad():
        want, got = masked(x), pruned(x)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(want, model(x), atol=1e-3)  # the heads mattered: the check has teeth


def test_cap_ranks_heads_by_the_compensated_loss_of_their_whole_block() -> None:
    """A head group is ranked in heads: its order is whole heads one after the other, and the first head CaP keeps
    leaves the least compensated residual of proj's output of any single head kept (ℒ of CAP.md §3 from the
    statistics, brute force over the heads): a head's score is its D columns' joint gain."""
    model = timm_vit()
    graph = trace(model, X)
    g = graph.group("blocks.1.attn.qkv")
    stats = collect_statistics(model, graph.consumer_modules(), [images(64, seed=1)])
    r = rank("cap", model, g, stats)
    s = stats["blocks.1.attn.proj"]
    w = consumer_weight(model.blocks[1].attn.proj)

    def loss(kept: tuple[int, ...]) -> float:
        k = np.asarray(kept)
        explained = w @ s.cov[:, k] @ np.linalg.solve(s.cov[np.ix_(k, k)], s.cov[k, :]) @ w.T
        return float(np.trace(w @ s.cov @ w.T) - np.trace(explained))

    heads = [tuple(sorted(r.order[i: i + g.unit])) for i in range(0, g.channels, g.unit)]
    assert sorted(heads) == sorted(g.units)  # whole heads, one after the other
    per_head = [loss(u) for u in g.units]
    assert loss(heads[0]) == pytest.approx(min(per_head), rel=1e-9)
    assert min(per_head) < 0.9 * max(per_head)  # the heads differ (random weights: by about 20%)
    at_heads = [r.loss[k * g.unit] for k in range(len(g.units) + 1)]
    assert all(a > b for a, b in itertools.pairwise(at_heads))


@pytest.mark.parametrize("build,where", [(tv_vit, "encoder.layers.encoder_layer_0.self_attention"),
                                         (tv_swin, "features.1.0.attn.qkv")])
def test_torchvision_attention_stays_whole_with_its_reason_and_its_mlp_width_is_pruned(build: object,
                                                                                      where: str) -> None:
    model = build()
    graph = trace(model, X)
    assert "attention heads of" in graph.excluded[where] and "head_dim" in graph.excluded[where]
    mlps = [g for g in graph.groups if ".mlp." in g.name]
    assert len(mlps) == 2 and all(len(g.consumers) == 1 for g in mlps) and not any(g.heads for g in graph.groups)


class Tokens(nn.Module):
    """Patches embedded by a conv, one timm `Attention` with a residual around it, mean-pooled to 10 logits."""

    def __init__(self, **kw: object) -> None:
        from timm.layers import Attention

        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Conv2d(3, 32, 8, stride=8)
        self.attn = Attention(32, num_heads=4, **kw)
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.embed(x).flatten(2).transpose(1, 2)
        return self.head((t + self.attn(t)).mean(1))


@pytest.mark.parametrize("kw,why", [({}, None),
                                    ({"scale_norm": True, "norm_layer": nn.LayerNorm}, "norm (LayerNorm) reads every"),
                                    ({"gated": True}, "gate (Linear) reads every")])
def test_an_attention_that_reads_its_heads_together_stays_whole(kw: dict, why: str | None) -> None:
    """timm's scale_norm (a LayerNorm over every head's output before proj) and gate: removing a head would change
    what the kept ones are normalised or gated with."""
    graph = trace(Tokens(**kw).eval(), X)
    if why is None:
        assert graph.group("attn.qkv").heads == "attn" and "attn.qkv" not in graph.excluded
    else:
        assert why in graph.excluded["attn.qkv"] and not any(g.heads for g in graph.groups)
