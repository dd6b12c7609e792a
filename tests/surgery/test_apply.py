from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from edgeprune.compensation.solve import compensate_layer
from edgeprune.compensation.statistics import LayerStats, collect_statistics
from edgeprune.config import PruneConfig
from edgeprune.dependency.graph import Graph, trace
from edgeprune.errors import EdgePruneError
from edgeprune.export.onnx import export
from edgeprune.jobs.session import prepare
from edgeprune.plan import Plan, plan_from_rankings, uniform_widths
from edgeprune.scoring.base import consumer_weight
from edgeprune.scoring.registry import rank, rank_all
from edgeprune.surgery.apply import prune, removed_coords, structural_copy
from tests.models import ZOO, ZooEntry


@dataclass
class Case:
    """One model pruned by one plan, with and without compensation, and what it was pruned from."""

    name: str
    model: nn.Module
    original_state: dict[str, torch.Tensor]  # a copy taken before pruning
    x: torch.Tensor  # example input (batch 1)
    heldout: torch.Tensor  # never fed the statistics
    graph: Graph
    stats: dict[str, LayerStats]
    plan: Plan
    pruned: nn.Module
    plain: nn.Module  # same plan, compensation=False


def state_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def biased_layers(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None]


def prune_zoo(entry: ZooEntry) -> Case:
    model = entry.build()
    original = state_copy(model)
    x = entry.example_input()
    graph = trace(model, x)
    stats = collect_statistics(model, graph.consumer_modules(), [entry.example_input(64, seed=1)])
    rankings = {g.name: rank("cap", model, g, stats) for g in graph.groups}
    plan = plan_from_rankings(graph, rankings, uniform_widths(graph, 0.5, 2), criterion="cap", channel_multiple=2)
    pruned = prune(model, x, plan, stats)
    plain = prune(model, x, dataclasses.replace(plan, compensation=False))
    return Case(entry.name, model, original, x, entry.example_input(32, seed=2), graph, stats, plan, pruned, plain)


def prune_torchvision(name: str, tmp: Path) -> Case:
    recipe = tmp / f"{name}-random.toml"
    # 88 calibration samples: mobilenet_v2's 1280-wide classifier needs 80, resnet18's layer4 needs 72 (2x2 maps)
    recipe.write_text('kind = "random"\ncount = 96\nheldout = 8\nbatch_size = 88\n')
    prep = prepare(PruneConfig(model=f"torchvision:{name}", input_shape=(1, 3, 64, 64), calibration=str(recipe),
                               criterion="l1", channel_multiple=8, exporter="torchscript"))
    model = prep.loaded.module
    original = state_copy(model)
    plan = prep.plan(uniform_widths(prep.graph, 0.5, 8), ratio=0.5)
    pruned = prep.prune(plan)
    plain = prep.prune(dataclasses.replace(plan, compensation=False))
    heldout = torch.from_numpy(prep.data.heldout_x)
    return Case(name, model, original, prep.loaded.example_input, heldout, prep.graph, prep.stats, plan, pruned,
                plain)


@pytest.fixture(scope="session")
def zoo_cases() -> dict[str, Case]:
    return {n: prune_zoo(e) for n, e in ZOO.items()}


@pytest.fixture(scope="session")
def torchvision_cases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Case]:
    tmp = tmp_path_factory.mktemp("tv")
    return {n: prune_torchvision(n, tmp) for n in ("resnet18", "mobilenet_v2")}


ZOO_IDS = list(ZOO)
TV_IDS = ["resnet18", "mobilenet_v2"]
ALL = [pytest.param("zoo", n, id=n) for n in ZOO_IDS] + [pytest.param("tv", n, id=n) for n in TV_IDS]


@pytest.fixture
def case(request: pytest.FixtureRequest, kind: str, name: str) -> Case:
    cases = request.getfixturevalue("zoo_cases" if kind == "zoo" else "torchvision_cases")
    return cases[name]


