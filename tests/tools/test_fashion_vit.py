"""tools/fashion_vit.py: the small ViT trained on Fashion-MNIST keeps its accuracy when a quarter of its heads and
three quarters of its MLP hidden width go, thanks to the repair (issue 31, item 3); needs the dataset and the weights
(`python -m tools.fashion_vit train`)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from tests.tools import tool_by_path


@pytest.fixture(scope="module")
def vit():
    yield from tool_by_path("fashion_vit")


def test_make_vit_without_weights_says_how_to_train(vit, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(vit, "WEIGHTS", tmp_path / "missing.pt")
    with pytest.raises(FileNotFoundError, match="python -m tools.fashion_vit train"):
        vit.make_vit()


def test_the_repair_keeps_the_accuracy_that_plain_slicing_loses(vit) -> None:
    """CaP with the sequential repair, fitted on 1000 test images, graded on 2000 others: 3 of 4 heads and 64 of
    256 MLP channels in every block keep at least 95% of the unpruned accuracy, and more than slicing alone."""
    from edgeprune.compensation.statistics import collect_statistics
    from edgeprune.dependency.graph import trace
    from edgeprune.plan import plan_from_rankings
    from edgeprune.scoring.registry import rank
    from edgeprune.surgery.apply import prune

    try:
        model = vit.make_vit()
        x, y = vit.unseen_test()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    calib, held, labels = x[:1000], x[1000:3000], y[1000:3000]
    example = x[:1]
    graph = trace(model, example)
    batches = list(calib.split(100))
    stats = collect_statistics(model, graph.consumer_modules(), batches)
    rankings = {g.name: rank("cap", model, g, stats) for g in graph.groups}
    widths = {g.name: 48 if g.heads else 64 for g in graph.groups}
    plan = plan_from_rankings(graph, rankings, widths, criterion="cap", repair="sequential")
    repaired = prune(model, example, plan, stats, batches=batches)
    plain = prune(model, example, dataclasses.replace(plan, compensation=False))
    assert all(repaired.get_submodule(g.heads).num_heads == 3 for g in graph.groups if g.heads)
    base, kept, sliced = (vit.accuracy(m, held, labels) for m in (model, repaired, plain))
    assert base > 0.75
    assert kept >= 0.95 * base and kept > sliced + 0.02, (base, kept, sliced)
