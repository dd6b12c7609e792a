"""The `itpruner` allocation (edgeprune/itpruner.py): nHSIC layer importance, widths by a linear program under the
latency model; and, shared with tests/search/test_evolution.py, builds of a small conv chain with a method on a
deterministic fake latency (compensation on and off, `--lut`, `prune --plan` replaying the release)."""

from __future__ import annotations

import io
import itertools
import json
from contextlib import redirect_stderr, redirect_stdout

import numpy as np
import onnx
import pytest
import torch

from edgeprune.cli.commands import main
from edgeprune.dependency.graph import trace
from edgeprune.search.allocate import allowed_widths, min_widths
from edgeprune.search.itpruner import feature_maps, itpruner_widths_fn, layer_importance, lp_widths, nhsic
from tests.models import ZOO
from tests.search.test_strength import toy_graph

TARGET = """name = "cpu-fake"
description = "cpu, its latency faked (tests)"
runtime = "onnxruntime"
precision = "fp32"
channel_multiple = 8
threads = 1
[measure]
warmup = 1
iterations = 2
repeats = 2
final_repeats = 2
"""


@pytest.mark.parametrize("kernel", ["linear", "gaussian"])
def test_nhsic_of_a_layer_with_itself_is_one_and_ignores_isotropic_scaling(kernel: str) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(80, 3, 5, 5, generator=g)
    y = torch.tanh(x.flatten(1) @ torch.randn(75, 4, generator=g) / 8) + 0.1 * torch.randn(80, 4, generator=g)
    assert nhsic(x, x, kernel) == pytest.approx(1.0, abs=1e-12)
    assert nhsic(7.5 * x, x, kernel) == pytest.approx(1.0, abs=1e-12)
    base = nhsic(x, y, kernel)
    assert 0.0 < base < 1.0
    assert nhsic(0.01 * x, 30 * y, kernel) == pytest.approx(base, rel=1e-6)  # float32 inputs
    assert nhsic(x, y, kernel) == pytest.approx(nhsic(y, x, kernel), rel=1e-12)  # symmetric
    noise = torch.randn(80, 4, generator=g)
    assert nhsic(x, noise, kernel) < base  # a dependent output shares more than independent noise


def test_importance_of_a_zoo_model_is_its_feature_maps_nhsic_with_the_output() -> None:
    entry = ZOO["residual"]
    model, x = entry.build(), entry.example_input(batch=24)
    graph = trace(model, x[:1])
    assert any(len(g.producers) > 1 for g in graph.groups)  # a residual group: its producers side by side
    maps, y = feature_maps(model, graph, x)
    imp = layer_importance(model, graph, x)
    assert set(imp) == {g.name for g in graph.groups}
    for g in graph.groups:
        assert 0.0 <= imp[g.name] <= 1.0 + 1e-12
        assert nhsic(maps[g.name], maps[g.name]) == pytest.approx(1.0, abs=1e-12)
        assert imp[g.name] == pytest.approx(nhsic(maps[g.name], y), rel=1e-12)


def chain_cost(widths: list[int], overhead: float = 0.1):
    """A conv chain's relative MACs (products of consecutive widths, the input 3 channels) plus an overhead: the
    quadratic constraint of the paper, which the LP only sees linearised."""
    names = [f"g{i}" for i in range(len(widths))]

    def raw(w: dict[str, int]) -> float:
        c = [3] + [w[n] for n in names]
        return sum(a * b for a, b in itertools.pairwise(c)) + overhead * sum(3 * x for x in widths)

    full = raw(dict(zip(names, widths)))
    return lambda w: raw(w) / full


def test_lp_widths_meet_the_latency_constraint_and_are_allowed_widths() -> None:
    widths = [32, 64, 48, 128]
    g = toy_graph(widths)
    cost = chain_cost(widths)
    imp = {"g0": 0.9, "g1": 0.3, "g2": 0.6, "g3": 0.5}
    lows = min_widths(g, 8)
    floor = cost(lows)
    for bound in np.linspace(floor + 1e-6, 0.999, 25):
        w = lp_widths(g, imp, cost, float(bound), 8)
        assert cost(w) <= bound + 1e-12
        for gr in g.groups:
            assert w[gr.name] in allowed_widths(gr.channels, 8, lows[gr.name])
            assert w[gr.name] % 8 == 0
        # nothing left to give: no single allowed step up still fits (the slack rounding left is spent)
        for gr in g.groups:
            opts = allowed_widths(gr.channels, 8, lows[gr.name])
            i = opts.index(w[gr.name])
            if i + 1 < len(opts):
                assert cost({**w, gr.name: opts[i + 1]}) > bound


def test_lp_keeps_the_more_important_group_when_costs_are_equal() -> None:
    g = toy_graph([64, 64])
    cost = lambda w: (w["g0"] + w["g1"]) / 128  # noqa: E731 - separable and equal
    for bound in (0.4, 0.6, 0.8):
        w = lp_widths(g, {"g0": 0.8, "g1": 0.2}, cost, bound, 8)
        assert w["g0"] >= w["g1"] and cost(w) <= bound
        w = lp_widths(g, {"g0": 0.2, "g1": 0.8}, cost, bound, 8)
        assert w["g1"] >= w["g0"]


