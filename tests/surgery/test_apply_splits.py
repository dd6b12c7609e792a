"""Groups through splits along channels pruned piece by piece (issue 31): MixNet's and C2f's equal pieces, a group
owning one piece of a split (`owners`), a group two splits cut differently (`twice`): the pruned model runs, is
exactly the slicing the plan says, exports to ONNX matching torch, and its repair beats plain slicing."""

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
from edgeprune.plan import (
    Plan,
    plan_from_rankings,
    round_width,
    uniform_widths,
    width_step,
)
from edgeprune.scoring.registry import rank
from edgeprune.surgery.apply import prune
from tests.splitnets import (
    C2fNet,
    MixNet,
    PieceOwners,
    SplitTwice,
    build,
    split_readers,
)

NETS = {"mixnet": MixNet, "c2f": C2fNet, "owners": PieceOwners, "twice": SplitTwice}


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


def test_each_piece_keeps_half_and_every_split_reads_its_pruned_pieces(case: dict) -> None:
    split = [g for g in case["graph"].groups if g.pieces]
    assert split and not case["graph"].excluded
    for g in split:
        kept = set(case["plan"].kept[g.name])
        assert [2 * len(kept & set(p)) for p in g.pieces] == [len(p) for p in g.pieces], g.name
    before, after = split_readers(case["model"]), split_readers(case["pruned"])
    assert [n for n, _, _ in after] == [n for n, _, _ in before]
    for (name, old, _), (_, sizes, reads) in zip(before, after):
        assert sizes == reads == [n // 2 for n in old], name  # each conv reads as many channels as its piece has


def all_splits_pruned(case: dict) -> bool:
    """Whether no group is excluded and every module's list of split sizes shrank: the test is about the split
    groups pruned, not a model whose split groups were left whole."""
    after = split_readers(case["pruned"])
    return not case["graph"].excluded and all(sum(new) < sum(old) for (_, old, _), (_, new, _)
                                              in zip(split_readers(case["model"]), after))


def test_pruning_without_repair_is_exactly_removing_the_planned_channels(case: dict) -> None:
    assert all_splits_pruned(case)
    h = data(16, 2)
    with torch.no_grad():
        want = silenced(case["model"], case["graph"], case["plan"])(h)
        got = case["plain"](h)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_the_pruned_model_exports_to_onnx_matching_torch(case: dict, tmp_path: Path) -> None:
    import onnxruntime as ort

    from edgeprune.export.onnx import export_onnx

    assert all_splits_pruned(case)
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
    assert not graph.excluded
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


def test_a_plan_keeping_no_channel_of_a_piece_is_refused(case: dict) -> None:
    g = next(g for g in case["graph"].groups if g.pieces and len(g.pieces) > 1)
    kept = dict(case["plan"].kept)
    kept[g.name] = tuple(sorted(ch for p in g.pieces[1:] for ch in p))
    plan = dataclasses.replace(case["plan"], kept=kept, compensation=False)
    with pytest.raises(EdgePruneError, match="keeps no channel of piece 0 .* every piece must keep one at least"):
        prune(case["model"], case["x"], plan)


def test_a_plan_with_unequal_shares_of_a_chunk_is_refused() -> None:
    model, x = build(C2fNet), data(1, 0)
    graph = trace(model, x)
    g = graph.group("c2f.cv1.0")
    kept = {g.name: tuple(sorted(set(g.pieces[0]) | set(g.pieces[1][:1])))}
    plan = Plan(kept=kept, channels={g.name: g.channels for g in graph.groups}, compensation=False)
    with pytest.raises(EdgePruneError, match="chunk along channels: every piece must keep as many as the others"):
        prune(model, x, plan)


def test_unequal_shares_of_pieces_whose_sizes_a_module_keeps_prune_as_planned() -> None:
    """Any share the plan gives the pieces of `twice`'s expansion ([8, 4, 4, 8] cut by splits [8, 8, 8] and
    [12, 12]) is followed: each split's sizes become the sums of its pieces' kept channels, and the pruned model
    computes what the unpruned one computes with the removed channels silenced."""
    model, x = build(SplitTwice), data(1, 0)
    graph = trace(model, x)
    g = graph.group("expand")
    kept = {g.name: g.pieces[0][:1] + g.pieces[1] + g.pieces[2][:2] + g.pieces[3]}  # shares (1, 4, 2, 8)
    plan = Plan(kept={k: tuple(sorted(v)) for k, v in kept.items()},
                channels={g.name: g.channels for g in graph.groups}, compensation=False)
    pruned = prune(model, x, plan)
    assert pruned.dw.splits == [1, 6, 8] and pruned.pwl.splits == [5, 10]
    assert [c.in_channels for c in pruned.dw.convs] == [1, 6, 8] and [c.in_channels for c in pruned.pwl.convs] == [5, 10]
    h = data(8, 7)
    with torch.no_grad():
        torch.testing.assert_close(pruned(h), silenced(model, graph, plan)(h), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", list(NETS))
def test_prune_pipeline_prunes_the_split_blocks(name: str, tmp_path: Path) -> None:
    """`edgeprune.prune` at half: nothing excluded, each split group at half its width, rounded to its step (the
    pieces times the channel multiple)."""
    import edgeprune

    model = build(NETS[name])
    result = edgeprune.prune(model, ratio=0.5, calibration=data(128, 5), out=tmp_path / "p", channel_multiple=4)
    assert result.exit_code == 0, result.message
    assert result.report["excluded_groups"] == {}
    widths = result.report["widths"]
    for g in trace(model, data(1, 0)).groups:
        if g.pieces:
            want = round_width(g.channels / 2, g.channels, width_step(g, 4))
            assert widths[g.name]["after"] == want, (g.name, widths[g.name])
            assert name not in ("mixnet", "c2f") or want == g.channels // 2
    assert result.module(data(2, 6)).shape == (2, 10)


def test_timm_mixnet_s_prunes_every_split_group_at_half() -> None:
    """timm's real mixnet_s (random weights, 224x224): no group stays excluded for a split (12 did: the convs of a
    concatenated projection, each owning a piece of the next block's split, and the expansions split in three for
    the depthwise convs and in two for the projection). At half width its forward runs, every MixedConv2d reads
    the pieces its `splits` says, and it computes the unpruned model with the removed channels silenced."""
    timm = pytest.importorskip("timm")
    from edgeprune.plan import keep_first

    torch.manual_seed(0)
    model = timm.create_model("mixnet_s").eval()
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    graph = trace(model, x[:1])
    assert not [why for why in graph.excluded.values() if "split" in why], graph.excluded
    assert sum(len(g.pieces) == 1 and bool(g.resizes) for g in graph.groups) == 6  # the conv_pwl.0/.1 of 1.0, 3.0, 4.0
    assert [len(p) for p in graph.group("blocks.3.0.se.conv_expand").pieces] == [80, 40, 40, 80]
    widths = uniform_widths(graph, 0.5, 16)
    plan = Plan(kept={g.name: keep_first(g, range(g.channels), widths[g.name], 16) for g in graph.groups},
                channels={g.name: g.channels for g in graph.groups}, compensation=False, channel_multiple=16)
    kept = sum(len(k) for k in plan.kept.values()) / sum(plan.channels.values())
    assert 0.4 < kept < 0.6
    pruned = prune(model, x[:1], plan)
    mixed = [(n, m) for n, m in pruned.named_modules() if type(m).__name__ == "MixedConv2d"]
    assert len(mixed) > 20 and all(m.splits == [c.in_channels for c in m.values()] for _, m in mixed)
    assert dict(mixed)["blocks.3.0.conv_dw"].splits == [48, 32, 48]  # pieces [80 | 40, 40 | 80] keep (48, 16, 16, 48)
    with torch.no_grad():
        got, want = pruned(x), silenced(model, graph, plan)(x)
    assert got.shape == (2, 1000)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
