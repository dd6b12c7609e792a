"""INT8 calibration: the feeder that slices calibration arrays into the engine's batches (NumPy only: runs
everywhere; the calibrator itself needs TensorRT, see test_tensorrt.py)."""

from __future__ import annotations

import numpy as np
import pytest

from edgeprune.errors import EdgePruneError
from edgeprune.runtimes import trtcalib


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


def test_calibration_batches_slices_the_recipes_samples_into_engine_batches():
    """The recipe's calibration samples arrive as one N x C x H x W array; the engine is built for batches of 1."""
    shapes = {"input": ((1, 3, 4, 4), False)}
    dtypes = {"input": np.dtype(np.float32)}
    calib_x = np.random.default_rng(0).standard_normal((5, 3, 4, 4)).astype(np.float32)
    batches = trtcalib.calibration_batches(calib_x, shapes, dtypes)
    assert len(batches) == 5 and all(b["input"].shape == (1, 3, 4, 4) for b in batches)
    assert np.array_equal(np.concatenate([b["input"] for b in batches]), calib_x)
    with pytest.raises(EdgePruneError, match="several batches may be stacked"):
        trtcalib.calibration_batches(calib_x[:, :2], shapes, dtypes)
    with pytest.raises(EdgePruneError, match="pass calibration batches as dicts"):
        trtcalib.calibration_batches(calib_x, {**shapes, "mask": ((1, 4), False)},
                                     {**dtypes, "mask": np.dtype(np.float32)})
