"""TensorRT engine cache keys (building an engine needs TensorRT and a GPU: see test_tensorrt.py)."""

from __future__ import annotations

from edgeprune.runtimes import trtengine


def test_engine_key_changes_with_model_precision_version_gpu_and_calibration():
    base = ("a" * 64, "fp16", "10.3.0", "Orin", "")
    keys = {trtengine.engine_key(*base)}
    for i, other in enumerate(("b" * 64, "int8", "10.4.0", "NVIDIA H100", "calib")):
        changed = list(base)
        changed[i] = other
        keys.add(trtengine.engine_key(*changed))
    assert len(keys) == 6
    assert trtengine.engine_key(*base) == trtengine.engine_key(*base)
