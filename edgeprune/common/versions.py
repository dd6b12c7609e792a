"""Versions of the packages a result depends on: every report and table row carries them."""

from __future__ import annotations


def versions(runtime: str | None = None) -> dict[str, str]:
    from importlib import metadata

    from edgeprune._version import __version__

    out = {"edgeprune": __version__}
    for dist in ("torch", "onnx", "onnxruntime", "onnxsim", "torch-pruning"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    if runtime in ("tensorrt", "trtexec"):
        try:
            out["tensorrt"] = metadata.version("tensorrt")
        except metadata.PackageNotFoundError:
            out["tensorrt"] = "not installed here (measured on the device)"
    return out
