from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torch import nn

from edgeprune.compensation.statistics import LayerStats, collect_statistics, layer_rng, unfold_input
from edgeprune.dependency.graph import Graph, Group, trace
from edgeprune.errors import EdgePruneError
from edgeprune.scoring.base import Ranking, consumer_weight
from edgeprune.scoring.cap import rank_cap
from edgeprune.scoring.registry import rank
from tests.models import ZOO, ZooEntry


@dataclass
class Calibrated:
    model: nn.Module
    graph: Graph
    stats: dict[str, LayerStats]
    calib: torch.Tensor


def calibrate(model: nn.Module, entry: ZooEntry) -> Calibrated:
    graph = trace(model, entry.example_input())
    calib = entry.example_input(64, seed=1)
    return Calibrated(model, graph, collect_statistics(model, graph.consumer_modules(), [calib], shrink=False), calib)


@pytest.fixture(scope="module")
def zoo_stats() -> dict[str, Calibrated]:
    return {n: calibrate(e.build(), e) for n, e in ZOO.items()}


def zoo_groups() -> list:
    """(model, group) pairs of the whole zoo, for parametrization."""
    out = []
    for n, e in ZOO.items():
        for g in trace(e.build(), e.example_input()).groups:
            out.append(pytest.param(n, g.name, id=f"{n}:{g.name}"))
    return out


ZOO_GROUPS = zoo_groups()
BASELINES = ("cap", "l1", "l2", "fpgm", "random")  # the papers' criteria: tests/scoring/test_papers.py


# ---------------------------------------------------------------- every criterion, every group


@pytest.mark.parametrize("criterion", BASELINES)
@pytest.mark.parametrize("model_name, group_name", ZOO_GROUPS)
def test_rank_order_is_a_deterministic_permutation(zoo_stats: dict, criterion: str, model_name: str,
                                                   group_name: str) -> None:
    c = zoo_stats[model_name]
    group = c.graph.group(group_name)
    first = rank(criterion, c.model, group, c.stats, seed=7)
    again = rank(criterion, c.model, group, c.stats, seed=7)
    assert sorted(first.order) == list(range(group.channels))
    assert first == again
    if criterion == "cap":
        assert first.loss is not None and len(first.loss) == group.channels + 1


@pytest.mark.parametrize("model_name, group_name", ZOO_GROUPS)
def test_rank_cap_loss_curve_falls_from_largest_to_near_zero(zoo_stats: dict, model_name: str,
                                                             group_name: str) -> None:
    c = zoo_stats[model_name]
    loss = np.asarray(rank("cap", c.model, c.graph.group(group_name), c.stats).loss)
    assert loss[0] > 0 and loss[0] == loss.max()
    assert (np.diff(loss) <= 1e-12).all(), loss
    assert loss[-1] <= 1e-3 * loss[0], loss


def test_rank_unknown_criterion_lists_choices(zoo_stats: dict) -> None:
    c = zoo_stats["chain"]
    with pytest.raises(EdgePruneError, match="unknown criterion 'taylor'; available: cap, l1, l2, fpgm, random"):
        rank("taylor", c.model, c.graph.groups[0], c.stats)


def test_rank_random_differs_across_seeds_and_groups(zoo_stats: dict) -> None:
    c = zoo_stats["residual"]
    stream = c.graph.group("stem.0")
    orders = {rank("random", c.model, stream, c.stats, seed=s).order for s in range(4)}
    assert len(orders) == 4
    # two groups of the same width get different permutations from the same seed
    chain = zoo_stats["chain"]
    a, b = chain.graph.group("conv2.0"), chain.graph.group("conv3.0")
    assert a.channels == b.channels == 16
    assert rank("random", chain.model, a, chain.stats).order != rank("random", chain.model, b, chain.stats).order


def test_rank_cap_without_statistics_falls_back_to_l2(zoo_stats: dict) -> None:
    c = zoo_stats["residual"]
    g = c.graph.group("stem.0")
    assert rank("cap", c.model, g, {}) == rank("l2", c.model, g, {})


