"""C-SGD (arXiv:1904.03837) on small zoo models: the centripetal update makes the filters of each cluster converge to
equal weights, and merging each cluster into one filter then reproduces the trained model's output."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from edgeprune.dependency.graph import Graph, trace
from edgeprune.plan import Plan
from edgeprune.recovery.csgd import averaging, centripetal_train, cluster_filters, merge, spread
from edgeprune.recovery.train import FinetuneConfig
from tests.models import INPUT_SHAPE, ZOO


def half_plan(graph: Graph) -> Plan:
    """Half of every group's channels (first ones): C-SGD only takes the widths from it."""
    return Plan(kept={g.name: tuple(range(g.channels // 2)) for g in graph.groups},
                channels={g.name: g.channels for g in graph.groups})


def samples(n: int = 96) -> np.ndarray:
    x = torch.randn((n, *INPUT_SHAPE[1:]), generator=torch.Generator().manual_seed(1)) + 0.3
    return x.numpy()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("name", ["residual", "flatten_head", "depthwise"])
def test_centripetal_training_makes_clusters_equal_and_the_merge_keeps_the_trained_output(name: str) -> None:
    entry = ZOO[name]
    model, teacher = entry.build(), entry.build()
    for m in model.modules():  # the zoo settles its statistics as a cumulative average; trained models use 0.1, under
        if isinstance(m, torch.nn.BatchNorm2d):  # which the members' running statistics converge with their filters
            m.momentum = 0.1
    x = entry.example_input(batch=64, seed=2)
    graph = trace(model, entry.example_input())
    plan = half_plan(graph)
    clusters = cluster_filters(model, graph, plan)
    assert not clusters.sliced
    assert {g: len(c) for g, c in clusters.groups.items()} == plan.widths()
    for g in graph.groups:  # a partition of the group's channels
        assert sorted(i for c in clusters.groups[g.name] for i in c) == list(range(g.channels))
    start = spread(model, graph, clusters)
    config = FinetuneConfig(stage="csgd", steps=40, batch=16)
    centripetal_train(model, graph, clusters, samples(), None, teacher, config)
    middle = spread(model, graph, clusters)
    centripetal_train(model, graph, clusters, samples(), None, teacher, dataclasses.replace(config, steps=110))
    end = spread(model, graph, clusters)
    assert start > 0.3 and middle < 0.5 * start and end < 2e-3 * start, (start, middle, end)

    pruned, merged = merge(model, entry.example_input(), graph, clusters, plan)
    assert merged.widths() == plan.widths() and not merged.compensation
    with torch.no_grad():
        trained, out = model.eval()(x), pruned(x)
        assert rel(out, trained) < 1e-3, rel(out, trained)
        assert rel(trained, teacher(x)) > 10 * rel(out, trained)  # the merge is far closer than training moved it
    for g in graph.groups:  # physically narrower
        assert dict(pruned.named_modules())[g.producers[0]].weight.shape[0] == len(merged.kept[g.name])


def test_exact_duplicate_filters_merge_without_loss_and_without_training() -> None:
    """The merge alone: when the members of each cluster are already equal (duplicated filters, BN parameters and
    statistics), summing the consumers' columns reproduces the output exactly."""
    entry = ZOO["residual"]
    model = entry.build()
    graph = trace(model, entry.example_input())
    modules = dict(model.named_modules())
    with torch.no_grad():
        for g in graph.groups:  # channel 2k+1 becomes a copy of channel 2k
            for name in (*g.producers, *g.members):
                for t in (*modules[name].parameters(recurse=False), *modules[name].buffers(recurse=False)):
                    if t.ndim >= 1 and t.shape[0] == g.channels:
                        t[1::2] = t[0::2]
    plan = half_plan(graph)
    clusters = cluster_filters(model, graph, plan)
    for c in (c for cs in clusters.groups.values() for c in cs):
        assert len(c) == 2 and c[1] == c[0] + 1 and c[0] % 2 == 0  # k-means finds the duplicates
    assert spread(model, graph, clusters) < 1e-6
    pruned, _ = merge(model, entry.example_input(), graph, clusters, plan)
    x = entry.example_input(batch=16, seed=3)
    with torch.no_grad():
        assert rel(pruned(x), model(x)) < 1e-5


def test_averaging_matrix_gives_each_filter_its_cluster_mean() -> None:
    a = averaging(((0, 2), (1,), (3, 4, 5)), 6)
    f = torch.arange(6.0).unsqueeze(1)
    assert torch.allclose(a @ f, torch.tensor([[1.0], [1.0], [1.0], [4.0], [4.0], [4.0]]))
    assert torch.allclose(a @ a, a)  # a projection: averaging twice changes nothing


def test_groups_that_cannot_be_merged_are_sliced_to_the_plan_and_say_why() -> None:
    entry = ZOO["grouped"]
    model = entry.build()
    graph = trace(model, entry.example_input())
    plan = Plan(kept={g.name: tuple(range(g.channels - g.unit * max(1, g.channels // g.unit // 2), g.channels))
                      if g.units else tuple(range(g.channels // 2)) for g in graph.groups},
                channels={g.name: g.channels for g in graph.groups})
    clusters = cluster_filters(model, graph, plan)
    unit_groups = {g.name for g in graph.groups if g.units}
    assert unit_groups and set(clusters.sliced) >= unit_groups
    assert all("units" in clusters.sliced[g] for g in unit_groups)
    pruned, merged = merge(copy.deepcopy(model), entry.example_input(), graph, clusters, plan)
    assert merged.widths() == plan.widths()
    assert all(merged.kept[g] == plan.kept[g] for g in unit_groups)
    with torch.no_grad():
        assert pruned(entry.example_input(batch=4)).shape == (4, 10)


def residual_net() -> torch.nn.Module:
    """The zoo's residual model as a model spec (`tests/recovery/test_csgd.py:residual_net`), BN momentum as trained
    models."""
    model = ZOO["residual"].build()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = 0.1
    return model


def test_finetune_csgd_releases_the_merged_model_at_the_plans_widths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                    capsys: pytest.CaptureFixture) -> None:
    """`edgeprune finetune --stage csgd` end to end on a prune output: trained, merged to the source's widths, its
    clusters converged (report: csgd.spread), released with the budget re-checked."""
    import json

    import edgeprune.runtimes as rt
    from edgeprune.cli.commands import main
    from edgeprune.jobs.prune_job import prune_job
    from tests.test_api import TARGET, fake_latency

    monkeypatch.setattr(rt, "measure", fake_latency)
    (tmp_path / "cpu-test.toml").write_text(TARGET)
    (tmp_path / "random.toml").write_text('kind = "random"\ncount = 160\nheldout = 32\n')
    from edgeprune.config import PruneConfig

    prune_job(PruneConfig(model=f"{__file__}:residual_net", input_shape=INPUT_SHAPE, criterion="l1",
                          calibration=str(tmp_path / "random.toml"), compensation=False, channel_multiple=1,
                          exporter="torchscript"), tmp_path / "p", ratio=0.5)
    code = main(["finetune", str(tmp_path / "p"), "--stage", "csgd", "--steps", "150", "--orthoreg", "0.1",
                 "--calibration", str(tmp_path / "random.toml"),
                 "--device", str(tmp_path / "cpu-test.toml"), "--latency", "0.9x", "--out", str(tmp_path / "c"),
                 "--json"])
    out = capsys.readouterr()
    assert code == 0, out.err
    r = json.loads(out.out)
    source_plan = json.loads((tmp_path / "p" / "plan.json").read_text())
    plan = json.loads((tmp_path / "c" / "plan.json").read_text())
    assert {g: len(k) for g, k in plan["kept"].items()} == {g: len(k) for g, k in source_plan["kept"].items()}
    assert plan["meta"]["recovery"] == "csgd" and r["met"] and r["finetune"]["loss"] == "distillation"
    assert r["finetune"]["csgd"]["spread"] < 2e-3 and not r["finetune"]["csgd"]["sliced"]
    # C-SGD keeps the unpruned model's function through the merge far better than cutting channels did
    assert r["fidelity"]["output_rel_error"] < 0.5 * r["finetune"]["input_fidelity"]["output_rel_error"], r["fidelity"]
