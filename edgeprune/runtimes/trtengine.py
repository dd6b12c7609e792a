"""A TensorRT engine for an ONNX model at a target's precision, built once and kept in an on-disk cache.

    engine_path = build_engine("model.onnx", load_target("jetson"))     # <edgeprune cache>/tensorrt/engines/KEY.engine

TensorRT versions differ in ways the build handles:

- 8.x needs the EXPLICIT_BATCH network flag; 10 made it the default (the flag is deprecated) and 11 removed it.
- 8.0-8.3 size the workspace with `max_workspace_size`; 8.4+ with `set_memory_pool_limit`.
- 10.x keeps the FP16/INT8 builder flags and `IInt8EntropyCalibrator2` (deprecated since 10.1 in favour of explicit
  quantization). 11 is strongly typed: the prepared model carries the precision (`trtonnx.prepare_onnx`).

A persistent timing cache per TensorRT version and GPU makes rebuilding similar models (a search's candidates) fast.
"""

from __future__ import annotations

import hashlib
import logging
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from edgeprune.common.atomic import atomic_write_bytes
from edgeprune.errors import DeviceUnreachable, EdgePruneError
from edgeprune.inputs.targets import Target
from edgeprune.runtimes.base import Calibration, calibration_digest
from edgeprune.runtimes.cache import default_cache_dir, file_sha256
from edgeprune.runtimes.cuda import CudaBackend, cuda_backend
from edgeprune.runtimes.trtcalib import calibration_batches, make_calibrator
from edgeprune.runtimes.trtonnx import has_qdq, input_shapes, parse_version, prepare_onnx

log = logging.getLogger(__name__)

WORKSPACE_BYTES = 1 << 30  # builder scratch memory; enough for CNNs at edge resolutions, small enough for a Jetson


def engine_key(model_sha256: str, precision: str, trt_version: str, gpu_name: str, calibration_digest: str = "") -> str:
    """Cache key of a built engine: the same model, precision, TensorRT and GPU always give the same engine file."""
    raw = f"{model_sha256}|{precision}|{trt_version}|{gpu_name}|{calibration_digest}"
    return hashlib.sha256(raw.encode()).hexdigest()[:32]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "gpu"


def build_engine(
    onnx_path: str | Path,
    target: Target,
    calibration: Calibration | None = None,
    cache_dir: str | Path | None = None,
) -> Path:
    """A serialized engine for `onnx_path` at the target's precision, from the on-disk cache when built before.

    Args:
        calibration: int8 only (and only for a model without Q/DQ nodes): the samples the calibrator feeds, as one
            array stacked along the first axis, or batches as arrays (one-input models) or dicts by input name
            (`runtimes.base`). None calibrates on random data, which times like a calibrated engine but must not be
            deployed.
        cache_dir: engines and the timing cache; default `<edgeprune cache>/tensorrt`.
    """
    import tensorrt as trt

    cuda = cuda_backend()
    reason = cuda.unavailable_reason()
    if reason is not None:
        raise DeviceUnreachable(f"TensorRT needs a CUDA GPU: {reason}")
    trt_ver = parse_version(trt.__version__)
    gpu = cuda.device_name()
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir() / "tensorrt"
    onnx_path = Path(onnx_path)
    digest = calibration_digest(calibration) if target.precision == "int8" else ""
    key = engine_key(file_sha256(onnx_path), target.precision, trt.__version__, gpu, digest)
    engine_path = cache_dir / "engines" / f"{key}.engine"
    if engine_path.is_file():
        log.info("engine for %s (%s, TensorRT %s, %s) from cache %s", onnx_path.name, target.precision,
                 trt.__version__, gpu, engine_path)
        return engine_path

    logger = trt.Logger(trt.Logger.WARNING)
    with tempfile.TemporaryDirectory(prefix="edgeprune-trt-") as tmp:
        model_path = prepare_onnx(onnx_path, target.precision, trt_ver, tmp)
        builder = trt.Builder(logger)
        network, parser = _parse(trt, builder, logger, model_path, onnx_path.name)  # the parser owns the weights
        config, calibrator = _builder_config(trt, builder, cuda, model_path, target, calibration)
        timing_path = cache_dir / f"timing-{_slug(trt.__version__)}-{_slug(gpu)}.cache"
        old = timing_path.read_bytes() if timing_path.is_file() else b""
        timing_cache = config.create_timing_cache(old)
        config.set_timing_cache(timing_cache, ignore_mismatch=False)
        log.info("building TensorRT %s %s engine for %s on %s", trt.__version__, target.precision, onnx_path.name, gpu)
        try:
            serialized = builder.build_serialized_network(network, config)
        finally:
            if calibrator is not None:
                calibrator.release()
        if serialized is None:
            raise EdgePruneError(f"TensorRT {trt.__version__} could not build a {target.precision} engine for "
                                 f"{onnx_path.name} on {gpu}; its log above says why")
        atomic_write_bytes(timing_path, bytes(memoryview(config.get_timing_cache().serialize())))
        atomic_write_bytes(engine_path, bytes(memoryview(serialized)))
    return engine_path


def _parse(trt: Any, builder: Any, logger: Any, model_path: Path, name: str) -> tuple[Any, Any]:
    """The network parsed from `model_path`, and its parser (which owns the weights: keep it until the build)."""
    flags = 0
    if parse_version(trt.__version__)[0] < 10:  # explicit batch is the default from 10 on and the flag is gone in 11
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(model_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EdgePruneError(f"TensorRT {trt.__version__} cannot parse {name}: {errors[:500]}")
    return network, parser


def _builder_config(trt: Any, builder: Any, cuda: CudaBackend, model_path: Path, target: Target,
                    calibration: Calibration | None) -> tuple[Any, Any]:
    """The builder config for the target's precision (with an INT8 calibrator when one is needed), and that
    calibrator (None without one; release it after the build)."""
    import onnx

    trt_ver = parse_version(trt.__version__)
    model = onnx.load(str(model_path), load_external_data=False)
    shapes = input_shapes(model)
    config = builder.create_builder_config()
    if hasattr(config, "set_memory_pool_limit"):
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    else:  # TensorRT < 8.4
        config.max_workspace_size = WORKSPACE_BYTES
    calibrator = None
    if trt_ver[0] < 11:  # 11 is strongly typed: precision comes from the (prepared) model itself
        if target.precision in ("fp16", "int8"):
            config.set_flag(trt.BuilderFlag.FP16)  # int8 targets fall back to fp16, not fp32
        if target.precision == "int8":
            config.set_flag(trt.BuilderFlag.INT8)
            if not has_qdq(model):  # explicit quantization needs no calibrator
                dtypes = {i.name: np.dtype(onnx.helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type))
                          for i in model.graph.input if i.name in shapes}
                calibrator = make_calibrator(trt, cuda, calibration_batches(calibration, shapes, dtypes))
                config.int8_calibrator = calibrator
    if any(dynamic for _, dynamic in shapes.values()):
        profile = builder.create_optimization_profile()
        for name, (shape, _) in shapes.items():
            profile.set_shape(name, shape, shape, shape)
        config.add_optimization_profile(profile)
        if calibrator is not None:
            config.set_calibration_profile(profile)
    return config, calibrator
