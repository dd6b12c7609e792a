"""TensorRT Python API backend: build an engine for the target's precision, time it with CUDA events (DESIGN.md §5).

    from edgeprune.runtimes import tensorrt
    stats = tensorrt.measure("model.onnx", load_target("jetson"))      # on the device; GPU compute time in ms

How it measures, following trtexec: the engine is built once (and cached on disk), then every repeat creates a fresh
execution context, binds device buffers filled once before timing, runs the warm-up enqueues, and times each
`execute_async` with a CUDA event pair on one stream, synchronising on the end event. No host copy happens inside
the timed region, so the figure is the GPU compute time (`timing="gpu_compute"`), the same quantity trtexec prints as
"GPU Compute Time".

TensorRT 8.0-8.4 execute with `execute_async_v2(bindings)`; 8.5+ with `set_tensor_address` + `execute_async_v3`.

The jobs live in modules of their own: `trtonnx` (the ONNX file each TensorRT version builds from), `cuda` (buffers,
stream, events), `trtcalib` (INT8 calibration) and `trtengine` (building and caching the engine). `tensorrt` and
`cuda-python` (or torch) are imported only inside the functions that need them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgeprune.common.progress import Tick
from edgeprune.common.resources import install_hint
from edgeprune.errors import DeviceUnreachable, EdgePruneError
from edgeprune.inputs.targets import MeasureConfig, Target
from edgeprune.runtimes.base import Calibration
from edgeprune.runtimes.cuda import CudaBackend, cuda_backend
from edgeprune.runtimes.stats import LatencyStats, stats_from_repeats
from edgeprune.runtimes.trtengine import build_engine
from edgeprune.runtimes.trtonnx import input_shapes


def version(target: Target | None = None) -> str | None:
    try:
        import tensorrt
    except ImportError:
        return None
    return tensorrt.__version__


def unavailable_reason(target: Target | None = None) -> str | None:
    if version() is None:
        return (f"the tensorrt Python package is not installed ({install_hint('tensorrt')}; on a Jetson, JetPack's "
                f"python3-libnvinfer)")
    try:
        cuda = cuda_backend()
    except EdgePruneError as e:
        return str(e)
    return cuda.unavailable_reason()


@dataclass
class _Binding:
    name: str
    is_input: bool
    shape: tuple[int, ...]
    dtype: Any  # numpy dtype, or None for types numpy lacks (bf16, fp8)
    nbytes: int
    ptr: int = 0


_ITEMSIZE = {"FLOAT": 4, "HALF": 2, "BF16": 2, "INT8": 1, "INT32": 4, "INT64": 8, "BOOL": 1, "UINT8": 1, "FP8": 1}


def _dtype_info(trt: Any, dt: Any) -> tuple[Any, int]:
    try:
        np_dtype = np.dtype(trt.nptype(dt))
        return np_dtype, np_dtype.itemsize
    except TypeError:
        return None, _ITEMSIZE.get(getattr(dt, "name", str(dt)).upper(), 4)


def _bind(trt: Any, engine: Any, context: Any, shapes: dict[str, tuple[int, ...]], cuda: CudaBackend,
          seed: int) -> tuple[list[_Binding], Callable[[int], bool]]:
    """Device buffers for every I/O tensor, inputs filled once (random normal floats, zero integers), and the
    enqueue call for this TensorRT version."""
    rng = np.random.default_rng(seed)
    bindings: list[_Binding] = []
    v3 = hasattr(context, "execute_async_v3") and hasattr(engine, "num_io_tensors")
    if v3:
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        for name in names:
            if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT and name in shapes:
                context.set_input_shape(name, shapes[name])
        for name in names:
            is_input = engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            shape = tuple(context.get_tensor_shape(name))
            dtype, itemsize = _dtype_info(trt, engine.get_tensor_dtype(name))
            bindings.append(_Binding(name, is_input, shape, dtype, int(np.prod(shape, dtype=np.int64)) * itemsize))
    else:  # TensorRT 8.0-8.4: binding indices
        for i in range(engine.num_bindings):
            name = engine.get_binding_name(i)
            if engine.binding_is_input(i) and name in shapes:
                context.set_binding_shape(i, shapes[name])
        for i in range(engine.num_bindings):
            name = engine.get_binding_name(i)
            shape = tuple(context.get_binding_shape(i))
            dtype, itemsize = _dtype_info(trt, engine.get_binding_dtype(i))
            bindings.append(_Binding(name, engine.binding_is_input(i), shape, dtype,
                                     int(np.prod(shape, dtype=np.int64)) * itemsize))
    for b in bindings:
        if any(d < 0 for d in b.shape):
            raise EdgePruneError(f"tensor {b.name} has a data-dependent shape {b.shape}; edgeprune times models whose "
                                 f"output shapes follow from their input shapes")
        b.ptr = cuda.malloc(b.nbytes)
        if b.is_input and b.dtype is not None:
            data = rng.standard_normal(b.shape).astype(b.dtype) if b.dtype.kind == "f" else np.zeros(b.shape, b.dtype)
            cuda.copy_to_device(b.ptr, data)
    if v3:
        for b in bindings:
            context.set_tensor_address(b.name, b.ptr)
        return bindings, lambda handle: bool(context.execute_async_v3(handle))
    ptrs = [b.ptr for b in bindings]
    return bindings, lambda handle: bool(context.execute_async_v2(ptrs, handle))


def measure(
    onnx_path: str | Path,
    target: Target,
    repeats: int | None = None,
    progress: Tick | None = None,
    calibration: Calibration | None = None,
    cache_dir: str | Path | None = None,
) -> LatencyStats:
    """GPU compute time of `onnx_path` on this machine's GPU at the target's precision, in ms.

    Args:
        repeats: fresh execution contexts to time; default the target's `measure.repeats`.
        calibration: int8 calibration inputs, fed to TensorRT's entropy calibrator when the engine is built (see
            `trtengine.build_engine`); None calibrates on random data (logged).
        cache_dir: where engines and the timing cache live; default `<edgeprune cache>/tensorrt`.
    """
    reason = unavailable_reason()
    if reason is not None:
        raise DeviceUnreachable(f"cannot measure {Path(onnx_path).name} with TensorRT here: {reason}")
    import onnx
    import tensorrt as trt

    engine_path = build_engine(onnx_path, target, calibration=calibration, cache_dir=cache_dir)
    model = onnx.load(str(onnx_path), load_external_data=False)
    shapes = {name: shape for name, (shape, _) in input_shapes(model).items()}
    cuda = cuda_backend()
    logger = trt.Logger(trt.Logger.WARNING)
    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(engine_path.read_bytes())
    if engine is None:
        raise EdgePruneError(f"TensorRT {trt.__version__} cannot load the cached engine {engine_path}; delete it and "
                             f"measure again")
    cfg = target.measure
    repeats = repeats or cfg.repeats
    total = repeats * cfg.iterations
    per_repeat: list[list[float]] = []
    for r in range(repeats):
        def on_run(i: int, done: int = r * cfg.iterations) -> None:
            if progress is not None:
                progress(done + i, total)

        per_repeat.append(_time_repeat(trt, engine, shapes, cuda, cfg, Path(onnx_path).name, r, on_run))
    return stats_from_repeats(
        per_repeat, target=target.name, runtime="tensorrt", runtime_version=trt.__version__,
        precision=target.precision, timing="gpu_compute",
    )


def _time_repeat(trt: Any, engine: Any, shapes: dict[str, tuple[int, ...]], cuda: CudaBackend, cfg: MeasureConfig,
                 name: str, seed: int, on_run: Callable[[int], None]) -> list[float]:
    """One repeat: a fresh execution context, its warm-up enqueues, then `cfg.iterations` timed ones (ms each);
    `on_run(i)` after the i-th timed run."""
    context = engine.create_execution_context()
    bindings, enqueue = _bind(trt, engine, context, shapes, cuda, seed=seed)
    stream = cuda.stream()
    handle = cuda.stream_handle(stream)
    start, end = cuda.event(), cuda.event()
    try:
        for _ in range(cfg.warmup):
            if not enqueue(handle):
                raise EdgePruneError(f"TensorRT could not enqueue {name} (warm-up run)")
        cuda.synchronize(stream)
        times = []
        for i in range(cfg.iterations):
            cuda.record(start, stream)
            ok = enqueue(handle)
            cuda.record(end, stream)
            if not ok:
                raise EdgePruneError(f"TensorRT could not enqueue {name} (timed run {i})")
            times.append(cuda.elapsed_ms(start, end))
            on_run(i + 1)
    finally:
        cuda.synchronize(stream)
        for b in bindings:
            cuda.free(b.ptr)
        cuda.destroy(stream, (start, end))
        del context
    return times