# ---------------------------------------------------------------- baselines against a direct computation


def producer_filters(model: nn.Module, group: Group) -> list[np.ndarray]:
    mods = dict(model.named_modules())
    return [mods[p].weight.detach().double().numpy().reshape(group.channels, -1) for p in group.producers]


def order_desc(score: np.ndarray) -> tuple[int, ...]:
    return tuple(int(i) for i in sorted(range(len(score)), key=lambda i: (-score[i], i)))


@pytest.mark.parametrize("model_name, group_name", [("residual", "stem.0"), ("se", "se.fc2"), ("chain", "conv2.0")])
def test_rank_baselines_equal_direct_scores_summed_over_producers(zoo_stats: dict, model_name: str,
                                                                  group_name: str) -> None:
    c = zoo_stats[model_name]
    g = c.graph.group(group_name)
    filters = producer_filters(c.model, g)
    l1 = sum(np.abs(f).sum(1) for f in filters)
    l2 = sum(np.linalg.norm(f, axis=1) for f in filters)
    fpgm = np.zeros(g.channels)
    for f in filters:
        d = np.array([sum(np.linalg.norm(f[i] - f[j]) for j in range(len(f))) for i in range(len(f))])
        fpgm += d / d.max()
    assert rank("l1", c.model, g, c.stats).order == order_desc(l1)
    assert rank("l2", c.model, g, c.stats).order == order_desc(l2)
    assert rank("fpgm", c.model, g, c.stats).order == order_desc(fpgm)


# ---------------------------------------------------------------- CaP against least squares on the patches


def consumer_patches(c: Calibrated, names: list[str]) -> dict[str, np.ndarray]:
    """The very patches the statistics were built from (same unfold, same subsampling)."""
    mods = dict(c.model.named_modules())
    seen: dict[str, np.ndarray] = {}
    handles = [mods[n].register_forward_pre_hook(
        lambda m, a, n=n: seen.__setitem__(n, unfold_input(m, a[0], rng=layer_rng(0, n)).double().numpy()))
               for n in names]
    with torch.no_grad():
        c.model(c.calib)
    for h in handles:
        h.remove()
    return seen


def exact_loss(c: Calibrated, group: Group, kept: list[int]) -> float:
    """CaP's normalised residual by ordinary least squares: outputs W x (each divided by its standard deviation)
    regressed on the kept input coordinates plus an intercept, residual variance summed, per output row."""
    mods = dict(c.model.named_modules())
    patches = consumer_patches(c, [x.module for x in group.consumers])
    total, rows = 0.0, 0
    for cons in group.consumers:
        x = patches[cons.module]
        w = consumer_weight(mods[cons.module])
        y = x @ w.T
        var = y.var(0)
        y = y / np.sqrt(np.maximum(var, 1e-3 * var.mean()))
        removed = {i for j in range(group.channels) if j not in kept for i in cons.coords[j]}
        keep = [i for i in range(x.shape[1]) if i not in removed]
        design = np.hstack([x[:, keep], np.ones((len(x), 1))])
        resid = y - design @ np.linalg.lstsq(design, y, rcond=None)[0]
        total += float((resid ** 2).mean(0).sum())
        rows += w.shape[0]
    return total / rows


@pytest.mark.parametrize("model_name, group_name", [("chain", "conv1.0"), ("residual", "stem.0"),
                                                    ("concat", "branch_b.0"), ("se", "se.fc2")])
def test_rank_cap_first_pick_drop_equals_least_squares_gain(zoo_stats: dict, model_name: str,
                                                            group_name: str) -> None:
    c = zoo_stats[model_name]
    g = c.graph.group(group_name)
    r = rank("cap", c.model, g, c.stats, block=1)
    none_kept = exact_loss(c, g, [])
    drops = np.array([none_kept - exact_loss(c, g, [t]) for t in range(g.channels)])
    assert r.loss[0] == pytest.approx(none_kept, rel=1e-4)
    assert r.order[0] == int(np.argmax(drops)), (r.order[0], drops)
    assert r.loss[0] - r.loss[1] == pytest.approx(drops.max(), rel=1e-3)


