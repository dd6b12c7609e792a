"""INT8 ONNX model from float ONNX model: ONNX Runtime's static quantisation (Q/DQ format, per-channel int8 weights,
activation ranges calibrated on the recipe's calibration part), and an `nn.Module` that runs a quantised model in
ONNX Runtime, so that fidelity, accuracy and the user's `evaluate` see the model that ships.

    from edgeprune.export.quantize import OnnxModule, quantize_onnx
    quantize_onnx("model.onnx", "model.int8.onnx", data.calib_x, target.quantization)   # written atomically
    module = OnnxModule("model.int8.onnx", template=torch_model(example))                # forward() in ONNX Runtime

A quantised model carries its scales in QuantizeLinear/DequantizeLinear pairs: ONNX Runtime fuses them into integer
kernels, TensorRT builds int8 layers from them (explicit quantization), so one file serves every int8 target.
`onnxruntime.quantization` is imported only inside the functions that need it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from edgeprune.common.atomic import atomic_path
from edgeprune.errors import EdgePruneError, first_line
from edgeprune.inputs.outputs import flatten_outputs, unflatten_outputs
from edgeprune.inputs.targets import QuantizeConfig

if TYPE_CHECKING:
    import onnx

log = logging.getLogger(__name__)

# Samples a search candidate is calibrated on: a candidate is only timed, and integer kernels take as long whatever
# the scales are, so its Q/DQ graph needs the released model's structure, not its ranges (MinMax, ~0.05 s a sample).
SEARCH_SAMPLES = 16

_METHODS = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}
_TYPES = {"uint8": "QUInt8", "int8": "QInt8"}


def has_qdq(model: onnx.ModelProto) -> bool:
    """Whether the model is already quantised (QuantizeLinear/DequantizeLinear pairs carry the int8 scales)."""
    return any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node)


def _fixed_inputs(model: onnx.ModelProto) -> dict[str, tuple[int | None, ...]]:
    """Each graph input's shape, None where a dimension is symbolic (initializers listed as inputs left out)."""
    initializers = {init.name for init in model.graph.initializer}
    return {i.name: tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
                          for d in i.type.tensor_type.shape.dim)
            for i in model.graph.input if i.name not in initializers}


def _fits(shape: tuple[int, ...], want: tuple[int | None, ...]) -> bool:
    return len(shape) == len(want) and all(w is None or s == w for s, w in zip(shape, want))


class _CheckedReader:
    """ONNX Runtime's calibration data reader protocol (`get_next() -> {input name: array} | None`) over batches,
    each checked against the model's inputs: a wrong name, shape or dtype is one line naming what was wanted, not
    ONNX Runtime's stack trace from inside its calibration session."""

    def __init__(self, batches: Iterator[Mapping[str, Any]], inputs: dict[str, tuple[int | None, ...]],
                 source: str) -> None:
        self.batches, self.inputs, self.source = batches, inputs, source
        self.count = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self.batches, None)
        if batch is None:
            return None
        if not isinstance(batch, Mapping) or set(batch) != set(self.inputs):
            found = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
            raise EdgePruneError(f"{self.source} yields {found} for batch {self.count}; the model's inputs are "
                                 f"{sorted(self.inputs)} (a dict from input name to array)")
        out = {}
        for name, want in self.inputs.items():
            arr = np.asarray(batch[name])
            if arr.dtype != np.float32 or not _fits(arr.shape, want):
                shape = "x".join("N" if d is None else str(d) for d in want)
                raise EdgePruneError(f"{self.source} yields input {name} of shape {list(arr.shape)} ({arr.dtype}) "
                                     f"for batch {self.count}; the model takes float32 {shape}")
            out[name] = np.ascontiguousarray(arr)
        self.count += 1
        return out

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:  # the protocol's iteration, as CalibrationDataReader has it
        while (b := self.get_next()) is not None:
            yield b