def test_itpruner_strength_is_the_resource_bound() -> None:
    widths = [32, 64, 48]
    g = toy_graph(widths)
    cost = chain_cost(widths)
    fn = itpruner_widths_fn(g, {"g0": 0.5, "g1": 0.4, "g2": 0.7}, cost, 8)
    assert fn(0.0) == {"g0": 32, "g1": 64, "g2": 48} and fn(1.0) == min_widths(g, 8)
    floor = cost(min_widths(g, 8))
    for u in (0.1, 0.3, 0.5, 0.7, 0.9):
        assert cost(fn(u)) <= 1 - u * (1 - floor) + 1e-12


# ---------------------------------------------------------------- builds (shared with tests/search/test_evolution.py)


def fake_latency(path, target, cache=None, repeats=None, progress=None, calibration=None):  # noqa: ANN001, ANN201
    """A deterministic latency proportional to the weights in the ONNX file: these tests check what the methods do
    with a figure, not the figure."""
    from edgeprune.runtimes.stats import stats_from_repeats

    weights = sum(int(np.prod(t.dims)) for t in onnx.load(str(path)).graph.initializer)
    return stats_from_repeats([[weights * 1e-5]] * (repeats or 2), target=target.name, runtime=target.runtime,
                              runtime_version="fake", precision=target.precision, source="measured")


MODEL_PY = """
import torch
from torch import nn


def block(cin, cout, stride=1):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class Chain(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(block(3, 32), block(32, 48, 2), block(48, 64), block(64, 64, 2))
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


def chain():
    torch.manual_seed(0)
    return Chain().eval()
"""


@pytest.fixture(scope="module")
def method_env(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A four-conv chain at 16x16, a fake-latency target, a small random recipe, and a latency table of the chain
    made on the fake latency (`edgeprune lut`)."""
    import edgeprune.runtimes as rt

    root = tmp_path_factory.mktemp("methods")
    (root / "cpu-fake.toml").write_text(TARGET)
    (root / "chain.py").write_text(MODEL_PY)
    (root / "random.toml").write_text('kind = "random"\ncount = 96\nheldout = 16\nbatch_size = 32\n')
    model = ["--model", f"{root / 'chain.py'}:chain", "--input-shape", "1,3,16,16"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(rt, "measure", fake_latency)
        mp.setenv("EDGEPRUNE_CACHE_DIR", str(root / "cache"))
        code, _, err = run(["lut", *model, "--device", str(root / "cpu-fake.toml"), "--out", str(root / "lut.json")])
        assert code == 0, err
    return {"root": root, "target": root / "cpu-fake.toml", "model": model,
            "data": [*model, "--calibration", str(root / "random.toml")], "table": root / "lut.json"}


def run(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def build_and_replay(env: dict, monkeypatch: pytest.MonkeyPatch, name: str, *flags: str) -> dict:
    """Build the chain with `flags` at 0.6x of the fake latency, then `prune --plan` its plan.json: the replay's
    pruned weights must equal the release's exactly. Returns the build's report."""
    import edgeprune.runtimes as rt

    monkeypatch.setattr(rt, "measure", fake_latency)
    root = env["root"] / name
    code, out, err = run(["build", *env["data"], "--device", str(env["target"]),
                          "--latency", "0.6x", "--out", str(root / "build"), "--json", *flags])
    assert code == 0, err
    report = json.loads(out)
    assert report["met"] and report["final"]["latency_ms"]["median"] <= report["budget_ms"]
    assert any(w["after"] < w["before"] for w in report["widths"].values())
    code, _, err = run(["prune", *env["data"], "--plan", str(root / "build" / "plan.json"),
                        "--exporter", "torchscript", "--out", str(root / "replay"), "--json"])
    assert code == 0, err
    a = torch.load(root / "build" / "pruned.pt", map_location="cpu", weights_only=True)["state_dict"]
    b = torch.load(root / "replay" / "pruned.pt", map_location="cpu", weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    return report


@pytest.mark.parametrize("flags", [("--criterion", "cap"), ("--no-compensation",)], ids=["compensated", "sliced"])
def test_itpruner_build_meets_budget_and_prune_plan_replays_it(method_env: dict,
                                                               monkeypatch: pytest.MonkeyPatch,
                                                               flags: tuple[str, ...]) -> None:
    r = build_and_replay(method_env, monkeypatch, f"itpruner-{len(flags)}", "--allocation", "itpruner", *flags)
    assert r["search"]["allocation"] == "itpruner" and r["search"]["compensation"] == ("--no-compensation" not in flags)


def test_itpruner_build_on_a_latency_table(method_env: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    r = build_and_replay(method_env, monkeypatch, "itpruner-lut", "--allocation", "itpruner",
                         "--lut", str(method_env["table"]))
    assert r["lut"] == str(method_env["table"]) and r["search"]["allocation"] == "itpruner"
    assert {c["source"] for c in r["search"]["trace"]} >= {"lut"}
