"""replay.Replay: resuming at the first changed layer computes what a whole forward pass computes, and the fidelity
proxy built on it gives the same errors as whole passes over a sequence of candidates."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch
from torch import nn

from edgeprune.quality.replay import Replay


class InvertedResidual(nn.Module):
    """Expansion, depthwise, projection and a residual add, with in-place activations (as timm's blocks)."""

    def __init__(self, c: int, e: int) -> None:
        super().__init__()
        self.pw = nn.Sequential(nn.Conv2d(c, e, 1, bias=False), nn.BatchNorm2d(e), nn.ReLU6(inplace=True))
        self.dw = nn.Sequential(nn.Conv2d(e, e, 3, padding=1, groups=e, bias=False), nn.BatchNorm2d(e),
                                nn.ReLU6(inplace=True))
        self.pwl = nn.Sequential(nn.Conv2d(e, c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pwl(self.dw(self.pw(x))) + x


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(inplace=True))
        self.blocks = nn.Sequential(InvertedResidual(16, 48), InvertedResidual(16, 64), InvertedResidual(16, 32))
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


def randomised(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    net = Net().eval()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return net


@pytest.mark.parametrize("budget", [10**9, 0], ids=["checkpoints", "no-room"])
def test_resuming_at_the_first_changed_layer_gives_the_whole_pass(budget: int) -> None:
    net = randomised()
    x = torch.randn(6, 3, 12, 12)
    convs = [n for n, m in net.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    replay = Replay(net, x, convs, budget_bytes=budget)
    assert (len(replay.chosen) > 3) == (budget > 0)
    torch.testing.assert_close(replay.run(set()), net(x), rtol=0, atol=0)
    modules = dict(net.named_modules())
    rng = random.Random(0)
    for _ in range(12):  # change one layer at a time, anywhere, as the inner level does
        name = rng.choice(convs)
        with torch.no_grad():
            modules[name].weight.mul_(rng.uniform(0.5, 1.5))
        torch.testing.assert_close(replay.run({name}), net(x), rtol=1e-6, atol=1e-6)
    # a layer changed back and another changed at once: the earlier of the two decides where it resumes
    with torch.no_grad():
        modules[convs[1]].weight.mul_(2.0)
        modules[convs[-2]].weight.mul_(0.5)
    torch.testing.assert_close(replay.run({convs[-2], convs[1]}), net(x), rtol=1e-6, atol=1e-6)
    # resuming must not have changed the saved activations (in-place ReLU6 downstream of every checkpoint)
    torch.testing.assert_close(replay.run({convs[-1]}), net(x), rtol=1e-6, atol=1e-6)


def test_a_model_torch_fx_cannot_trace_runs_whole() -> None:
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c = nn.Conv2d(3, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.c(x) if float(x.sum()) > -1e9 else -self.c(x)  # data-dependent: symbolic tracing fails

    net = Branchy().eval()
    x = torch.randn(2, 3, 5, 5)
    replay = Replay(net, x, ["c"])
    assert replay.nodes is None
    with torch.no_grad():
        net.c.weight.mul_(3.0)
    torch.testing.assert_close(replay.run({"c"}), net(x))


def test_the_masked_proxy_on_replay_gives_the_errors_of_whole_passes() -> None:
    """A sequence of candidates varying one group at a time in forward order (the latency allocation's pattern), and
    jumps back: every error equals that of a fresh proxy's whole pass."""
    from edgeprune.quality.fidelity import MaskedProxy
    from edgeprune.dependency.graph import trace
    from edgeprune.scoring.registry import rank
    from edgeprune.plan import plan_from_rankings
    from edgeprune.compensation.statistics import collect_statistics

    net = randomised(1)
    x, calib = torch.randn(8, 3, 12, 12), torch.randn(64, 3, 12, 12)
    graph = trace(net, x[:1])
    stats = collect_statistics(net, graph.consumer_modules(), [calib])
    rankings = {g.name: rank("cap", net, g, stats) for g in graph.groups}
    proxy = MaskedProxy(net, graph, stats, x)
    assert proxy.replay.nodes is not None and proxy.replay.chosen
    widths = {g.name: g.channels for g in graph.groups}
    seen = []
    for g in graph.groups:
        for w in sorted({g.channels, max(2, g.channels // 2), max(2, g.channels // 4)}):
            widths = {**widths, g.name: w}
            plan = plan_from_rankings(graph, rankings, dict(widths))
            seen.append((plan, proxy.error(plan)))
    assert max(e for _, e in seen) > 1e-3  # the candidates change the output: the comparison can fail
    for plan, err in seen[::-1][:6] + seen[:3]:
        assert proxy.error(plan) == pytest.approx(err, rel=1e-9)
        fresh = MaskedProxy(net, graph, stats, x)
        assert fresh.error(dataclasses.replace(plan)) == pytest.approx(err, rel=1e-6, abs=1e-9)
