"""The criteria from the papers (papers.py, kfac.py, signals.py): a property of each paper on a small problem, each
one through `prune` with compensation on and off, `prune --plan` replaying it exactly, and the refusals."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import edgeprune
from edgeprune.cli.commands import main
from edgeprune.dependency.graph import trace
from edgeprune.scoring.kfac import obs_scores, output_factors
from edgeprune.scoring.papers import (BETAS, ExemplarRanking, affinity_exemplars, exemplar_ladder, functionality_order,
                                      rank_epruner, similarities)
from edgeprune.scoring.registry import CRITERIA, rank_all
from edgeprune.scoring.signals import collect_signals
from edgeprune.search.method_widths import method_widths_fn

METHODS = ("epruner", "similarity", "functionality", "nap")


class SmallCNN(nn.Module):
    """Three conv-BN-ReLU layers and a linear head: three prunable groups (8, 16, 16 channels)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.c = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.c(self.b(self.a(x))).mean((2, 3)))


def make_net() -> SmallCNN:
    torch.manual_seed(0)
    net = SmallCNN()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    return net.eval()


def dataset(n: int = 160) -> tuple[np.ndarray, np.ndarray]:
    """Smooth random 12x12 images, labelled by the net's own top-1."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 1, 12, 12)).astype(np.float32)
    x = (x + np.roll(x, 1, 2) + np.roll(x, 1, 3)) / 1.7
    with torch.no_grad():
        y = make_net()(torch.from_numpy(x)).argmax(1).numpy().astype(np.int64)
    return x, y


X, Y = dataset()


def api_prune(out: Path, **kw: Any) -> Any:
    return edgeprune.prune(make_net(), example_input=torch.from_numpy(X[:1]), calibration=(X, Y), out=out,
                           exporter="torchscript", **kw)


def test_criterion_help_lists_every_criterion(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["prune", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert all(name in text for name in CRITERIA) and "--pseudo-labels" in text


# ---------------------------------------------------------------- EPruner


def clustered_filters(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """24 filters around 4 well separated centres (6 each), and the centre each one is from."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=3.0, size=(4, 9))
    truth = np.repeat(np.arange(4), 6)
    return centres[truth] + rng.normal(scale=0.1, size=(24, 9)), truth


def test_affinity_propagation_exemplars_are_members_of_their_own_clusters() -> None:
    from sklearn.cluster import AffinityPropagation

    x, truth = clustered_filters()
    sim, median = similarities(x)
    centers = affinity_exemplars(x, 1.0, sim=(sim, median))
    ap = AffinityPropagation(affinity="precomputed", preference=median, damping=0.7, max_iter=500,
                             random_state=0).fit(sim)
    assert np.array_equal(centers, ap.cluster_centers_indices_)
    assert all(ap.labels_[c] == k for k, c in enumerate(centers))  # each exemplar belongs to the cluster it heads
    assert len(centers) == 4 and sorted(truth[centers]) == [0, 1, 2, 3]  # one exemplar per true cluster
    for k, c in enumerate(centers):  # and its cluster is exactly the true cluster it lies in
        assert set(np.flatnonzero(ap.labels_ == k)) == set(np.flatnonzero(truth == truth[c]))


def test_epruner_width_is_the_number_of_exemplars_and_they_come_first() -> None:
    x, _ = clustered_filters()
    conv = nn.Conv2d(1, 24, 3, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.from_numpy(x).reshape(24, 1, 3, 3))
    x = conv.weight.detach().double().numpy().reshape(24, -1)  # what the criterion reads: float32 weights
    net = nn.Sequential(conv, nn.ReLU(), nn.Conv2d(24, 5, 1)).eval()
    graph = trace(net, torch.randn(1, 1, 8, 8))
    (group,) = graph.groups
    ranking = rank_epruner(dict(net.named_modules()), group, {}, None)
    assert isinstance(ranking, ExemplarRanking) and len(ranking.exemplars) == len(BETAS)
    widths_for = method_widths_fn("epruner", graph, {group.name: ranking}, {group.name: list(range(1, 25))})
    checked = 0
    ladder = exemplar_ladder(x)
    assert np.array_equal(ladder[BETAS.index(1.0) - 4], affinity_exemplars(x, 2 ** -1))  # looser: flat AP's
    for i, centers in enumerate(ladder):
        if centers is None:
            continue
        assert ranking.exemplars[i] == centers.size
        u = i / (len(BETAS) - 1)
        if 0 < u < 1:
            assert widths_for(u)[group.name] == centers.size  # the width rule: the number of exemplars
            checked += 1
        assert set(ranking.order[:centers.size]) == {int(c) for c in centers}  # exemplars first
    assert checked >= 3
    assert widths_for(0.0)[group.name] == 24 and widths_for(1.0)[group.name] == 1


