"""`edgeprune export --int8`: a model exported, quantised on the recipe's calibration part and judged against torch on
its held-out part, in ONNX Runtime; the INT8 file lands only when all of it succeeded.

    result = export_quantized(loaded, "model.int8.onnx", target.quantization, data)   # what `export --json` prints
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from pathlib import Path
from typing import Any

from edgeprune.common.atomic import atomic_path, write_error
from edgeprune.export.onnx import DEFAULT_OPSET, export
from edgeprune.export.quantize import OnnxModule, output_template, quantize_onnx
from edgeprune.inputs.data import CalibrationData
from edgeprune.inputs.models import LoadedModel
from edgeprune.inputs.targets import QuantizeConfig
from edgeprune.quality.fidelity import fidelity


def export_quantized(loaded: LoadedModel, out: str | Path, config: QuantizeConfig, data: CalibrationData,
                     exporter: str = "dynamo", opset: int = DEFAULT_OPSET, simplify: bool = True) -> dict[str, Any]:
    """`edgeprune export --int8`: `loaded` exported (parity against torch checked on the float file), quantised on
    `data`'s calibration part, and its top-1 agreement, output error and accuracy against the torch model taken on
    the held-out part, in ONNX Runtime; `out` is written only when all of it succeeded."""
    with tempfile.TemporaryDirectory(prefix="edgeprune-export-") as tmp:
        float_path = Path(tmp) / "model.onnx"
        exp = export(loaded.module, loaded.example_input, float_path, simplify=simplify, exporter=exporter,
                     opset=opset)
        quantized = quantize_onnx(float_path, Path(tmp) / "model.int8.onnx", data.calib_x, config)
        qmodel = OnnxModule(quantized, template=output_template(loaded.module, loaded.example_input))
        fid = fidelity(loaded.module, qmodel, data)
        try:
            with atomic_path(out) as dst:
                shutil.copyfile(quantized, dst)
        except OSError as e:
            raise write_error(Path(out), e) from None
    return {**exp.to_dict(), "path": str(out), "int8": {
        "settings": dataclasses.asdict(config), "calibration": data.recipe.name or data.recipe.kind,
        "calibration_samples": min(config.samples, len(data.calib_x)), "fidelity": fid.to_dict()}}
