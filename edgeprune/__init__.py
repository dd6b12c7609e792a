"""edgeprune: prune a trained CNN to an ONNX model that meets a latency budget measured on the device.

    import edgeprune
    result = edgeprune.build(model, calibration=loader, device="cpu", latency="0.5x", evaluate=my_metric)
    stats = edgeprune.profile("model.onnx", "cpu")

The API (`build`, `prune`, `profile`, `lut`, `load_target`, `release`, `finetune`, `matrix`; see `edgeprune.api`)
loads on first use: importing the package is cheap on purpose, and torch, onnxsim and tensorrt load only in the stage
that needs them.
"""

from __future__ import annotations

from edgeprune._version import __version__

API = ("build", "prune", "profile", "lut", "load_target", "release", "finetune", "matrix")
__all__ = ["__version__", *API]


def __getattr__(name: str):  # PEP 562: the API without importing torch at `import edgeprune`
    if name in API:
        from edgeprune import api

        return getattr(api, name)
    raise AttributeError(f"module 'edgeprune' has no attribute {name!r}")
