from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from edgeprune.compensation.solve import PrefixSolver, compensate_layer, reconstruction_error
from edgeprune.compensation.statistics import (LayerStats, _Accumulator, collect_statistics, layer_rng,
                                               min_patches_needed, unfold_input)
from edgeprune.dependency.graph import trace
from edgeprune.errors import EdgePruneError
from edgeprune.plan import plan_from_rankings, uniform_widths
from edgeprune.scoring.base import consumer_weight
from edgeprune.scoring.registry import rank
from edgeprune.surgery.apply import removed_coords
from tests.models import ZOO, ZooEntry


def numpy_unfold(x: np.ndarray, k: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int],
                 dilation: tuple[int, int]) -> np.ndarray:
    """(N*positions, C*kh*kw) patches, channel-major, written out loop by loop: the reference for unfold_input."""
    n, c, h, w = x.shape
    xp = np.zeros((n, c, h + 2 * padding[0], w + 2 * padding[1]), dtype=np.float64)
    xp[:, :, padding[0]:padding[0] + h, padding[1]:padding[1] + w] = x
    h_out = (h + 2 * padding[0] - dilation[0] * (k[0] - 1) - 1) // stride[0] + 1
    w_out = (w + 2 * padding[1] - dilation[1] * (k[1] - 1) - 1) // stride[1] + 1
    rows = []
    for b in range(n):
        for i in range(h_out):
            for j in range(w_out):
                patch = np.empty((c, k[0], k[1]))
                for a in range(k[0]):
                    for e in range(k[1]):
                        patch[:, a, e] = xp[b, :, i * stride[0] + a * dilation[0], j * stride[1] + e * dilation[1]]
                rows.append(patch.ravel())
    return np.asarray(rows)