# ---------------------------------------------------------------- channel similarity


class Duplicated(nn.Module):
    """conv1 makes 6 distinct channels and an exact copy of each (filters and BN alike): 12 channels, 6 functions."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.conv1 = nn.Conv2d(1, 12, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(12)
        self.conv2 = nn.Conv2d(12, 4, 3, padding=1)
        with torch.no_grad():
            self.conv1.weight[6:] = self.conv1.weight[:6]
            self.bn1.weight.uniform_(0.5, 1.5)
            self.bn1.weight[6:] = self.bn1.weight[:6]
            self.bn1.bias.uniform_(-0.2, 0.2)
            self.bn1.bias[6:] = self.bn1.bias[:6]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(torch.relu(self.bn1(self.conv1(x)))).mean((2, 3))


@pytest.mark.parametrize("compensation", [False, True])
def test_merged_duplicate_channels_reproduce_the_unmerged_output(tmp_path: Path, compensation: bool) -> None:
    net = Duplicated().eval()
    r = edgeprune.prune(net, ratio=0.5, example_input=torch.from_numpy(X[:1]), calibration=X, criterion="similarity",
                        compensation=compensation, channel_multiple=1, exporter="torchscript", out=tmp_path / "o",
                        repair="independent")
    kept = r.plan.kept["conv1"]
    assert len(kept) == 6 and sorted(k % 6 for k in kept) == list(range(6))  # one of each duplicate pair
    pairs = r.plan.meta["merge"]["conv1"]
    assert sorted(p[0] for p in pairs) == sorted(set(range(12)) - set(kept)) and all(a % 6 == b % 6 for a, b in pairs)
    x = torch.from_numpy(X[:32])
    with torch.no_grad():
        ref, out = net(x), r.module(x)
    # with the repair, statistics shrunk towards their diagonal see the copies as slightly different (a regression
    # coefficient just below 1); the merge alone is exact to float32 round-off
    assert torch.allclose(out, ref, atol=(5e-3 if compensation else 1e-5) * float(ref.abs().max()))
    if not compensation:  # slicing without the merge loses the removed copies' contribution
        again = edgeprune.prune(net, ratio=0.5, example_input=torch.from_numpy(X[:1]), calibration=X, criterion="l2",
                                compensation=False, channel_multiple=1, exporter="torchscript", out=tmp_path / "s")
        with torch.no_grad():
            assert (again.module(x) - ref).abs().max() > 100 * (out - ref).abs().max()


# ---------------------------------------------------------------- NAP (K-FAC)


def test_kfac_importance_equals_the_exact_hessian_importance_on_a_linear_layer() -> None:
    """y = W a + b, loss ½‖y - t‖²: with residuals that take every sign pattern at every input, K-FAC's factors are
    exact (G = I, Ā = E[ã ãᵀ]), and its surgeon's ΔL of removing an input must equal the one from the exact Hessian
    over (W, b), inverted in full."""
    import itertools

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    d, n_out, n = 4, 3, 12
    a = rng.normal(size=(n, d)) @ rng.normal(size=(d, d))  # correlated inputs
    signs = np.asarray(list(itertools.product((-1.0, 1.0), repeat=n_out)))
    layer = nn.Linear(d, n_out).double()
    inputs = torch.from_numpy(np.repeat(a, len(signs), axis=0))
    with torch.no_grad():
        targets = layer(inputs) - torch.from_numpy(np.tile(signs, (n, 1)))
    net = nn.Sequential(layer)

    def mse_sum(out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return 0.5 * ((out - t) ** 2).sum()

    g = output_factors(net, None, [(inputs, targets)], loss=mse_sum, names=["0"])["0"]  # type: ignore[arg-type]
    assert np.allclose(g, np.eye(n_out))
    x = inputs.numpy()
    cov = np.cov(x.T, bias=True)
    w = layer.weight.detach().numpy()
    kfac = obs_scores(w, cov, g, tuple((j,) for j in range(d)), ridge=0.0)

    def mean_loss(flat: torch.Tensor) -> torch.Tensor:
        wt, bt = flat[: n_out * d].reshape(n_out, d), flat[n_out * d:]
        return 0.5 * ((inputs @ wt.T + bt - targets) ** 2).sum() / len(inputs)

    flat = torch.cat([layer.weight.detach().reshape(-1), layer.bias.detach()])
    h = torch.autograd.functional.hessian(mean_loss, flat).numpy()
    h_inv = np.linalg.inv(h)
    exact = []
    for j in range(d):
        q = [i * d + j for i in range(n_out)]  # column j of W, every row
        exact.append(0.5 * w[:, j] @ np.linalg.solve(h_inv[np.ix_(q, q)], w[:, j]))
    assert np.allclose(kfac, exact, rtol=1e-8)
    assert len(set(np.round(kfac, 6))) == d  # the inputs are not all alike: the check compares distinct numbers


def test_nap_allocation_removes_the_globally_least_important_channels() -> None:
    from edgeprune.api import _inputs
    from edgeprune.config import PruneConfig
    from edgeprune.jobs.session import prepare

    fields, inputs = _inputs(make_net(), torch.from_numpy(X[:1]), None, (X, Y), {}, 0)
    prep = prepare(PruneConfig(**fields, criterion="nap"), inputs=inputs)
    widths_for = method_widths_fn("nap", prep.graph, prep.rankings,
                                  {g.name: list(range(1, g.channels + 1)) for g in prep.graph.groups})
    total = sum(g.channels for g in prep.graph.groups)
    scores = {g.name: -np.diff(prep.rankings[g.name].loss) for g in prep.graph.groups}
    widths = widths_for(0.4)
    assert sum(g.channels - widths[g.name] for g in prep.graph.groups) == int(0.4 * total)
    kept_min = min(scores[g][: widths[g]].min() for g in scores)
    removed_max = max(scores[g][widths[g]:].max() for g in scores if widths[g] < len(scores[g]))
    assert removed_max <= kept_min  # one threshold across groups
    assert len({widths[g] / c for g, c in ((g.name, g.channels) for g in prep.graph.groups)}) > 1  # ratios differ


# ---------------------------------------------------------------- functionality


def test_functionality_ranks_a_class_selective_channel_above_a_constant_one() -> None:
    """Channel 0 fires on class 1 only, channel 1 is constant, channel 2 is noise alike for every class, channel 3
    copies channel 0's function at half strength: 0 first, its copy after the noise, the constant last."""
    rng = np.random.default_rng(0)
    n = 120
    y = np.repeat(np.arange(3), n // 3)
    x = np.zeros((n, 4, 4, 4), dtype=np.float32)
    x[:, 0] = (y == 1)[:, None, None] * 2.0
    x[:, 1] = 1.0
    x[:, 2] = rng.uniform(0, 1, size=(n, 4, 4))
    x[:, 2] += rng.uniform(0, 0.3, size=(n, 1, 1)) * (y == 2)[:, None, None]  # a weak class signal
    x[:, 3] = x[:, 0] / 2
    net = nn.Sequential(nn.Conv2d(4, 4, 1), nn.ReLU(), nn.Conv2d(4, 2, 1)).eval()
    with torch.no_grad():
        net[0].weight.copy_(torch.eye(4).reshape(4, 4, 1, 1))
        net[0].bias.zero_()
    graph = trace(net, torch.from_numpy(x[:1]))
    batches = [(torch.from_numpy(x[i:i + 40]), y[i:i + 40]) for i in range(0, n, 40)]
    sig = collect_signals(net, graph, batches, frozenset({"means", "labels"}))
    order = rank_all("functionality", net, graph.groups, {}, sig)["0"].order
    assert order[0] == 0 and order[-1] == 1 and order.index(2) < order.index(3)
    assert functionality_order(np.array([[1.0, 1.0, 1.0], [0.0, 0.0, 5.0]]))[0] == 1


# ---------------------------------------------------------------- every method through the pipeline


@pytest.fixture(scope="module")
def pruned(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Each method's prune of SmallCNN at ratio 0.5, compensation on (the sequential repair) and off."""
    root = tmp_path_factory.mktemp("criteria")
    return {(c, comp): api_prune(root / f"{c}-{comp}", ratio=0.5, criterion=c, compensation=comp)
            for c in METHODS for comp in (True, False)}


@pytest.mark.slow
@pytest.mark.parametrize("criterion", METHODS)
def test_each_method_prunes_with_compensation_on_and_off_and_the_plan_replays_exactly(
        pruned: dict, criterion: str, tmp_path: Path) -> None:
    on, off = pruned[(criterion, True)], pruned[(criterion, False)]
    assert on.plan.criterion == criterion and on.plan.kept == off.plan.kept  # the selection ignores the repair
    assert any(len(k) < on.plan.channels[g] for g, k in on.plan.kept.items())
    # the compensation lowers the output error that slicing leaves
    assert on.fidelity.output_rel_error < off.fidelity.output_rel_error
    for r in (on, off):
        again = api_prune(tmp_path / f"replay-{r.plan.compensation}", plan=r.out / "plan.json")
        assert again.plan == r.plan
        a, b = again.module.state_dict(), r.module.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_similarity_plan_records_its_merges_and_replays_them_exactly(tmp_path: Path) -> None:
    r = api_prune(tmp_path / "s", ratio=0.5, criterion="similarity", compensation=False)
    saved = json.loads((r.out / "plan.json").read_text())
    assert saved["meta"]["merge"] and set(saved["meta"]["merge"]) <= set(saved["kept"])
    again = api_prune(tmp_path / "replay", plan=r.out / "plan.json")
    a, b = again.module.state_dict(), r.module.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    sliced = api_prune(tmp_path / "sliced", ratio=0.5, criterion="similarity", compensation=False,
                       channel_multiple=8)
    assert sliced.plan.kept == r.plan.kept


# ---------------------------------------------------------------- refusals


@pytest.mark.parametrize("criterion", ["nap", "functionality"])
def test_a_criterion_that_needs_labels_on_unlabelled_data_is_refused_before_any_work(
        tmp_path: Path, capsys: pytest.CaptureFixture, criterion: str) -> None:
    out = tmp_path / "o"
    code = main(["prune", "--criterion", criterion, "--ratio", "0.5", "--calibration", "random", "--out", str(out)])
    text = capsys.readouterr().err
    errors = [line for line in text.splitlines() if line.startswith("edgeprune: error:")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in text  # progress lines aside, one line
    assert criterion in errors[0] and "--pseudo-labels" in errors[0]
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_pseudo_labels_stand_in_for_missing_labels(tmp_path: Path) -> None:
    r = edgeprune.prune(make_net(), example_input=torch.from_numpy(X[:1]), calibration=X, out=tmp_path / "p",
                        exporter="torchscript", ratio=0.5, criterion="nap", pseudo_labels=True)
    labelled = api_prune(tmp_path / "l", ratio=0.5, criterion="nap")
    assert r.plan.kept == labelled.plan.kept  # Y is the net's own top-1: the same labels


def test_a_method_allocation_needs_its_criterion(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    code = main(["build", "--allocation", "nap", "--criterion", "cap", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "--criterion nap" in err and not (tmp_path / "o").exists()


# ---------------------------------------------------------------- builds


TARGET = """name = "cpu-test"
runtime = "onnxruntime"
precision = "fp32"
channel_multiple = 4
threads = 1
[measure]
warmup = 2
iterations = 5
repeats = 2
final_repeats = 2
"""


def fake_latency(path, target, cache=None, repeats=None, progress=None, calibration=None):
    """A deterministic latency proportional to the weights in the ONNX file: these builds check the methods' width
    rules against a budget, not this machine's timing."""
    import onnx

    from edgeprune.runtimes.stats import stats_from_repeats

    weights = sum(int(np.prod(t.dims)) for t in onnx.load(str(path)).graph.initializer)
    return stats_from_repeats([[weights * 1e-5]] * (repeats or 2), target=target.name, runtime=target.runtime,
                              runtime_version="fake", precision=target.precision, source="measured")


@pytest.mark.slow
@pytest.mark.parametrize("criterion, allocation", [("epruner", "epruner"), ("nap", "nap"), ("similarity", "auto"),
                                                   ("functionality", "auto")])
def test_a_build_meets_its_budget_with_each_method(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, criterion: str,
                                                   allocation: str) -> None:
    import edgeprune.runtimes as rt

    monkeypatch.setattr(rt, "measure", fake_latency)
    (tmp_path / "cpu-test.toml").write_text(TARGET)
    r = edgeprune.build(make_net(), example_input=torch.from_numpy(X[:1]), calibration=(X, Y),
                        device=str(tmp_path / "cpu-test.toml"), latency="0.6x", tolerance=0.2, allocation=allocation,
                        criterion=criterion, exporter="torchscript", out=tmp_path / "b")
    assert r.met and r.final.median <= r.budget_ms and r.plan.criterion == criterion
    # auto is the latency allocation with the repair (BuildConfig.allocation_for)
    assert r.report["search"]["allocation"] == (allocation if allocation != "auto" else "latency")
    again = api_prune(tmp_path / "replay", plan=r.out / "plan.json")
    a, b = again.module.state_dict(), r.module.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("criterion, allocation", [("nap", "nap"), ("epruner", "epruner"), ("similarity", "step"),
                                                   ("functionality", "step")])
def test_a_build_on_a_latency_table_with_each_method(table_env: dict, tmp_path: Path, capsys: pytest.CaptureFixture,
                                                     criterion: str, allocation: str) -> None:
    code = main(["build", "--lut", str(table_env["table"]), "--device", str(table_env["target"]), "--latency", "0.5x",
                 "--tolerance", "0.2", "--criterion", criterion, "--allocation", allocation,
                 "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "b"), "--json"])
    r = json.loads(capsys.readouterr().out)
    assert code == 0 and r["met"] and r["search"]["criterion"] == criterion
    assert "lut" in [c["source"] for c in r["search"]["trace"]]
