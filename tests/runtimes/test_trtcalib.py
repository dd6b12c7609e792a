"""INT8 calibration data: the digest that keys engines and the feeder that slices arrays into calibration batches
(NumPy only: these run everywhere)."""

from __future__ import annotations

import numpy as np
import pytest

from edgeprune.errors import EdgePruneError
from edgeprune.runtimes import trtcalib


def test_calibration_digest_follows_the_data():
    rng = np.random.default_rng(0)
    a = [rng.standard_normal((1, 3, 8, 8)).astype(np.float32) for _ in range(2)]
    assert trtcalib.calibration_digest(a) == trtcalib.calibration_digest([x.copy() for x in a])
    b = [a[0], a[1] + np.float32(1e-3)]
    assert trtcalib.calibration_digest(a) != trtcalib.calibration_digest(b)
    assert trtcalib.calibration_digest(None) == "random"


def test_calibration_batches_splits_stacked_arrays_and_casts_to_input_dtype():
    shapes = {"input": ((1, 3, 4, 4), False)}
    dtypes = {"input": np.dtype(np.float32)}
    stacked = np.arange(4 * 48, dtype=np.float64).reshape(4, 3, 4, 4)
    batches = trtcalib.calibration_batches([stacked, {"input": np.ones((1, 3, 4, 4))}], shapes, dtypes)
    assert len(batches) == 5 and all(b["input"].dtype == np.float32 for b in batches)
    assert np.array_equal(np.concatenate([b["input"] for b in batches[:4]]), stacked.astype(np.float32))
    with pytest.raises(EdgePruneError, match=r"has shape \(3, 4, 4\); the engine is built for \(1, 3, 4, 4\)"):
        trtcalib.calibration_batches([np.zeros((3, 4, 4))], shapes, dtypes)
    random = trtcalib.calibration_batches(None, shapes, dtypes)
    assert len(random) == trtcalib.RANDOM_CALIBRATION_BATCHES and random[0]["input"].shape == (1, 3, 4, 4)