def sample_batches(samples: np.ndarray, inputs: dict[str, tuple[int | None, ...]],
                   count: int) -> Iterator[dict[str, np.ndarray]]:
    """The first `count` samples (N x C x H x W) in batches of the model's fixed batch size (1 for an export of
    edgeprune), by the name of its one input; a short last batch is dropped."""
    if len(inputs) != 1:
        raise EdgePruneError(f"the model has {len(inputs)} inputs ({sorted(inputs)}); quantising it needs a reader "
                             "that yields a dict from input name to array for each batch")
    name, want = next(iter(inputs.items()))
    n = want[0] if want and want[0] else 1
    samples = samples[:count]
    if len(samples) < n:
        raise EdgePruneError(f"int8 calibration needs at least {n} samples (one batch of the model's input "
                             f"{list(want)}); the calibration part has {len(samples)}")
    for i in range(0, len(samples) - n + 1, n):
        yield {name: samples[i:i + n]}


def quantize_onnx(src: str | Path, dst: str | Path, calibration: np.ndarray | Any, config: QuantizeConfig,
                  samples: int | None = None) -> Path:
    """`dst`: `src` quantised with ONNX Runtime's `quantize_static` (Q/DQ format, per-channel int8 weights), its
    activation ranges calibrated on `calibration` by `config.method`. The same inputs give the same file.

    Args:
        calibration: samples stacked along the first axis (the recipe's calibration part, `CalibrationData.calib_x`),
            of which the first `samples` are used; or a calibration data reader (`get_next()` returning a dict from
            input name to array, None at the end), each batch checked against the model's inputs.
        samples: how many samples to calibrate on; default `config.samples`.
    """
    import onnx
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    src, dst = Path(src), Path(dst)
    model = onnx.load(str(src))
    if has_qdq(model):
        raise EdgePruneError(f"{src} is already quantised (it has QuantizeLinear/DequantizeLinear nodes); give the "
                             "float model")
    inputs = _fixed_inputs(model)
    if isinstance(calibration, np.ndarray):
        reader = _CheckedReader(sample_batches(calibration, inputs, samples or config.samples), inputs,
                                "the calibration data")
    elif callable(getattr(calibration, "get_next", None)):
        reader = _CheckedReader(iter(calibration.get_next, None), inputs,
                                f"the calibration reader {type(calibration).__name__}")
    else:
        raise EdgePruneError(f"int8 calibration takes an array of samples or a reader with get_next(), found "
                             f"{type(calibration).__name__}")
    extra = {"ActivationSymmetric": config.symmetric, "WeightSymmetric": True}
    if config.method == "percentile":
        extra["CalibPercentile"] = config.percentile
    try:
        with atomic_path(dst) as tmp, _quiet():
            quantize_static(str(src), str(tmp), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                            reduce_range=config.reduce_range, activation_type=getattr(QuantType,
                                                                                   _TYPES[config.activations]),
                            weight_type=QuantType.QInt8,
                            calibrate_method=getattr(CalibrationMethod, _METHODS[config.method]), extra_options=extra)
    except EdgePruneError:
        raise
    except OSError as e:
        from edgeprune.common.atomic import write_error

        raise write_error(dst, e) from None
    except Exception as e:  # ONNX Runtime's own errors, from its calibration session or its quantiser
        raise EdgePruneError(f"ONNX Runtime cannot quantise {src.name}: {type(e).__name__}: {first_line(e, 300)}") \
            from None
    if reader.count == 0:
        dst.unlink(missing_ok=True)
        raise EdgePruneError(f"{reader.source} yielded no batch; int8 calibration needs at least one")
    log.info("quantised %s (%s, %d batches, %s activations) to %s", src.name, config.method, reader.count,
             config.activations, dst.name)
    return dst