def out_width(m: nn.Module) -> int:
    return m.out_channels if isinstance(m, nn.Conv2d) else m.out_features


def in_width(m: nn.Module) -> int:
    return m.weight[0].numel()  # unfolded input dimension: in_channels * kh * kw, or in_features


def run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def masked_copy(model: nn.Module, graph: Graph, plan: Plan) -> nn.Module:
    """The unpruned model with the removed channels silenced at their source: producer filters, BN affine parameters
    and depthwise filters of those channels set to zero, so they are exactly zero everywhere downstream."""
    masked = copy.deepcopy(model)
    mods = dict(masked.named_modules())
    with torch.no_grad():
        for g in graph.groups:
            idx = plan.pruned(g.name)
            if not idx:
                continue
            for name in (*g.producers, *g.members):
                m = mods[name]
                for p in (m.weight, m.bias):
                    if p is not None:
                        p[idx] = 0.0
    return masked


# ---------------------------------------------------------------- structure


@pytest.mark.parametrize("kind, name", ALL)
def test_prune_gives_planned_widths(case: Case) -> None:
    before, after = dict(case.model.named_modules()), dict(case.pruned.named_modules())
    widths = case.plan.widths()
    assert any(w < case.plan.channels[g] for g, w in widths.items())
    for g in case.graph.groups:
        w = widths[g.name]
        for p in g.producers:
            assert out_width(after[p]) == w, (g.name, p)
        for m in g.members:
            mod = after[m]
            if isinstance(mod, nn.BatchNorm2d):
                assert mod.num_features == w and mod.running_mean.shape == (w,), m
            else:  # depthwise conv, or a grouped conv in whole groups of `unit` channels
                assert mod.in_channels == mod.out_channels == mod.groups * g.unit == w, m
    for name, removed in removed_coords(case.graph, case.plan).items():
        assert in_width(after[name]) == in_width(before[name]) - len(removed), name
    for name in case.graph.output_layers:
        assert out_width(after[name]) == out_width(before[name])


@pytest.mark.parametrize("kind, name", ALL)
def test_prune_leaves_original_model_unmodified(case: Case) -> None:
    state = case.model.state_dict()
    assert state.keys() == case.original_state.keys()
    for k, v in case.original_state.items():
        assert torch.equal(state[k], v), k
    assert not case.model.training
    # compensation gives every repaired consumer a bias, in the pruned copy only (the keys above are unchanged)
    repaired = set(removed_coords(case.graph, case.plan))
    assert repaired <= set(biased_layers(case.pruned))
    assert any(case.original_state.get(f"{n}.bias") is None for n in repaired) or case.name in ("grouped", "se")


@pytest.mark.parametrize("kind, name", ALL)
def test_prune_output_runs_finite_with_original_shape(case: Case) -> None:
    y0, y = run(case.model, case.heldout), run(case.pruned, case.heldout)
    assert y.shape == y0.shape and torch.isfinite(y).all()
    rel = float(torch.linalg.norm(y - y0) / torch.linalg.norm(y0))
    assert rel > 0  # pruned, so different
    if case.name in ZOO:  # compensated on meaningful statistics, so not unrelated
        assert rel < 1.0, rel
    # (torchvision's random-weight models on random data: their untrained BatchNorms let activations grow layer by
    # layer, and repairs fitted on rank-deficient statistics (352 patches for 4608 dimensions in layer4 here) amplify
    # the drift: the error is chaotic in the data (0.14 to 14.8 over recipe seeds 0-3 before the 2026-12 numerics
    # changes, 0.14 to 319 after; at 96x96 above 1e4 for every seed in both). Random data is for latency work only.)


@pytest.mark.parametrize("kind, name", ALL)
def test_prune_exports_to_onnx_matching_torch(case: Case, tmp_path: Path) -> None:
    result = export(case.pruned, case.x, tmp_path / "pruned.onnx", exporter="torchscript")
    assert result.parity is not None and result.parity.rel_error <= 1e-4, result.parity


