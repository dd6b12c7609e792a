"""Latency measurement of an ONNX model on a target, through the target's runtime, with a cache.

    from edgeprune.runtimes import measure
    from edgeprune.inputs.targets import load_target
    stats = measure("model.onnx", load_target("cpu"))      # LatencyStats, in ms

One obvious place to add a backend: `RUNTIMES` maps a target's `runtime` to the module that implements it. Every
module satisfies the `Runtime` protocol (`runtimes/base.py`): `version(target)` (None when not installed),
`unavailable_reason(target)` (None when usable) and `measure(onnx_path, target, repeats=None, progress=None,
calibration=None) -> LatencyStats`. Modules load lazily, so `import edgeprune` never imports onnxruntime or tensorrt.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import cast

from edgeprune.common.progress import Tick
from edgeprune.errors import DeviceUnreachable, EdgePruneError
from edgeprune.inputs.targets import Target
from edgeprune.runtimes.base import Calibration, Runtime, calibration_digest
from edgeprune.runtimes.cache import MeasurementCache, cache_key, file_sha256
from edgeprune.runtimes.stats import LatencyStats

RUNTIMES: dict[str, str] = {
    "onnxruntime": "edgeprune.runtimes.onnxruntime",
    "tensorrt": "edgeprune.runtimes.tensorrt",
    "trtexec": "edgeprune.runtimes.trtexec",
    "remote": "edgeprune.runtimes.remote",
}

__all__ = ["RUNTIMES", "Calibration", "LatencyStats", "MeasurementCache", "Tick", "Runtime", "measure",
           "runtime_for", "runtime_module"]


def local_arch() -> str:
    import platform

    machine = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)


def runtime_module(name: str) -> Runtime:
    if name not in RUNTIMES:
        raise EdgePruneError(f"unknown runtime {name!r}; available: {', '.join(RUNTIMES)}")
    return cast(Runtime, importlib.import_module(RUNTIMES[name]))


def local_unavailable_reason(target: Target) -> str | None:
    """Why `target` cannot be measured on this machine with its own runtime (None when it can)."""
    reason = runtime_module(target.runtime).unavailable_reason(target)
    here = local_arch()
    if reason is None and target.arch not in ("any", here):
        reason = f"it is an {target.arch} device and this machine is {here}"
    return reason


def runtime_for(target: Target) -> Runtime:
    """The module that measures on `target`: its own runtime when present here, else its [remote], else an error."""
    if target.remote is not None:
        return runtime_module("remote")
    mod = runtime_module(target.runtime)
    reason = local_unavailable_reason(target)
    if reason is not None:
        raise DeviceUnreachable(
            f"target {target.name} needs {target.runtime}, which cannot run here ({reason}); measure on the device "
            f"(install edgeprune there and run `edgeprune profile` or `edgeprune agent`), add a [remote] table with "
            f"agent = \"http://DEVICE:8765\" or ssh = \"user@DEVICE\" to a copy of the target file, or search with --lut"
        )
    return mod


def measure(
    onnx_path: str | Path,
    target: Target,
    cache: MeasurementCache | None = None,
    repeats: int | None = None,
    progress: Tick | None = None,
    calibration: Calibration | None = None,
) -> LatencyStats:
    """Latency of `onnx_path` on `target`; served from `cache` when this model was measured there before.

    Args:
        cache: None disables the cache (a fresh measurement every time).
        repeats: fresh sessions to time; default the target's `measure.repeats`.
        calibration: int8 calibration inputs, for example the recipe's calibration samples (`CalibrationData.calib_x`,
            N x C x H x W); each backend says what it does with them (`runtimes/base.py`). For an int8 target they are
            part of the cache key.
    """
    from edgeprune.export.onnx import check_onnx

    onnx_path = Path(onnx_path)
    check_onnx(onnx_path)
    mod = runtime_for(target)
    key = None
    if cache is not None:
        rt_name = "remote" if target.remote is not None else target.runtime
        version = mod.version(target) or "unknown"
        r = repeats or target.measure.repeats
        profile = f"{target.fingerprint()}:r{r}"
        if calibration is not None and target.precision == "int8":
            profile += f":c{calibration_digest(calibration)}"
        key = cache_key(file_sha256(onnx_path), profile, rt_name, version)
        hit = cache.get(key)
        if hit is not None:
            return hit
    stats = mod.measure(onnx_path, target, repeats=repeats, progress=progress, calibration=calibration)
    if cache is not None and key is not None:
        cache.put(key, stats)
    return stats
