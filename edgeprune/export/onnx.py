"""ONNX model from nn.Module: export (checked), onnxsim simplification, and parity of ONNX Runtime against torch.

    from edgeprune.export.onnx import export
    result = export(model, example_input, "model.onnx")          # simplified, checked, parity measured
    print(result.parity.rel_error)

Files are written to a temporary name in the destination folder and renamed, so an interrupted run never leaves a
half-written model behind.
"""

from __future__ import annotations

import contextlib
import io
import logging
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgeprune.common.atomic import atomic_path, write_error
from edgeprune.errors import EdgePruneError, first_line

if TYPE_CHECKING:
    import onnx
    import torch

log = logging.getLogger(__name__)

EXPORTERS = ("dynamo", "torchscript")
DEFAULT_OPSET = 18


@dataclass(frozen=True)
class Parity:
    """Largest difference between torch and ONNX Runtime outputs on one input; with several outputs, the worst
    output's relative error (each against its own scale), and every output's in `per_output`."""

    max_abs: float
    scale: float  # largest |output| of torch: the yardstick for the relative error
    rel_error: float  # max_abs / scale; several outputs: the largest of their own
    per_output: dict[str, float] = field(default_factory=dict)  # several outputs: name -> relative error

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass(frozen=True)
class ExportResult:
    path: str
    exporter: str
    opset: int
    simplified: bool
    export_s: float
    simplify_s: float
    parity: Parity | None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["parity"] = self.parity.to_dict() if self.parity else None
        return d