@pytest.mark.parametrize("kind, name", ALL)
def test_structural_copy_loads_pruned_state_and_reproduces_outputs_exactly(case: Case) -> None:
    skeleton = structural_copy(case.model, case.x, case.plan, biased_layers(case.pruned))
    skeleton.load_state_dict(case.pruned.state_dict())  # strict: same keys, same shapes
    skeleton.eval()
    assert torch.equal(run(skeleton, case.heldout), run(case.pruned, case.heldout))


# ---------------------------------------------------------------- numerics


@pytest.mark.parametrize("kind, name", ALL)
def test_prune_without_compensation_equals_silencing_removed_channels(case: Case) -> None:
    """Independent oracle: slicing the channels out computes what the unpruned model computes with them zeroed."""
    masked = masked_copy(case.model, case.graph, case.plan)
    y_masked, y_plain = run(masked, case.heldout), run(case.plain, case.heldout)
    torch.testing.assert_close(y_plain, y_masked, rtol=1e-4, atol=1e-5 * float(y_masked.abs().max()))


# torch-pruning slices a grouped conv's input within every group and cannot remove whole groups: the grouped model's
# pruning is checked against masking instead (tests/dependency/test_groupconv.py)
@pytest.mark.parametrize("name", [n for n in ZOO_IDS if n != "grouped"])
def test_prune_without_compensation_equals_plain_torch_pruning_slicing(zoo_cases: dict, name: str) -> None:
    import torch_pruning as tp

    case = zoo_cases[name]
    sliced = copy.deepcopy(case.model)
    dg = tp.DependencyGraph().build_dependency(sliced, example_inputs=case.x)
    mods = dict(sliced.named_modules())
    for g in case.graph.groups:
        root = mods[g.name]
        fn = tp.prune_conv_out_channels if isinstance(root, nn.Conv2d) else tp.prune_linear_out_channels
        dg.get_pruning_group(root, fn, idxs=case.plan.pruned(g.name)).prune()
    a, b = case.plain.state_dict(), sliced.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert torch.equal(run(case.plain, case.heldout), run(sliced, case.heldout))


def own_rows(case: Case, layer: str) -> list[int] | None:
    """Output rows a layer keeps: its group's kept channels when it produces a group, else all (None)."""
    for g in case.graph.groups:
        if layer in g.producers:
            return list(case.plan.kept[g.name])
    return None


@pytest.mark.parametrize("name", ZOO_IDS)
def test_prune_writes_compensate_layer_solution_into_each_consumer(zoo_cases: dict, name: str) -> None:
    """Every consumer of the pruned model holds exactly the closed-form repair of its kept coordinates."""
    case = zoo_cases[name]
    before, after = dict(case.model.named_modules()), dict(case.pruned.named_modules())
    bn_follows = {c.module: c.bn_follows for g in case.graph.groups for c in g.consumers}
    for layer, removed in removed_coords(case.graph, case.plan).items():
        m = before[layer]
        w = consumer_weight(m)
        b = None if m.bias is None else m.bias.detach().double().numpy()
        keep = np.setdiff1d(np.arange(w.shape[1]), sorted(removed))
        w_new, b_new = compensate_layer(w, b, case.stats[layer], keep, rescale=bn_follows[layer])
        rows = own_rows(case, layer)
        if rows is not None:
            w_new, b_new = w_new[rows], b_new[rows]
        got_w = consumer_weight(after[layer])
        got_b = after[layer].bias.detach().double().numpy()
        np.testing.assert_allclose(got_w, w_new, rtol=1e-5, atol=1e-6 * np.abs(w_new).max())
        np.testing.assert_allclose(got_b, b_new, rtol=1e-5, atol=1e-6 * np.abs(b_new).max())


@pytest.mark.parametrize("name", ZOO_IDS)
def test_prune_with_compensation_is_closer_to_original_than_plain_slicing(zoo_cases: dict, name: str) -> None:
    case = zoo_cases[name]
    y0 = run(case.model, case.heldout)
    err = float(torch.linalg.norm(run(case.pruned, case.heldout) - y0))
    plain = float(torch.linalg.norm(run(case.plain, case.heldout) - y0))
    assert err < plain, (err, plain)


