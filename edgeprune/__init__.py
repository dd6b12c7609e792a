"""edgeprune: prune a trained CNN to an ONNX model that meets a latency budget measured on the device.

Importing the package is cheap on purpose: torch, onnxsim and tensorrt load only in the stage that needs them.

    from edgeprune.targets import load_target
    from edgeprune.runtimes import measure
    stats = measure("model.onnx", load_target("cpu"))
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["__version__"]
