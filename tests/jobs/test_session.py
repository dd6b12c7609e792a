"""session.prepare: the fidelity proxy's samples are held back from the statistics on real data (issue 28)."""

from __future__ import annotations

from edgeprune.config import PruneConfig
from edgeprune.jobs.session import PROXY_VALUES, prepare, proxy_samples


def test_the_proxys_samples_are_not_in_the_statistics_on_real_data() -> None:
    """The example's head is a Linear consumer: one patch per image, so its statistics count images."""
    prep = prepare(PruneConfig(calibration="digits"))
    n = proxy_samples(prep.data)
    calib = len(prep.data.calib_x)
    assert 8 <= n <= calib // 4 and n == min(max(8, min(256, PROXY_VALUES // 1024)), calib // 4)
    head = [s for name, s in prep.stats.items() if name == "fc"]
    assert head and head[0].count == calib - n  # the proxy grades the repair on samples it was not fitted to


def test_random_calibration_keeps_every_sample_in_the_statistics_of_an_explicit_cap() -> None:
    prep = prepare(PruneConfig(calibration="random", model="example", criterion="cap"))
    head = [s for name, s in prep.stats.items() if name == "fc"]
    assert head and head[0].count == len(prep.data.calib_x)
    assert prep.config.criterion == "cap" and prep.config.compensation


def test_the_default_criterion_is_datafree_only_for_random_weights_on_random_data() -> None:
    """criterion auto: a zoo model with random weights on random calibration data holds nothing to keep, so no
    statistics are collected and no consumer is repaired (the plan says so); the rankings are the weights'
    (`scoring.base.rank_datafree`), with loss curves for the step allocation. A trained model (the example) keeps
    CaP with its repair, on random data as on real data: its repair fits the network's own responses."""
    import numpy as np
    import torch

    prep = prepare(PruneConfig(calibration="random", model="torchvision:mobilenet_v3_small",
                               input_shape=(1, 3, 32, 32)))
    assert prep.loaded.random_weights
    assert prep.config.criterion == "datafree" and not prep.config.compensation
    assert prep.stats == {} and "statistics" not in prep.timings_s
    plan = prep.plan({g.name: g.channels // 2 for g in prep.graph.groups})
    assert plan.criterion == "datafree" and not plan.compensation
    modules = dict(prep.loaded.module.named_modules())
    for g in prep.graph.groups:  # the first-ranked channel is the producer filter of largest norm
        w = modules[g.producers[0]].weight.detach()
        norms = (w.reshape(w.shape[0], -1) ** 2).sum(1)[: g.channels]
        assert prep.rankings[g.name].order[0] == int(torch.argmax(norms)) or len(g.producers) > 1
        assert np.all(np.diff(prep.rankings[g.name].loss) <= 0)
    for trained in (prepare(PruneConfig(calibration="random", model="example")),
                    prepare(PruneConfig(calibration="digits"))):
        assert not trained.loaded.random_weights
        assert trained.config.criterion == "cap" and trained.config.compensation and trained.stats