def _os_error(e: BaseException) -> OSError | None:
    """The OSError (full disk, file size limit, permissions) behind an exporter's exception, if any."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def check_onnx(path: str | Path) -> onnx.ModelProto:
    """Load and check an ONNX file; any problem is an `EdgePruneError` naming the file and what is wrong with it."""
    import onnx
    from google.protobuf.message import DecodeError

    path = Path(path)
    if path.is_dir():
        raise EdgePruneError(f"ONNX file {path} is a folder; give the .onnx file")
    if not path.is_file():
        raise EdgePruneError(f"ONNX file {path} does not exist")
    try:
        model = onnx.load(str(path))
    except onnx.checker.ValidationError as e:  # external data that points outside the model's folder: not read
        raise EdgePruneError(f"{path} refers to external weight data that edgeprune does not read "
                             f"({first_line(e, 160)}); external data must lie in files beside the model: "
                             f"save it as one file with onnx.save(model, PATH, save_as_external_data=False)") from None
    except (DecodeError, ValueError, RuntimeError, OSError) as e:
        raise EdgePruneError(
            f"{path} is not a readable ONNX model ({type(e).__name__}: {str(e)[:120] or 'parse error'}); "
            f"is the file truncated? re-export it with `edgeprune export`"
        ) from None
    if len(model.graph.node) == 0 or len(model.graph.input) == 0:
        raise EdgePruneError(f"{path} is not an ONNX model: it parsed to an empty graph (no nodes or inputs)")
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as e:
        raise EdgePruneError(f"{path} fails the ONNX checker: {first_line(e)}") from None
    return model


def onnx_output_names(names: list[str]) -> list[str]:
    """Every output named as parity reports it, except that a name of digits alone (the first output of a model that
    returns a tuple: "0") becomes "output_0": TorchScript reserves such names for its own values and refuses them
    ("Invalid name: '0'": yolov8n-seg, which returns (detections, mask prototypes), exited 2)."""
    return [f"output_{n}" if n.isdigit() else n for n in names]


def export_onnx(
    model: torch.nn.Module,
    example_input: torch.Tensor,
    path: str | Path,
    exporter: str = "dynamo",
    opset: int = DEFAULT_OPSET,
) -> Path:
    """Export `model` (in eval mode) to a single ONNX file at `path` and run the ONNX checker on it."""
    import torch

    if exporter not in EXPORTERS:
        raise EdgePruneError(f"unknown exporter {exporter!r}; choose one of: {', '.join(EXPORTERS)}")
    from edgeprune.inputs.outputs import flatten_outputs

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model.eval()
    with torch.no_grad():
        names = onnx_output_names([n for n, _ in flatten_outputs(model(example_input))])
    try:
        # The dynamo exporter prints its progress to stdout; keep stdout clean for --json.
        with atomic_path(path) as tmp, torch.no_grad(), warnings.catch_warnings(), \
                contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            if exporter == "dynamo":
                torch.onnx.export(model, (example_input,), str(tmp), dynamo=True, opset_version=opset,
                                  external_data=False, input_names=["input"], output_names=names, verbose=False)
            else:
                torch.onnx.export(model, (example_input,), str(tmp), dynamo=False, opset_version=opset,
                                  input_names=["input"], output_names=names, do_constant_folding=True)
            check_onnx(tmp)
    except EdgePruneError:
        raise
    except Exception as e:
        if (oserr := _os_error(e)) is not None:
            raise write_error(path, oserr) from None
        first = first_line(e, 300)
        raise EdgePruneError(
            f"the {exporter} exporter cannot export {type(model).__name__}: {first}; "
            f"try --exporter {'torchscript' if exporter == 'dynamo' else 'dynamo'}"
        ) from None
    return path


def simplify_onnx(src: str | Path, dst: str | Path | None = None) -> Path:
    """Simplify with onnxsim (constant folding, shape inference, dead-node removal), checked numerically by onnxsim."""
    import onnx
    import onnxsim

    src = Path(src)
    dst = Path(dst) if dst is not None else src
    model = onnx.load(str(src))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            simplified, ok = onnxsim.simplify(model)
    except Exception as e:
        raise EdgePruneError(f"onnxsim cannot simplify {src}: {first_line(e, 300)}") from None
    if not ok:
        raise EdgePruneError(f"onnxsim's check failed for {src}: the simplified model's outputs differ; use --no-simplify")
    try:
        with atomic_path(dst) as tmp:
            onnx.save(simplified, str(tmp))
    except OSError as e:
        raise write_error(dst, e) from None
    return dst


def parity(model: torch.nn.Module, example_input: torch.Tensor, onnx_path: str | Path) -> Parity:
    """Compare ONNX Runtime (1 thread, all optimisations) with torch on `example_input`, output by output."""
    import numpy as np
    import onnxruntime as ort
    import torch

    from edgeprune.inputs.outputs import flatten_outputs

    model.eval()
    with torch.no_grad():
        refs = [(n, t.detach().cpu().numpy()) for n, t in flatten_outputs(model(example_input))]
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
    outs = sess.run(None, {sess.get_inputs()[0].name: example_input.detach().cpu().numpy()})
    if len(outs) != len(refs):
        raise EdgePruneError(f"{onnx_path} has {len(outs)} outputs where the torch model returns {len(refs)}")
    diffs = [float(np.abs(a.astype(np.float64) - b).max()) if a.size else 0.0 for a, (_, b) in zip(outs, refs)]
    scales = [float(np.abs(b).max()) if b.size else 0.0 for _, b in refs]
    per = {n: d / (s or 1.0) for (n, _), d, s in zip(refs, diffs, scales)}
    worst = max(range(len(refs)), key=lambda i: per[refs[i][0]])
    return Parity(max_abs=max(diffs), scale=max(scales) or 1.0, rel_error=per[refs[worst][0]],
                  per_output=per if len(refs) > 1 else {})


def export(
    model: torch.nn.Module,
    example_input: torch.Tensor,
    path: str | Path,
    simplify: bool = True,
    exporter: str = "dynamo",
    opset: int = DEFAULT_OPSET,
    check_parity: bool = True,
) -> ExportResult:
    """Export, simplify and check parity: the ONNX file at `path` is the one that will be measured."""
    t0 = time.perf_counter()
    export_onnx(model, example_input, path, exporter=exporter, opset=opset)
    t1 = time.perf_counter()
    if simplify:
        simplify_onnx(path)
    t2 = time.perf_counter()
    par = parity(model, example_input, path) if check_parity else None
    log.info("exported %s with %s in %.2fs, simplified in %.2fs", path, exporter, t1 - t0, t2 - t1)
    return ExportResult(path=str(path), exporter=exporter, opset=opset, simplified=simplify,
                        export_s=t1 - t0, simplify_s=t2 - t1, parity=par)
