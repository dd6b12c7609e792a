"""Transformer widths pruned (issue 31, item 3): timm's ViT and Swin with half their heads and half their MLP hidden
width removed run, export to ONNX with the same outputs as torch, and their repair (independent and sequential)
beats plain slicing on held-out images."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from edgeprune.compensation.statistics import collect_statistics
from edgeprune.dependency.graph import trace
from edgeprune.export.onnx import export, parity
from edgeprune.plan import plan_from_rankings, uniform_widths
from edgeprune.scoring.registry import rank
from edgeprune.surgery.apply import prune
from tests.vits import images, timm_mobilevit, timm_swin, timm_vit

NETS = {"vit": timm_vit, "swin": timm_swin}


@pytest.fixture(scope="module", params=list(NETS))
def case(request: pytest.FixtureRequest) -> dict:
    model = NETS[request.param]()
    x = images(1, seed=0)
    graph = trace(model, x)
    calib = images(96, seed=1)
    stats = collect_statistics(model, graph.consumer_modules(), [calib])
    rankings = {g.name: rank("cap", model, g, stats) for g in graph.groups}
    plan = plan_from_rankings(graph, rankings, uniform_widths(graph, 0.5, 1), criterion="cap")
    return {"model": model, "x": x, "graph": graph, "plan": plan, "calib": calib,
            "pruned": prune(model, x, plan, stats),
            "plain": prune(model, x, dataclasses.replace(plan, compensation=False))}


def test_half_the_heads_and_half_the_mlp_width_go(case: dict) -> None:
    graph, plan, pruned = case["graph"], case["plan"], case["pruned"]
    heads = [g for g in graph.groups if g.heads]
    assert heads and len(heads) == len([g for g in graph.groups if ".mlp." in g.name])
    for g in heads:
        attn = pruned.get_submodule(g.heads)
        kept = plan.kept[g.name]
        assert attn.num_heads == len(g.units) // 2 and attn.qkv.out_features == 3 * len(kept)
        assert attn.proj.in_features == len(kept) and all(len(set(u) & set(kept)) in (0, g.unit) for u in g.units)
        if hasattr(attn, "relative_position_bias_table"):
            assert attn.relative_position_bias_table.shape[-1] == attn.num_heads
    for g in graph.groups:
        if not g.heads:
            assert pruned.get_submodule(g.name).out_features == g.channels // 2


def _error(model: torch.nn.Module, pruned: torch.nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        y = model(x)
        return float(((pruned(x) - y) ** 2).mean() / (y ** 2).mean())


def test_the_repair_lowers_the_held_out_error_of_plain_slicing(case: dict) -> None:
    held = images(64, seed=2)  # never fed the statistics
    model = case["model"]
    repaired, plain = _error(model, case["pruned"], held), _error(model, case["plain"], held)
    assert repaired < 0.2 * plain, (repaired, plain)
    sequential = prune(model, case["x"], dataclasses.replace(case["plan"], repair="sequential"),
                       batches=[case["calib"]])
    assert _error(model, sequential, held) < 0.2 * plain


def test_the_pruned_transformer_exports_to_onnx_with_torch_s_outputs(case: dict, tmp_path: Path) -> None:
    pruned = case["pruned"]
    result = export(pruned, case["x"], tmp_path / "m.onnx")
    assert result.parity is not None and result.parity.rel_error < 1e-4
    other = parity(pruned, images(1, seed=7), tmp_path / "m.onnx")  # another image than the one exported with
    assert other.rel_error < 1e-4 and np.isfinite(other.max_abs)


def test_a_hybrid_mobilevit_loses_half_its_heads_exports_and_its_repair_does_not_hurt(tmp_path: Path) -> None:
    """timm's MobileViT (convs, then transformers over unfolded patches) comes free: its heads go whole, the ONNX
    model matches torch, and the repair is no worse than slicing (random weights, rank-deficient statistics at
    32x32: the gain is small there)."""
    model = timm_mobilevit()
    x = images(1, seed=0)
    graph = trace(model, x)
    stats = collect_statistics(model, graph.consumer_modules(), [images(96, seed=1)])
    rankings = {g.name: rank("cap", model, g, stats) for g in graph.groups}
    plan = plan_from_rankings(graph, rankings, uniform_widths(graph, 0.5, 1), criterion="cap")
    pruned = prune(model, x, plan, stats)
    heads = [g for g in graph.groups if g.heads]
    assert len(heads) == 9 and all(pruned.get_submodule(g.heads).num_heads == 2 for g in heads)
    held = images(64, seed=2)
    plain = prune(model, x, dataclasses.replace(plan, compensation=False))
    assert _error(model, pruned, held) <= _error(model, plain, held)
    assert export(pruned, x, tmp_path / "m.onnx").parity.rel_error < 1e-4
