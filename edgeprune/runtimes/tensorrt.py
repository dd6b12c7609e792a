"""TensorRT Python API backend (issue 6 builds the engine and timing; this probe says whether it can run here)."""

from __future__ import annotations

from edgeprune.errors import DeviceUnreachable


def version() -> str | None:
    try:
        import tensorrt
    except ImportError:
        return None
    return tensorrt.__version__


def unavailable_reason() -> str | None:
    return None if version() is not None else "the tensorrt Python package is not installed"


def measure(onnx_path, target, repeats=None, progress=None):
    raise DeviceUnreachable("the TensorRT backend is not built yet; measure on the device with trtexec")