def test_prune_keeps_ignored_groups_whole(zoo_cases: dict) -> None:
    case = zoo_cases["residual"]
    graph = trace(case.model, case.x, ignore=("block2.*",))
    assert [g.name for g in graph.groups] == ["block1.conv1"]
    plan = Plan(kept={"block1.conv1": (0, 1, 2, 3)}, channels={"block1.conv1": 8}, compensation=False)
    pruned = prune(case.model, case.x, plan, ignore=("block2.*",))
    assert pruned.block1.conv1.out_channels == 4 and pruned.block2.conv1.out_channels == 12
    assert pruned.stem[0].out_channels == 16


# ---------------------------------------------------------------- errors


def test_prune_rejects_plan_for_another_model(zoo_cases: dict) -> None:
    case, other = zoo_cases["chain"], zoo_cases["residual"]
    with pytest.raises(EdgePruneError, match="plan names group 'stem.0', which this model does not have; was it "
                                             "made for another model"):
        prune(case.model, case.x, other.plan, case.stats)


def test_prune_rejects_plan_with_other_group_width(zoo_cases: dict) -> None:
    case = zoo_cases["chain"]
    plan = Plan(kept={"conv1.0": (0, 1)}, channels={"conv1.0": 12}, compensation=False)
    with pytest.raises(EdgePruneError, match="plan says group 'conv1.0' has 12 channels, the model has 8"):
        prune(case.model, case.x, plan)


def test_prune_with_compensation_needs_statistics(zoo_cases: dict) -> None:
    case = zoo_cases["chain"]
    with pytest.raises(EdgePruneError, match="compensation needs calibration statistics"):
        prune(case.model, case.x, case.plan, None)


def test_prune_names_consumer_without_statistics(zoo_cases: dict) -> None:
    case = zoo_cases["chain"]
    stats = {k: v for k, v in case.stats.items() if k != "conv3.0"}
    with pytest.raises(EdgePruneError, match="no calibration statistics for layer conv3.0"):
        prune(case.model, case.x, case.plan, stats)


# ---------------------------------------------------------------- ops that mix channels, traced as pass-through


