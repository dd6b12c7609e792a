"""The drift-aware sequential repair against the independent one, on the test zoo with real forward passes."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from edgeprune.compensation.statistics import collect_statistics
from edgeprune.dependency.graph import trace
from edgeprune.plan import plan_from_rankings, uniform_widths
from edgeprune.scoring.registry import rank
from edgeprune.surgery.apply import prune, removed_coords
from edgeprune.surgery.repair import sequential_repair
from tests.models import ZOO

MODELS = ["chain", "residual", "concat", "se", "flatten_head"]


def setup(name: str, ratio: float = 0.5):  # noqa: ANN201
    entry = ZOO[name]
    model = entry.build()
    x = entry.example_input()
    graph = trace(model, x)
    calib = entry.example_input(256, seed=1)
    batches = list(calib.split(32))
    stats = collect_statistics(model, graph.consumer_modules(), batches)
    rankings = {g.name: rank("cap", model, g, stats) for g in graph.groups}
    plan = plan_from_rankings(graph, rankings, uniform_widths(graph, ratio, 2), channel_multiple=2)
    return model, x, graph, stats, plan, batches, entry.example_input(128, seed=2)


def rel_error(model: torch.nn.Module, pruned: torch.nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        y0, y = model(x).double(), pruned(x).double()
    return float(torch.linalg.norm(y - y0) / torch.linalg.norm(y0))


@pytest.mark.parametrize("name", MODELS)
def test_sequential_repair_lowers_heldout_error(name: str) -> None:
    """Fitted on the pruned network's own inputs, the repair corrects the drift upstream pruning causes: lower output
    error on held-out inputs than the independent repair, for every zoo model with a chain of consumers."""
    model, x, graph, stats, plan, batches, heldout = setup(name)
    independent = prune(model, x, plan, stats, graph=graph)
    sequential = prune(model, x, dataclasses.replace(plan, repair="sequential"), stats, graph=graph, batches=batches)
    e_ind, e_seq = rel_error(model, independent, heldout), rel_error(model, sequential, heldout)
    assert e_seq < e_ind, (name, e_seq, e_ind)


def test_sequential_repair_is_the_same_without_torch_fx(monkeypatch: pytest.MonkeyPatch) -> None:
    """Models torch.fx cannot trace take one truncated pass per consumer: the same repairs, computed more slowly."""
    import torch.fx

    model, x, graph, stats, plan, batches, _ = setup("residual")
    removed = removed_coords(graph, plan)
    by_fx = sequential_repair(model, graph, plan, batches, removed)

    def untraceable(*a, **k):  # noqa: ANN002, ANN003, ANN202
        raise torch.fx.proxy.TraceError("data-dependent control flow")

    monkeypatch.setattr(torch.fx, "symbolic_trace", untraceable)
    by_passes = sequential_repair(model, graph, plan, batches, removed)
    assert by_fx.keys() == by_passes.keys() and len(by_fx) == len(removed)
    for name, (keep, w, b) in by_fx.items():
        np.testing.assert_array_equal(keep, by_passes[name][0])
        np.testing.assert_allclose(w, by_passes[name][1], rtol=1e-6, atol=1e-8)
        np.testing.assert_allclose(b, by_passes[name][2], rtol=1e-6, atol=1e-8)


def test_sequential_fit_is_least_squares_on_the_paired_patches(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fit of a consumer downstream of a repaired one, without shrinkage, equals ordinary least squares of the
    original layer's outputs W x on the kept inputs x~_S the partly pruned network produces, patch by patch (the same
    seeded subsampling offsets in both networks)."""
    import edgeprune.surgery.repair as rp
    from edgeprune.compensation.statistics import layer_rng, unfold_input
    from edgeprune.dependency.graph import execution_order
    from edgeprune.scoring.base import consumer_weight
    from edgeprune.surgery.weights import set_weights

    monkeypatch.setattr(rp, "shrink_towards_diagonal", lambda st: st)
    model, x, graph, stats, plan, batches, _ = setup("chain")
    removed = removed_coords(graph, plan)
    order = sorted(removed, key=lambda n: execution_order(model, x)[n])
    repairs = rp.sequential_repair(model, graph, plan, batches, removed, ridge=1e-12)
    first, second = order[0], order[1]
    work = __import__("copy").deepcopy(model)
    set_weights(dict(work.named_modules())[first], *repairs[first])
    mods_o, mods_w = dict(model.named_modules()), dict(work.named_modules())
    xs, ts = [], []
    rng_o, rng_w = layer_rng(0, second), layer_rng(0, second)
    for b in batches:
        for net, mods, rng, out in ((model, mods_o, rng_o, xs), (work, mods_w, rng_w, ts)):
            h = mods[second].register_forward_pre_hook(
                lambda m, a, rng=rng, out=out: out.append(unfold_input(m, a[0], rng=rng).double().numpy()))
            with torch.no_grad():
                net(b)
            h.remove()
    x_all, t_all = np.concatenate(xs), np.concatenate(ts)
    w = consumer_weight(mods_o[second])
    keep, w_seq, b_seq = repairs[second]
    bias = np.zeros(w.shape[0]) if mods_o[second].bias is None else mods_o[second].bias.detach().double().numpy()
    design = np.hstack([t_all[:, keep], np.ones((len(t_all), 1))])
    coef = np.linalg.lstsq(design, x_all @ w.T + bias, rcond=None)[0]
    np.testing.assert_allclose(w_seq, coef[:-1].T, rtol=1e-4, atol=1e-4 * np.abs(coef).max())
    np.testing.assert_allclose(b_seq, coef[-1], rtol=1e-4, atol=1e-4 * np.abs(coef).max())


def test_sequential_repair_does_not_touch_the_model() -> None:
    model, x, graph, stats, plan, batches, _ = setup("concat")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sequential_repair(model, graph, plan, batches, removed_coords(graph, plan))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_sequential_repair_uses_the_images_that_fit_in_memory(monkeypatch: pytest.MonkeyPatch,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    """Every image's live activations are held at once: beyond half the available memory only the first images fit
    the repair, which says so (and still repairs every consumer)."""
    import torch.fx

    import edgeprune.inputs.data as data
    import edgeprune.surgery.repair as rp

    model, x, graph, stats, plan, batches, _ = setup("chain")
    per_image = 2 * rp._peak_live_bytes(torch.fx.symbolic_trace(model).graph, model, x)
    monkeypatch.setattr(data, "available_memory", lambda: int(per_image * 100 / rp.MEMORY_SHARE))
    kept = rp._within_memory(torch.fx.symbolic_trace(model).graph, model, batches)
    assert sum(len(b) for b in kept) == 100 and "first 100 of 256 calibration images" in caplog.text
    repairs = rp.sequential_repair(model, graph, plan, batches, removed_coords(graph, plan))
    assert set(repairs) == {n for n, r in removed_coords(graph, plan).items() if r}