@pytest.mark.parametrize("block", [1, None])
@pytest.mark.parametrize("model_name, group_name", [("chain", "conv2.0"), ("residual", "stem.0"),
                                                    ("flatten_head", "conv2.0")])
def test_rank_cap_loss_curve_equals_least_squares_residual(zoo_stats: dict, model_name: str, group_name: str,
                                                           block: int | None) -> None:
    c = zoo_stats[model_name]
    g = c.graph.group(group_name)
    r = rank("cap", c.model, g, c.stats, block=block)
    for k in (1, g.channels // 2, g.channels - 1):
        # the greedy runs in float32 with a 1e-4 relative ridge: its curve is exact to ~0.1% of the starting loss
        assert r.loss[k] == pytest.approx(exact_loss(c, g, list(r.order[:k])), rel=2e-3, abs=1e-3 * r.loss[0]), k


def test_rank_cap_single_consumer_starts_at_one() -> None:
    """Each output row is normalised by its variance: with nothing kept, a consumer reading only this group has lost
    all of it, a relative residual of exactly 1."""
    entry = ZOO["chain"]
    c = calibrate(entry.build(), entry)
    for name in ("conv1.0", "conv2.0", "conv3.0"):
        assert rank("cap", c.model, c.graph.group(name), c.stats).loss[0] == pytest.approx(1.0, rel=1e-5)


# ---------------------------------------------------------------- CaP on redundant channels


def with_duplicate_and_dead_channel(entry: ZooEntry, conv: str, bn: str, copy: tuple[int, int],
                                    dead: int) -> nn.Module:
    model = entry.build()
    mods = dict(model.named_modules())
    c, b = mods[conv], mods[bn]
    src, dst = copy
    with torch.no_grad():
        c.weight[dst] = c.weight[src]
        for t in (b.weight, b.bias, b.running_mean, b.running_var):
            t[dst] = t[src]
        # A dead channel: all-zero filter, and a BN shift that ReLU cuts, so the activations are exactly zero. (A
        # constant non-zero channel is not redundant for a padded 3x3 consumer: its patches see the zero padding.)
        c.weight[dead] = 0.0
        b.bias[dead], b.running_mean[dead] = -1.0, 0.0
    return model


@pytest.mark.parametrize("model_name, conv, bn", [("chain", "conv1.0", "conv1.1"), ("chain", "conv2.0", "conv2.1"),
                                                  ("concat", "branch_b.0", "branch_b.1")])
def test_rank_cap_ranks_duplicate_and_dead_channels_last(model_name: str, conv: str, bn: str) -> None:
    entry = ZOO[model_name]
    model = with_duplicate_and_dead_channel(entry, conv, bn, copy=(2, 5), dead=1)
    c = calibrate(model, entry)
    g = c.graph.group(conv)
    r = rank("cap", model, g, c.stats, block=1)
    later_copy = 5 if r.order.index(5) > r.order.index(2) else 2
    assert set(r.order[-2:]) == {1, later_copy}, r.order
    # neither adds anything once the rest is kept
    assert r.loss[-3] == pytest.approx(0.0, abs=1e-3 * r.loss[0])
    assert r.loss[-3] - r.loss[-1] == pytest.approx(0.0, abs=1e-4 * r.loss[0])


def test_rank_magnitude_criteria_rank_dead_channel_last() -> None:
    entry = ZOO["chain"]
    model = with_duplicate_and_dead_channel(entry, "conv1.0", "conv1.1", copy=(2, 5), dead=1)
    c = calibrate(model, entry)
    for criterion in ("l1", "l2"):
        assert rank(criterion, model, c.graph.group("conv1.0"), c.stats).order[-1] == 1


def test_ranking_is_frozen_value_type() -> None:
    r = Ranking(order=(1, 0), loss=(1.0, 0.5, 0.0))
    with pytest.raises(AttributeError):
        r.order = (0, 1)  # type: ignore[misc]
    assert r == Ranking(order=(1, 0), loss=(1.0, 0.5, 0.0))


# ---------------------------------------------------------------- rank-deficient statistics of a concat consumer


class DenseHead(nn.Module):
    """DenseNet-like head: two branches concatenated, global pool, a Linear reading both (one patch per image)."""

    def __init__(self, wa: int, wb: int) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a = nn.Conv2d(8, wa, 3, padding=1)
        self.b = nn.Conv2d(8, wb, 3, padding=1)
        self.fc = nn.Linear(wa + wb, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        y = torch.cat([torch.relu(self.a(x)), torch.relu(self.b(x))], 1)
        return self.fc(y.mean((2, 3)))


@pytest.mark.parametrize("wa, wb, samples", [(64, 8, 20), (128, 16, 20)])
def test_rank_cap_handles_rank_deficient_concat_consumer(wa: int, wb: int, samples: int) -> None:
    torch.manual_seed(0)
    model = DenseHead(wa, wb).eval()
    graph = trace(model, torch.randn(1, 3, 8, 8))
    stats = collect_statistics(model, graph.consumer_modules(), [torch.randn(samples, 3, 8, 8)])
    assert stats["fc"].count == samples < stats["fc"].dim  # accepted, with a warning: rank-deficient
    for g in graph.groups:
        r = rank("cap", model, g, stats)
        assert sorted(r.order) == list(range(g.channels))
        assert np.isfinite(r.loss).all()


# ---------------------------------------------------------------- pooled exact greedy inside blocks


def test_block_selection_matches_the_exact_greedy_with_redundant_channels() -> None:
    """32 channels made of 16 duplicated pairs, selected 4 per step: a block chosen by stale individual gains takes
    both copies of a pair (they have equal gains), the exact greedy never does. The pooled greedy inside each block
    gives the exact greedy's residual at every width (brute force: least squares on the patches for every
    candidate at every step)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 10)).eval()
    with torch.no_grad():
        model[0].weight[16:] = model[0].weight[:16]
        model[0].bias[16:] = model[0].bias[:16]
    x = torch.randn(2000, 12)
    graph = trace(model, x[:1])
    group = graph.groups[0]
    stats = collect_statistics(model, graph.consumer_modules(), [x], shrink=False)
    with torch.no_grad():
        feats = torch.relu(model[0](x)).double().numpy()
    w = model[2].weight.detach().double().numpy()
    y = feats @ w.T
    y = y / y.std(0)

    def residual(kept: list[int]) -> float:
        design = np.hstack([feats[:, kept], np.ones((len(feats), 1))])
        r = y - design @ np.linalg.lstsq(design, y, rcond=None)[0]
        return float((r ** 2).mean(0).sum() / w.shape[0])

    exact: list[int] = []
    curve = [residual([])]
    for _ in range(16):
        best = min((c for c in range(32) if c not in exact), key=lambda c: (residual(exact + [c]), c))
        exact.append(best)
        curve.append(residual(exact))
    pooled = rank_cap(dict(model.named_modules()), group, stats, block=4)
    for width in (4, 8, 12, 16):
        assert residual(list(pooled.order[:width])) == pytest.approx(curve[width], rel=1e-6, abs=1e-9), width
    assert len({c % 16 for c in pooled.order[:16]}) == 16  # no pair kept twice in the first half
    stale = np.argsort(-np.asarray([residual([]) - residual([c]) for c in range(32)]), kind="stable")[:4]
    assert len({int(c) % 16 for c in stale}) < 4  # what ranking by stale gains would have taken: a pair twice
