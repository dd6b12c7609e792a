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


def test_random_calibration_keeps_every_sample_in_the_statistics() -> None:
    prep = prepare(PruneConfig(calibration="random", model="example"))
    head = [s for name, s in prep.stats.items() if name == "fc"]
    assert head and head[0].count == len(prep.data.calib_x)