class Mixer(nn.Module):
    """conv -> ReLU -> <op mixing channels> -> conv: c1's channel j is NOT c2's input channel j."""

    def __init__(self, op: str) -> None:
        super().__init__()
        self.op = op
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.c1(x))
        if self.op == "roll":
            y = torch.roll(y, 1, 1)
        elif self.op == "shuffle":  # torchvision's shufflenet channel_shuffle, 2 groups
            b, c, h, w = y.shape
            y = y.view(b, 2, c // 2, h, w).transpose(1, 2).reshape(b, c, h, w)
        elif self.op == "channel_sum":
            y = y + y.sum(1, keepdim=True)
        elif self.op == "channel_softmax":
            y = y * torch.softmax(y, dim=1)
        elif self.op == "spatial_sum":  # keeps channels apart: must stay prunable
            y = y + y.sum((2, 3), keepdim=True)
        return self.fc(torch.relu(self.c2(y)).mean((2, 3)))


@pytest.mark.parametrize("op", [
    "identity",
    pytest.param("roll"),
    pytest.param("shuffle"),
    "channel_sum",
    "channel_softmax",
    "spatial_sum",
])
def test_prune_is_exact_slicing_or_group_is_excluded_when_an_op_mixes_channels(op: str) -> None:
    torch.manual_seed(0)
    model = Mixer(op).eval()
    x = torch.randn(4, 3, 16, 16)
    graph = trace(model, x[:1])
    if "c1" in graph.excluded:
        assert op not in ("identity", "spatial_sum"), graph.excluded  # ops that keep channels apart stay prunable
        return  # refusing is correct
    assert [g.name for g in graph.groups][:1] == ["c1"]
    plan = Plan(kept={"c1": (0, 1, 4, 5)}, channels={g.name: g.channels for g in graph.groups}, compensation=False)
    pruned = prune(model, x[:1], plan)
    masked = masked_copy(model, graph, plan)
    torch.testing.assert_close(run(pruned, x), run(masked, x), rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- the search's masked proxy


@pytest.mark.parametrize("repair", [True, False], ids=["compensated", "plain"])
@pytest.mark.parametrize("kind, name", ALL)
def test_masked_proxy_computes_what_the_physically_pruned_model_computes(case: Case, repair: bool) -> None:
    from edgeprune.quality.fidelity import MaskedProxy

    plan = case.plan if repair else dataclasses.replace(case.plan, compensation=False)
    pruned = case.pruned if repair else case.plain
    proxy = MaskedProxy(case.model, case.graph, case.stats, case.heldout, repair=repair)
    y0, yp = run(case.model, case.heldout), run(pruned, case.heldout)
    want = float(torch.linalg.norm(yp.double() - y0.double()) / torch.linalg.norm(y0.double()))
    got = proxy.error(plan)
    assert want > 1e-4  # the plan changes the outputs: the comparison below can fail
    assert got == pytest.approx(want, rel=1e-4, abs=1e-6)
    torch.testing.assert_close(run(proxy.model, case.heldout), yp, rtol=1e-4, atol=1e-5 * float(yp.abs().max()))
    # evaluating another plan and coming back restores the same state (memoised repairs, restored originals)
    g0 = case.graph.groups[0]
    proxy.error(dataclasses.replace(plan, kept={**plan.kept, g0.name: tuple(range(g0.channels))}))
    assert proxy.error(plan) == pytest.approx(got, rel=1e-9)


@pytest.mark.parametrize("name", ZOO_IDS)
def test_two_workers_rank_and_prune_exactly_as_one(name: str, zoo_cases: dict[str, Case]) -> None:
    """Groups ranked and consumers repaired in two threads (BLAS on one each, as `group_workers` sets it) give the
    same orders, loss curves and weights, bit for bit, as one at a time."""
    from threadpoolctl import threadpool_limits

    case = zoo_cases[name]
    model = copy.deepcopy(case.model)
    model.load_state_dict(case.original_state)
    with threadpool_limits(1):
        one = rank_all("cap", model, case.graph.groups, case.stats, workers=1)
        two = rank_all("cap", model, case.graph.groups, case.stats, workers=2)
        assert list(two) == list(one) == [g.name for g in case.graph.groups]
        assert all(two[g] == one[g] for g in one)
        plan = plan_from_rankings(case.graph, one, uniform_widths(case.graph, 0.5, 2), criterion="cap",
                                  channel_multiple=2)
        a = prune(model, case.x, plan, case.stats, workers=1)
        b = prune(model, case.x, plan, case.stats, workers=2)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ---------------------------------------------------------------- concat branches


class ConcatIntoDepthwise(nn.Module):
    """Two conv branches concatenated and read by a depthwise conv: one group of 32 channels made by two producers
    (FashionNet's block 3 in miniature)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.left = nn.Conv2d(8, 16, 1)
        self.right = nn.Conv2d(8, 16, 3, padding=1)
        self.dw = nn.Conv2d(32, 32, 3, padding=1, groups=32)
        self.pw = nn.Conv2d(32, 16, 1)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        x = torch.cat([torch.relu(self.left(x)), torch.relu(self.right(x))], 1)
        return self.head(torch.relu(self.pw(torch.relu(self.dw(x)))).mean((2, 3)))


@pytest.mark.parametrize("criterion", ["l1", "l2", "fpgm", "cap"])
def test_no_ranking_empties_a_concat_branch(criterion: str) -> None:
    """Magnitude criteria used to score only the first producer's filters (64 of 128 channels of FashionNet's concat
    group) and kept one branch whole, leaving the other conv with no output channel: a crash at pruning. Every
    criterion now scores every channel of the group, and a plan keeps one channel of each branch at least."""
    from edgeprune.scoring.registry import rank

    torch.manual_seed(0)
    model = ConcatIntoDepthwise().eval()
    with torch.no_grad():
        model.right.weight.mul_(0.01)  # the right branch's filters are all smaller than the left's
    x = torch.randn(1, 3, 8, 8)
    graph = trace(model, x)
    group = next(g for g in graph.groups if g.channels == 32)
    assert group.branches == (tuple(range(16)), tuple(range(16, 32)))
    stats = collect_statistics(model, graph.consumer_modules(), [torch.randn(64, 3, 8, 8)])
    r = rank(criterion, model, group, stats)
    assert sorted(r.order) == list(range(32))
    if criterion in ("l1", "l2"):
        assert set(r.order[:16]) == set(range(16))  # the left branch ranks first, as its filters are larger
    rankings = {g.name: rank(criterion, model, g, stats) for g in graph.groups}
    plan = plan_from_rankings(graph, rankings, {g.name: 8 if g is group else g.channels for g in graph.groups},
                              compensation=False)
    kept = plan.kept[group.name]
    assert len(kept) == 8 and any(c < 16 for c in kept) and any(c >= 16 for c in kept)
    pruned = prune(model, x, plan)
    assert run(pruned, x).shape == (1, 4)


def test_a_plan_that_empties_a_concat_branch_is_refused() -> None:
    torch.manual_seed(0)
    model = ConcatIntoDepthwise().eval()
    x = torch.randn(1, 3, 8, 8)
    graph = trace(model, x)
    group = next(g for g in graph.groups if g.channels == 32)
    plan = Plan(kept={group.name: tuple(range(8))}, channels={g.name: g.channels for g in graph.groups},
                compensation=False)
    with pytest.raises(EdgePruneError, match="keeps no channel of group .* concat branch 16..31"):
        prune(model, x, plan)


class WithGroupNorm(nn.Module):
    """conv -> GroupNorm(4 groups) -> conv -> BatchNorm -> conv -> head: the GroupNorm's group cannot be pruned."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.gn = nn.GroupNorm(4, 16)
        self.c2 = nn.Conv2d(16, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.c3 = nn.Conv2d(16, 8, 3, padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.gn(self.c1(x)))
        x = torch.relu(self.bn(self.c2(x)))
        return self.head(torch.relu(self.c3(x)).mean((2, 3)))


def test_groupnorm_group_is_excluded_and_the_pruned_model_is_what_fidelity_predicted() -> None:
    """Pruning a channel under a GroupNorm renormalises the kept ones: the repair and the masked proxy were both
    wrong (real error 0.156 where the proxy said 0.049, audit F3). Such a group is excluded with its reason; the
    others prune, and the physically pruned model's error is what the search's proxy computed."""
    from edgeprune.quality.fidelity import MaskedProxy

    torch.manual_seed(0)
    model = WithGroupNorm().eval()
    x = torch.randn(1, 3, 12, 12)
    graph = trace(model, x)
    assert "GroupNorm with 4 channels per group" in graph.excluded["c1"]
    assert [g.name for g in graph.groups] == ["c2", "c3"]
    calib, heldout = torch.randn(64, 3, 12, 12), torch.randn(32, 3, 12, 12)
    stats = collect_statistics(model, graph.consumer_modules(), [calib])
    rankings = {g.name: rank("cap", model, g, stats) for g in graph.groups}
    plan = plan_from_rankings(graph, rankings, uniform_widths(graph, 0.5, 2))
    pruned = prune(model, x, plan, stats, graph=graph)
    y0, yp = run(model, heldout), run(pruned, heldout)
    real = float(torch.linalg.norm(yp.double() - y0.double()) / torch.linalg.norm(y0.double()))
    assert MaskedProxy(model, graph, stats, heldout).error(plan) == pytest.approx(real, rel=1e-4)
    assert real > 1e-3