class StatsNet(nn.Module):
    """A conv with stride, padding and dilation (6x6 output: no spatial subsampling) and a Linear after a flatten."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(3, 4, 3, padding=1)
        self.conv_b = nn.Conv2d(4, 6, 3, stride=2, padding=2, dilation=2)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(24, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.conv_b(torch.relu(self.conv_a(x))))
        return self.fc(torch.flatten(self.pool(y), 1))


def captured_inputs(model: nn.Module, names: list[str], batches: list[torch.Tensor]) -> dict[str, list[np.ndarray]]:
    modules = dict(model.named_modules())
    seen: dict[str, list[np.ndarray]] = {n: [] for n in names}
    handles = [modules[n].register_forward_pre_hook(lambda m, a, n=n: seen[n].append(a[0].double().numpy()))
               for n in names]
    with torch.no_grad():
        for x in batches:
            model(x)
    for h in handles:
        h.remove()
    return seen


def population_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mu = x.mean(0)
    return mu, (x - mu).T @ (x - mu) / len(x)


# ---------------------------------------------------------------- statistics


@pytest.fixture(scope="module")
def stats_net() -> tuple[nn.Module, list[torch.Tensor]]:
    torch.manual_seed(0)
    model = StatsNet().eval()
    batches = [torch.randn(8, 3, 12, 12) + 0.5 for _ in range(3)] + [torch.randn(5, 3, 12, 12) + 0.5]  # short last
    return model, batches


@pytest.mark.parametrize("flush", [1, 3, 8])  # float32 partial sums of 1 or 3 batches (float64 total), or one only
def test_collect_statistics_equals_numpy_for_strided_dilated_padded_conv(stats_net: tuple, flush: int,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    model, batches = stats_net
    monkeypatch.setattr(_Accumulator, "FLUSH", flush)
    stats = collect_statistics(model, ["conv_b"], batches, shrink=False)["conv_b"]
    x = np.concatenate(captured_inputs(model, ["conv_b"], batches)["conv_b"])
    patches = numpy_unfold(x, (3, 3), (2, 2), (2, 2), (2, 2))
    mu, cov = population_stats(patches)
    assert patches.shape == (29 * 36, 36) and stats.count == 29 * 36 and stats.block == 9 and stats.dim == 36
    np.testing.assert_allclose(stats.mean, mu, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(stats.cov, cov, rtol=1e-5, atol=1e-6 * np.abs(cov).max())
    assert stats.mean.dtype == np.float64 and stats.cov.dtype == np.float64


def test_collect_statistics_equals_numpy_for_linear_after_flatten(stats_net: tuple) -> None:
    model, batches = stats_net
    stats = collect_statistics(model, ["fc"], batches, shrink=False)["fc"]
    x = np.concatenate(captured_inputs(model, ["fc"], batches)["fc"])
    mu, cov = population_stats(x)
    assert stats.count == 29 and stats.block == 1 and stats.dim == 24
    np.testing.assert_allclose(stats.mean, mu, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(stats.cov, cov, rtol=1e-5, atol=1e-6 * np.abs(cov).max())


def test_collect_statistics_removes_its_hooks_when_done_and_when_failing(stats_net: tuple) -> None:
    """Statistics are frozen after calibration (CAP.md §7.1): no hook keeps updating them."""
    model, batches = stats_net
    collect_statistics(model, ["conv_b", "fc"], batches)
    assert not model.conv_b._forward_pre_hooks and not model.fc._forward_pre_hooks
    bad = batches[0].clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(EdgePruneError):
        collect_statistics(model, ["conv_b", "fc"], [batches[0], bad])
    assert not model.conv_b._forward_pre_hooks and not model.fc._forward_pre_hooks


def test_collect_statistics_raises_on_nan_batch_naming_it(stats_net: tuple) -> None:
    model, batches = stats_net
    bad = batches[1].clone()
    bad[2, 1, 3, 3] = float("nan")
    with pytest.raises(EdgePruneError, match="calibration batch 1 contains NaN or infinite values"):
        collect_statistics(model, ["conv_b"], [batches[0], bad])
    bad[2, 1, 3, 3] = float("inf")
    with pytest.raises(EdgePruneError, match="calibration batch 0 contains NaN or infinite values"):
        collect_statistics(model, ["conv_b"], [bad])


def test_collect_statistics_raises_naming_samples_needed_when_too_few() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 10)).eval()  # 768 inputs: 48 samples needed
    assert min_patches_needed(768) == 48
    with pytest.raises(EdgePruneError, match=r"layer 1 needs at least 48 calibration samples .* gives 10"):
        collect_statistics(model, ["1"], [torch.randn(10, 3, 16, 16)])
    stats = collect_statistics(model, ["1"], [torch.randn(48, 3, 16, 16)])  # rank-deficient but accepted
    assert stats["1"].count == 48


def test_collect_statistics_raises_when_consumer_never_runs() -> None:
    class Unused(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used = nn.Linear(4, 4)
            self.spare = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.used(x)

    with pytest.raises(EdgePruneError, match="layer spare never ran during calibration"):
        collect_statistics(Unused(), ["used", "spare"], [torch.randn(32, 4)])


@pytest.mark.parametrize("dim, need", [(1, 8), (128, 8), (143, 8), (144, 9), (2048, 128), (4608, 288)])
def test_min_patches_needed_is_dim_over_16_at_least_8(dim: int, need: int) -> None:
    assert min_patches_needed(dim) == need


def test_unfold_input_subsamples_large_maps_to_max_positions() -> None:
    conv = nn.Conv2d(2, 3, 3, padding=1)
    x = torch.randn(2, 2, 32, 32)
    cols = unfold_input(conv, x, max_positions=64)  # 1024 positions: every 4th row and column
    ref = numpy_unfold(x.double().numpy(), (3, 3), (4, 4), (1, 1), (1, 1))
    assert cols.shape == (2 * 64, 18)
    np.testing.assert_allclose(cols.double().numpy(), ref, rtol=0, atol=0)


@pytest.mark.parametrize("conv", [
    nn.Conv2d(2, 3, 3, padding="same"), nn.Conv2d(2, 3, 4, padding="same"), nn.Conv2d(2, 3, 3, padding="valid"),
    nn.Conv2d(2, 3, 3, padding="same", dilation=2), nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"),
    nn.Conv2d(2, 3, 3, padding=(1, 2), padding_mode="replicate"),
    nn.Conv2d(2, 3, 3, padding=2, padding_mode="circular", stride=2),
], ids=["same", "same-even", "valid", "same-dilated", "reflect", "replicate", "circular-stride"])
def test_unfold_input_reproduces_the_conv_for_every_padding(conv: nn.Conv2d) -> None:
    """Patches times the weight equal the conv's own output, whatever its padding: every padding mode is supported
    (they used to abort the whole job)."""
    x = torch.randn(2, 2, 9, 9)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 'same' with an even kernel: torch warns about a padded copy
        y = conv(x) - conv.bias[:, None, None]
        cols = unfold_input(conv, x, max_positions=10**9)
    got = cols @ conv.weight.reshape(3, -1).T
    torch.testing.assert_close(got, y.permute(0, 2, 3, 1).reshape(-1, 3), rtol=1e-5, atol=1e-5)


def test_random_offsets_cover_every_position_and_are_reproducible() -> None:
    """With a random offset per batch, every output position (borders and both phases included) is sampled over
    batches; the fixed offset 0 never reaches the last rows and columns. The same seed gives the same patches."""
    conv = nn.Conv2d(1, 1, 3, padding=1, bias=False)
    x = torch.arange(32 * 32, dtype=torch.float32).reshape(1, 1, 32, 32)  # each centre value names its position
    centre = 4  # the middle of a 3x3 patch: the input value at the output position

    def seen(rng: np.random.Generator | None, batches: int) -> set[int]:
        return {int(v) for _ in range(batches) for v in unfold_input(conv, x, 64, rng)[:, centre]}

    assert len(seen(None, 50)) == 64  # offset 0: a quarter of the rows and columns, always the same ones
    assert seen(np.random.default_rng(0), 200) == set(range(32 * 32))
    a = unfold_input(conv, x, 64, layer_rng(7, "conv"))
    b = unfold_input(conv, x, 64, layer_rng(7, "conv"))
    assert torch.equal(a, b) and not torch.equal(a, unfold_input(conv, x, 64, layer_rng(8, "conv")))


# ---------------------------------------------------------------- compensate_layer


@pytest.fixture(scope="module")
def regression() -> dict[str, np.ndarray]:
    """Correlated inputs with a non-zero mean, a layer, and statistics of the inputs."""
    rng = np.random.default_rng(0)
    p, d, n = 600, 12, 5
    mix = rng.standard_normal((d, d)) + 0.5 * np.eye(d)
    x = rng.standard_normal((p, d)) @ mix + rng.standard_normal(d)
    w, b = rng.standard_normal((n, d)), rng.standard_normal(n)
    mu, cov = population_stats(x)
    return {"x": x, "w": w, "b": b, "mu": mu, "cov": cov}


def layer_stats(r: dict[str, np.ndarray], block: int = 1) -> LayerStats:
    return LayerStats(mean=r["mu"], cov=r["cov"], count=len(r["x"]), block=block)


KEEPS = [np.array([0, 2, 3, 7, 8, 11]), np.array([5]), np.arange(11)]


@pytest.mark.parametrize("keep", KEEPS, ids=["half", "one", "all_but_one"])
def test_compensate_layer_equals_least_squares_when_no_rescale(regression: dict, keep: np.ndarray) -> None:
    r = regression
    y = r["x"] @ r["w"].T + r["b"]
    design = np.hstack([r["x"][:, keep], np.ones((len(r["x"]), 1))])
    coef = np.linalg.lstsq(design, y, rcond=None)[0]  # (|S| + 1, N)
    w_new, b_new = compensate_layer(r["w"], r["b"], layer_stats(r), keep, rescale=False, ridge=1e-14)
    np.testing.assert_allclose(w_new, coef[:-1].T, rtol=1e-8, atol=1e-9)
    np.testing.assert_allclose(b_new, coef[-1], rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("rescale", [False, True])
def test_prefix_solver_equals_direct_solve_for_every_prefix_as_its_factor_grows(regression: dict,
                                                                                rescale: bool) -> None:
    """Prefixes asked in a search's order (small, large, in between, all): each extension of the factor must give
    what a direct solve on the same coordinates gives."""
    r = regression
    order = np.random.default_rng(3).permutation(12)
    solver = PrefixSolver(r["w"], layer_stats(r), order)
    for kept in (2, 9, 5, 10, 12, 1):
        w_new, b_new = solver.solve(kept, r["b"], rescale)
        keep = np.sort(order[:kept])
        w_ref, b_ref = compensate_layer(r["w"], r["b"], layer_stats(r), keep, rescale=rescale)
        pos = {c: i for i, c in enumerate(keep)}
        # the two rescales differ by the 1e-6 relative ridge (the prefix path's variance includes it)
        tol = 1e-5 if rescale else 1e-8
        np.testing.assert_allclose(w_new, w_ref[:, [pos[c] for c in order[:kept]]], rtol=tol, atol=1e-9)
        np.testing.assert_allclose(b_new, b_ref, rtol=tol, atol=tol * np.abs(b_ref).max())
    assert solver.low.shape == (12, 12)


def test_compensate_layer_keeps_everything_when_nothing_removed(regression: dict) -> None:
    r = regression
    keep = np.arange(12)
    w_new, b_new = compensate_layer(r["w"], r["b"], layer_stats(r), keep, rescale=True, ridge=1e-14)
    np.testing.assert_allclose(w_new, r["w"], rtol=1e-8, atol=1e-9)
    np.testing.assert_allclose(b_new, r["b"], rtol=1e-8, atol=1e-9)


def test_compensate_layer_without_bias_folds_mean_into_new_bias(regression: dict) -> None:
    r = regression
    keep = KEEPS[0]
    y = r["x"] @ r["w"].T
    design = np.hstack([r["x"][:, keep], np.ones((len(r["x"]), 1))])
    coef = np.linalg.lstsq(design, y, rcond=None)[0]
    w_new, b_new = compensate_layer(r["w"], None, layer_stats(r), keep, ridge=1e-14)
    np.testing.assert_allclose(b_new, coef[-1], rtol=1e-8, atol=1e-9)


def test_compensate_layer_with_nothing_kept_predicts_the_mean_output(regression: dict) -> None:
    r = regression
    w_new, b_new = compensate_layer(r["w"], r["b"], layer_stats(r), np.array([], dtype=np.int64))
    assert w_new.shape == (5, 0)
    np.testing.assert_allclose(b_new, (r["x"] @ r["w"].T + r["b"]).mean(0), rtol=1e-10)


@pytest.mark.parametrize("keep", KEEPS, ids=["half", "one", "all_but_one"])
def test_compensate_layer_rescale_keeps_each_output_mean_and_variance(regression: dict, keep: np.ndarray) -> None:
    """What a following BatchNorm sees is unchanged, per-channel pre-BN mean and variance (CAP.md §3), for every row
    whose fit explains at least a quarter of its variance; rows below stay as fitted, because there the rescale is
    worse than the mean-only repair (checked on the data)."""
    r = regression
    w_new, b_new = compensate_layer(r["w"], r["b"], layer_stats(r), keep, rescale=True)
    w_ls, b_ls = compensate_layer(r["w"], r["b"], layer_stats(r), keep, rescale=False)
    before = r["x"] @ r["w"].T + r["b"]
    after = r["x"][:, keep] @ w_new.T + b_new
    fitted = r["x"][:, keep] @ w_ls.T + b_ls
    r2 = fitted.var(0) / before.var(0)
    rescaled = r2 >= 0.25
    np.testing.assert_allclose(after.var(0)[rescaled], before.var(0)[rescaled], rtol=1e-6)
    np.testing.assert_allclose(after.mean(0), before.mean(0), rtol=1e-8, atol=1e-8)
    # the rescaled rows are the least-squares rows times a factor >= 1; the others are the least-squares rows
    ratio = w_new / w_ls
    np.testing.assert_allclose(ratio, np.repeat(ratio[:, :1], ratio.shape[1], axis=1), rtol=1e-9)
    assert (ratio[rescaled, 0] >= 1.0 - 1e-12).all() and np.allclose(ratio[~rescaled, 0], 1.0)
    if (~rescaled).any():  # why: rescaling those rows would lose to predicting the mean
        scale = np.sqrt(before.var(0) / fitted.var(0))
        mean_only = ((before - before.mean(0)) ** 2).mean(0)
        rescaled_err = ((before - (fitted - fitted.mean(0)) * scale - before.mean(0)) ** 2).mean(0)
        assert (rescaled_err[~rescaled] > mean_only[~rescaled]).all()


def test_rescale_guard_is_exercised_when_one_input_is_kept(regression: dict) -> None:
    r = regression
    w_ls, b_ls = compensate_layer(r["w"], r["b"], layer_stats(r), KEEPS[1], rescale=False)
    before = r["x"] @ r["w"].T + r["b"]
    r2 = (r["x"][:, KEEPS[1]] @ w_ls.T).var(0) / before.var(0)
    assert (r2 < 0.25).any() and (r2 >= 0.25).any()


def test_regression_form_ridge_keeps_the_kept_weights(regression: dict) -> None:
    """With every input kept, any ridge returns W itself (the form W Σ (Σ + λI)⁻¹ would shrink it), and at a large
    ridge the repair tends to slicing plus the mean (W_S, b + W_P μ_P), not to zero weights."""
    r = regression
    everything = np.arange(r["w"].shape[1])
    for ridge in (1e-6, 1e-2, 1.0):
        w_new, b_new = compensate_layer(r["w"], r["b"], layer_stats(r), everything, ridge=ridge)
        np.testing.assert_allclose(w_new, r["w"], rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(b_new, r["b"], rtol=1e-9, atol=1e-9)
    keep = KEEPS[0]
    w_big, _ = compensate_layer(r["w"], r["b"], layer_stats(r), keep, ridge=1e6)
    np.testing.assert_allclose(w_big, r["w"][:, keep], rtol=1e-4, atol=1e-4)


def test_compensate_layer_is_regularised_when_statistics_are_rank_deficient() -> None:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((10, 20))  # 10 samples for 20 dimensions: singular covariance
    w, b = rng.standard_normal((4, 20)), np.zeros(4)
    mu, cov = population_stats(x)
    keep = np.arange(0, 20, 2)
    w_new, b_new = compensate_layer(w, b, LayerStats(mu, cov, 10, 1), keep, rescale=True)
    assert np.isfinite(w_new).all() and np.isfinite(b_new).all()


def test_reconstruction_error_is_mse_of_outputs(regression: dict) -> None:
    r = regression
    keep = KEEPS[0]
    w_new, b_new = r["w"][:, keep] * 1.5, r["b"] + 1
    want = np.mean((r["x"] @ r["w"].T + r["b"] - r["x"][:, keep] @ w_new.T - b_new) ** 2)
    assert reconstruction_error(r["w"], r["b"], r["x"], keep, w_new, b_new) == pytest.approx(want, rel=1e-12)


# ---------------------------------------------------------------- the acceptance criterion, on every zoo consumer


def heldout_patches(model: nn.Module, names: list[str], x: torch.Tensor) -> dict[str, np.ndarray]:
    modules = dict(model.named_modules())
    out: dict[str, np.ndarray] = {}
    for name, inputs in captured_inputs(model, names, [x]).items():
        t = torch.from_numpy(np.concatenate(inputs))
        out[name] = unfold_input(modules[name], t, max_positions=10 ** 9).double().numpy()
    return out


@pytest.mark.parametrize("criterion", ["cap", "random"])
@pytest.mark.parametrize("entry", [pytest.param(e, id=n) for n, e in ZOO.items()])
def test_compensate_layer_beats_plain_slicing_on_heldout_data_for_every_consumer(entry: ZooEntry,
                                                                                  criterion: str) -> None:
    """Acceptance: compensation lowers every consumer's reconstruction error versus plain slicing of the same
    channels, measured on held-out samples that never fed the statistics (50% of every group removed)."""
    model = entry.build()
    graph = trace(model, entry.example_input())
    consumers = graph.consumer_modules()
    stats = collect_statistics(model, consumers, [entry.example_input(64, seed=1)])
    rankings = {g.name: rank(criterion, model, g, stats, seed=3) for g in graph.groups}
    plan = plan_from_rankings(graph, rankings, uniform_widths(graph, 0.5))
    heldout = heldout_patches(model, consumers, entry.example_input(64, seed=2))
    modules = dict(model.named_modules())
    bn_follows = {c.module: c.bn_follows for g in graph.groups for c in g.consumers}
    removed = removed_coords(graph, plan)
    assert set(removed) == set(consumers)
    for name in consumers:
        w = consumer_weight(modules[name])
        b = modules[name].bias.detach().double().numpy() if modules[name].bias is not None else None
        keep = np.setdiff1d(np.arange(w.shape[1]), sorted(removed[name]))
        assert 0 < keep.size < w.shape[1]
        w_new, b_new = compensate_layer(w, b, stats[name], keep, rescale=bn_follows[name])
        plain_b = np.zeros(w.shape[0]) if b is None else b
        err = reconstruction_error(w, b, heldout[name], keep, w_new, b_new)
        plain = reconstruction_error(w, b, heldout[name], keep, w[:, keep], plain_b)
        # strictly better, unless slicing is already exact (a consumer whose removed inputs carry nothing)
        assert err < plain or (plain == 0 and err < 1e-12), (name, err, plain)


class MLP(nn.Module):
    """A Linear producing 64 weakly correlated features, read by a Linear consumer."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(x))


