"""What every runtime backend provides: the `Runtime` protocol that the modules in `RUNTIMES` implement, and the
calibration inputs a measurement may carry.

    from edgeprune.runtimes import runtime_module
    rt = runtime_module("onnxruntime")                # a module that satisfies Runtime
    if rt.unavailable_reason(target) is None:
        stats = rt.measure("model.onnx", target, calibration=data.calib_x)

Calibration inputs matter only to int8 targets whose model carries no Q/DQ nodes (TensorRT's implicit quantization
calibrates the activation ranges on them); every backend takes them, and each says in its docstring what it does with
them. They are one array of samples stacked along the first axis (N x C x H x W, sliced into batches of the model's
input shape), or a sequence of such arrays, or of dicts from input name to array for models with several inputs.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from edgeprune.common.progress import Tick
from edgeprune.inputs.targets import Target
from edgeprune.runtimes.stats import LatencyStats

Batch = np.ndarray | Mapping[str, np.ndarray]
Calibration = np.ndarray | Sequence[Batch]


class Runtime(Protocol):
    """A backend module (`edgeprune.runtimes.onnxruntime`, `tensorrt`, `trtexec`, `remote`): module-level functions
    with these signatures; a backend may take further keywords of its own after them."""

    def version(self, target: Target | None = None) -> str | None:
        """The runtime's version ("1.18.1"); None when it is not installed here."""
        ...

    def unavailable_reason(self, target: Target | None = None) -> str | None:
        """Why `target` cannot be measured with this runtime here, in words; None when it can."""
        ...

    def measure(self, onnx_path: str | Path, target: Target, repeats: int | None = None,
                progress: Tick | None = None, calibration: Calibration | None = None) -> LatencyStats:
        """Latency of `onnx_path` on `target`, in ms.

        Args:
            repeats: fresh sessions (contexts, processes) to time; default the target's `measure.repeats`.
            progress: called with (done, total) timed runs.
            calibration: int8 calibration inputs (see the module docstring); None: the backend's placeholder.
        """
        ...


def calibration_list(calibration: Calibration | None) -> list[Batch] | None:
    """The calibration inputs as a list of batches: one stacked array becomes a list of that one array."""
    if calibration is None:
        return None
    if isinstance(calibration, np.ndarray):
        return [calibration]
    return list(calibration)


def calibration_digest(calibration: Calibration | None) -> str:
    """Digest of the calibration inputs, so engines (and figures) calibrated on other data are not reused."""
    batches = calibration_list(calibration)
    if batches is None:
        return "random"
    h = hashlib.sha256()
    for b in batches:
        items = sorted(b.items()) if isinstance(b, Mapping) else [("", b)]
        for name, arr in items:
            arr = np.ascontiguousarray(arr)
            h.update(f"{name}|{arr.dtype}|{arr.shape}|".encode())
            h.update(arr.tobytes())
    return h.hexdigest()[:16]
