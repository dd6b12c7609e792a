"""Groups through splits along channels pruned in equal shares (issue 31): the pruned model runs, is exactly the
slicing the plan says, exports to ONNX, and its repair beats plain slicing."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from edgeprune.compensation.statistics import collect_statistics
from edgeprune.dependency.graph import Graph, trace
from edgeprune.errors import EdgePruneError
from edgeprune.plan import Plan, plan_from_rankings, uniform_widths
from edgeprune.scoring.registry import rank
from edgeprune.surgery.apply import prune
from tests.splitnets import C2fNet, MixNet, build

NETS = {"mixnet": MixNet, "c2f": C2fNet}


def data(batch: int, seed: int) -> torch.Tensor:
    return torch.randn(batch, 3, 16, 16, generator=torch.Generator().manual_seed(seed)) + 0.3


@pytest.fixture(scope="module", params=list(NETS))
def case(request: pytest.FixtureRequest) -> dict:
    model = build(NETS[request.param])
    x = data(1, 0)
    graph = trace(model, x)
    stats = collect_statistics(model, graph.consumer_modules(), [data(256, 1)])
    rankings = {g.name: rank("cap", model, g, stats) for g in graph.groups}
    plan = plan_from_rankings(graph, rankings, uniform_widths(graph, 0.5, 1), criterion="cap")
    return {"name": request.param, "model": model, "x": x, "graph": graph, "stats": stats, "plan": plan,
            "pruned": prune(model, x, plan, stats), "plain": prune(model, x, dataclasses.replace(plan, compensation=False))}


def silenced(model: nn.Module, graph: Graph, plan: Plan) -> nn.Module:
    """The unpruned model whose consumers ignore the removed channels (their input columns zeroed): what removing
    them computes, whatever piece of a split they were in."""
    out = copy.deepcopy(model)
    modules = dict(out.named_modules())
    with torch.no_grad():
        for g in graph.groups:
            for c in g.consumers:
                w = modules[c.module].weight.view(modules[c.module].weight.shape[0], -1)
                for j in plan.pruned(g.name):
                    w[:, list(c.coords[j])] = 0.0
    return out


def test_each_piece_keeps_as_many_channels_and_the_split_sizes_follow(case: dict) -> None:
    split = [g for g in case["graph"].groups if g.pieces]
    assert split and not case["graph"].excluded
    for g in split:
        kept = set(case["plan"].kept[g.name])
        assert [len(kept & set(p)) for p in g.pieces] == [len(g.pieces[0]) // 2] * len(g.pieces)
    for owner in ("b1", "b2") if case["name"] == "mixnet" else ():
        before, after = getattr(case["model"], owner), getattr(case["pruned"], owner)
        assert after.splits == [n // 2 for n in before.splits]
        assert [c.out_channels for c in after.dw] == after.splits


def test_pruning_without_repair_is_exactly_removing_the_planned_channels(case: dict) -> None:
    h = data(16, 2)
    with torch.no_grad():
        want = silenced(case["model"], case["graph"], case["plan"])(h)
        got = case["plain"](h)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_the_pruned_model_exports_to_onnx_matching_torch(case: dict, tmp_path: Path) -> None:
    import onnxruntime as ort

    from edgeprune.export.onnx import export_onnx

    path = tmp_path / "pruned.onnx"
    export_onnx(case["pruned"], case["x"], path, exporter="torchscript")
    h = data(1, 3)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: h.numpy()})[0]
    with torch.no_grad():
        want = case["pruned"](h).numpy()
    assert np.allclose(got, want, atol=1e-4), np.abs(got - want).max()


def test_the_repair_is_closer_to_the_unpruned_model_than_slicing(case: dict) -> None:
    """The split groups alone at half (the other groups whole: pruned too, their errors compound through this small
    random network whatever the split groups do), on held-out inputs the statistics never saw."""
    graph, model = case["graph"], case["model"]
    rankings = {g.name: rank("cap", model, g, case["stats"]) for g in graph.groups}
    widths = {g.name: g.channels // 2 if g.pieces else g.channels for g in graph.groups}
    plan = plan_from_rankings(graph, rankings, widths, criterion="cap")
    repaired, sliced = prune(model, case["x"], plan, case["stats"]), prune(model, case["x"],
                                                                           dataclasses.replace(plan, compensation=False))
    h = data(64, 4)
    with torch.no_grad():
        ref = model(h)
        err, plain = (repaired(h) - ref).norm().item(), (sliced(h) - ref).norm().item()
    assert err < 0.85 * plain, (err, plain)  # C2f: 0.76 (the halves also reach the bottleneck's sum, unrepaired)


def test_a_plan_with_unequal_shares_is_refused(case: dict) -> None:
    g = next(g for g in case["graph"].groups if g.pieces)
    kept = dict(case["plan"].kept)
    kept[g.name] = tuple(sorted(set(g.pieces[0]) | set(g.pieces[1][:1])))
    plan = dataclasses.replace(case["plan"], kept=kept, compensation=False)
    with pytest.raises(EdgePruneError, match="every piece must keep as many as the others"):
        prune(case["model"], case["x"], plan)


@pytest.mark.parametrize("name", list(NETS))
def test_prune_pipeline_prunes_the_split_blocks(name: str, tmp_path: Path) -> None:
    """`edgeprune.prune` at half: nothing excluded, each split group at half its width in equal shares."""
    import edgeprune

    model = build(NETS[name])
    result = edgeprune.prune(model, ratio=0.5, calibration=data(128, 5), out=tmp_path / "p", channel_multiple=4)
    assert result.exit_code == 0, result.message
    assert result.report["excluded_groups"] == {}
    widths = result.report["widths"]
    for g in trace(model, data(1, 0)).groups:
        if g.pieces:
            assert widths[g.name]["after"] == g.channels // 2, (g.name, widths[g.name])
    assert result.module(data(2, 6)).shape == (2, 10)
