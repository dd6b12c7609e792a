"""The baseline criteria of scoring/base.py: `datafree`'s order and loss curve are the producers' filter energy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from edgeprune.dependency.graph import trace
from edgeprune.scoring.base import rank_datafree, rank_l2


def test_datafree_ranks_by_filter_energy_and_its_loss_is_the_energy_left_out() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 4, 1)).eval()
    with torch.no_grad():
        model[0].weight.mul_(torch.linspace(0.1, 2.0, 16).view(16, 1, 1, 1))  # energies far apart
    graph = trace(model, torch.randn(1, 3, 8, 8))
    modules = dict(model.named_modules())
    group = graph.groups[0]
    r = rank_datafree(modules, group, {})
    assert r.order == rank_l2(modules, group, {}).order  # the same order as the L2 norm
    energy = (model[0].weight.detach().double().reshape(16, -1) ** 2).sum(1).numpy()
    assert r.order[0] == int(np.argmax(energy)) and r.order[-1] == int(np.argmin(energy))
    assert r.loss[0] == pytest.approx(1.0) and r.loss[-1] == pytest.approx(0.0, abs=1e-12)
    k = 5
    left_out = energy[list(r.order[k:])].sum() / energy.sum()
    assert r.loss[k] == pytest.approx(left_out, rel=1e-9)
    assert len(r.loss) == group.channels + 1 and np.all(np.diff(r.loss) <= 0)