@pytest.mark.parametrize("samples", [16, 48])
def test_compensate_layer_beats_plain_slicing_on_heldout_data_when_statistics_are_rank_deficient(
        samples: int) -> None:
    torch.manual_seed(0)
    model = MLP().eval()
    assert min_patches_needed(64) <= samples < 64
    stats = collect_statistics(model, ["fc2"], [torch.randn(samples, 64)])["fc2"]  # accepted, with a warning
    assert 0 < stats.shrinkage < 1
    heldout = heldout_patches(model, ["fc2"], torch.randn(2000, 64))["fc2"]
    w, b = consumer_weight(model.fc2), model.fc2.bias.detach().double().numpy()
    for seed in range(3):
        keep = np.sort(np.random.default_rng(seed).permutation(64)[:32])
        w_new, b_new = compensate_layer(w, b, stats, keep)
        err = reconstruction_error(w, b, heldout, keep, w_new, b_new)
        assert err < reconstruction_error(w, b, heldout, keep, w[:, keep], b), seed


def test_shrinkage_keeps_variances_and_vanishes_with_many_samples() -> None:
    from edgeprune.compensation.statistics import shrink_towards_diagonal

    rng = np.random.default_rng(0)
    a = rng.standard_normal((16, 16))
    pop = a @ a.T / 16 + np.eye(16)  # correlated population
    alphas = []
    for n in (8, 64, 4096):
        x = rng.multivariate_normal(np.zeros(16), pop, size=n)
        mu, cov = population_stats(x)
        s = shrink_towards_diagonal(LayerStats(mu, cov, n, 1))
        np.testing.assert_array_equal(np.diag(s.cov), np.diag(cov))
        np.testing.assert_allclose(s.cov - np.diag(np.diag(s.cov)), (1 - s.shrinkage) * (cov - np.diag(np.diag(cov))))
        alphas.append(s.shrinkage)
        if n == 8:  # rank-deficient sample covariance: shrunk, it is positive definite again
            assert np.linalg.eigvalsh(cov).min() < 1e-9 < np.linalg.eigvalsh(s.cov).min()
    assert alphas[0] >= alphas[1] > alphas[2], alphas
    assert alphas[2] < 0.05, alphas


def test_cholesky_solve_projects_an_indefinite_covariance_instead_of_failing() -> None:
    """Statistics that cancellation made indefinite beyond any ridge (a random-weight detector's head did): the solve
    projects onto the PSD matrices and returns the ridge solution of the projection, finite."""
    from edgeprune.compensation.solve import _cholesky_solve

    rng = np.random.default_rng(0)
    v = np.linalg.qr(rng.normal(size=(6, 6)))[0]
    a = v @ np.diag([5.0, 2.0, 1.0, 0.5, -3.0, -4.0]) @ v.T  # negative beyond ridge 1 x scale 1
    b, prior = rng.normal(size=(6, 2)), rng.normal(size=(6, 2))
    x = _cholesky_solve(a, b, 1e-6, 1.0, prior)
    psd = v @ np.diag([5.0, 2.0, 1.0, 0.5, 0.0, 0.0]) @ v.T
    np.testing.assert_allclose((psd + np.eye(6)) @ x, b + prior, atol=1e-10)