class _DropPreprocessHint(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-process" not in record.getMessage() and "pre-processing" not in record.getMessage()


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """ONNX Runtime's quantiser prints its histogram progress to stdout (which --json keeps clean) and suggests its
    shape pre-processing through the root logger (edgeprune's exports are already simplified: BatchNorm folded,
    shapes inferred)."""
    root = logging.getLogger()
    hint = _DropPreprocessHint()
    root.addFilter(hint)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        root.removeFilter(hint)


def warn_random_calibration(kind: str) -> None:
    """A recipe of random inputs calibrates ranges that real data never takes: latency holds, accuracy does not."""
    if kind == "random":
        log.warning("int8 calibration on the `random` recipe: the quantised model's latency is representative, its "
                    "accuracy is not; pass --calibration with real samples (imagefolder, npy) for a deployable model")


@dataclass(frozen=True)
class Quantizer:
    """A job's int8 quantisation: the target's settings and the recipe's calibration samples."""

    config: QuantizeConfig
    calibration: np.ndarray

    def __call__(self, src: Path, search: bool = False) -> Path:
        """`src` quantised next to it (`NAME.int8.onnx`); `search`: a candidate, calibrated on SEARCH_SAMPLES with
        MinMax (only timed; see SEARCH_SAMPLES)."""
        dst = src.with_name(f"{src.stem}.int8.onnx")
        if search:
            return quantize_onnx(src, dst, self.calibration, dataclasses.replace(self.config, method="minmax"),
                                 samples=SEARCH_SAMPLES)
        return quantize_onnx(src, dst, self.calibration, self.config)


class OnnxModule(nn.Module):
    """nn.Module from ONNX file: `forward` runs the file in ONNX Runtime on the CPU and returns torch tensors shaped
    like the torch model's outputs (`template`, its outputs on the example input; without one, a tensor or a dict by
    output name). A batch larger than the file's fixed batch size runs in slices. It has no parameters: it is for
    evaluation (`evaluate(module)`, fidelity), not training."""

    def __init__(self, path: str | Path, template: Any = None, threads: int | None = None) -> None:
        super().__init__()
        self.path = Path(path)
        self.model_bytes = self.path.read_bytes()
        self.template = template
        self.threads = threads
        self._session: Any = None

    def __getstate__(self) -> dict[str, Any]:  # an InferenceSession does not pickle or deepcopy: made again lazily
        state = self.__dict__.copy()
        state["_session"] = None
        return state

    def session(self) -> Any:
        if self._session is None:
            import onnxruntime as ort

            so = ort.SessionOptions()
            so.intra_op_num_threads = self.threads or torch.get_num_threads()
            so.inter_op_num_threads = 1
            so.log_severity_level = 3
            try:
                self._session = ort.InferenceSession(self.model_bytes, so, providers=["CPUExecutionProvider"])
            except Exception as e:
                raise EdgePruneError(f"ONNX Runtime cannot load {self.path}: {first_line(e, 300)}") from None
        return self._session

    def forward(self, x: torch.Tensor) -> Any:
        sess = self.session()
        inp = sess.get_inputs()[0]
        n = inp.shape[0] if inp.shape and isinstance(inp.shape[0], int) and inp.shape[0] > 0 else len(x)
        arr = x.detach().cpu().numpy().astype(np.float32, copy=False)
        if len(arr) % n:
            raise EdgePruneError(f"{self.path.name} takes batches of {n}; a batch of {len(arr)} does not split into "
                                 "them")
        runs = [sess.run(None, {inp.name: np.ascontiguousarray(arr[i:i + n])}) for i in range(0, len(arr), n)]
        leaves = [torch.from_numpy(np.concatenate([r[k] for r in runs])) for k in range(len(runs[0]))]
        if self.template is not None:
            return unflatten_outputs(self.template, leaves)
        names = [o.name for o in sess.get_outputs()]
        return leaves[0] if len(leaves) == 1 else dict(zip(names, leaves))


def output_template(model: nn.Module, example: torch.Tensor) -> Any:
    """The structure of `model`'s outputs (tensors, tuples, lists, dicts), for `OnnxModule` to return the same."""
    model.eval()
    with torch.no_grad():
        out = model(example)
    return unflatten_outputs(out, [None] * len(flatten_outputs(out)))
