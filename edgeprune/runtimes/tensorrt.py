"""TensorRT Python API backend: build an engine for the target's precision, time it with CUDA events (DESIGN.md §5).

    from edgeprune.runtimes import tensorrt
    stats = tensorrt.measure("model.onnx", load_target("jetson"))      # on the device; GPU compute time in ms

How it measures, following trtexec: the engine is built once (and cached on disk), then every repeat creates a fresh
execution context, binds device buffers filled once before timing, runs the warm-up enqueues, and times each
`execute_async` with a CUDA event pair on one stream, synchronising on the end event. No host copy happens inside
the timed region, so the figure is the GPU compute time (`timing="gpu_compute"`), the same quantity trtexec prints as
"GPU Compute Time".

TensorRT versions differ in ways this module handles:

- 8.x needs the EXPLICIT_BATCH network flag; 10 made it the default (the flag is deprecated) and 11 removed it.
- 8.0-8.4 execute with `execute_async_v2(bindings)`; 8.5+ with `set_tensor_address` + `execute_async_v3`.
- 8.0-8.3 size the workspace with `max_workspace_size`; 8.4+ with `set_memory_pool_limit`.
- 10.x keeps the FP16/INT8 builder flags and `IInt8EntropyCalibrator2` (deprecated since 10.1 in favour of explicit
  quantization). 11 removed weak typing: every network is strongly typed, so an fp16 target is built from an fp16
  copy of the model (`fp16_onnx`) and an int8 target needs a model that already carries Q/DQ nodes.

`tensorrt` and `cuda-python` (or torch) are imported only inside the functions that need them.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgeprune.errors import DeviceUnreachable, EdgePruneError
from edgeprune.runtimes.cache import default_cache_dir, file_sha256
from edgeprune.runtimes.stats import LatencyStats, stats_from_repeats
from edgeprune.targets import Target

if TYPE_CHECKING:
    import onnx

log = logging.getLogger(__name__)

WORKSPACE_BYTES = 1 << 30  # builder scratch memory; enough for CNNs at edge resolutions, small enough for a Jetson
RANDOM_CALIBRATION_BATCHES = 8  # used only when an int8 target is measured without calibration data
TrtVersion = tuple[int, int, int]
Calibration = Sequence["np.ndarray | Mapping[str, np.ndarray]"]


# ---------------------------------------------------------------- availability


def version() -> str | None:
    try:
        import tensorrt
    except ImportError:
        return None
    return tensorrt.__version__


def unavailable_reason() -> str | None:
    if version() is None:
        return "the tensorrt Python package is not installed (pip install tensorrt, or JetPack's python3-libnvinfer)"
    try:
        cuda = cuda_backend()
    except EdgePruneError as e:
        return str(e)
    return cuda.unavailable_reason()


def parse_version(text: str) -> TrtVersion:
    """(major, minor, patch) from a version string such as `tensorrt.__version__` ("10.3.0.26")."""
    m = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", text.strip())
    if m is None:
        raise EdgePruneError(f"cannot read a TensorRT version from {text!r}; expected MAJOR.MINOR.PATCH")
    return int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)


# ---------------------------------------------------------------- ONNX preparation (shared with the trtexec backend)


def input_shapes(model: onnx.ModelProto) -> dict[str, tuple[tuple[int, ...], bool]]:
    """Each graph input's shape to time (symbolic dimensions become 1, as in the ONNX Runtime backend) and whether it
    had a symbolic dimension; initializers listed as inputs (old IR versions) are left out."""
    initializers = {init.name for init in model.graph.initializer}
    out: dict[str, tuple[tuple[int, ...], bool]] = {}
    for inp in model.graph.input:
        if inp.name in initializers:
            continue
        dims = inp.type.tensor_type.shape.dim
        shape = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else 1 for d in dims)
        dynamic = any(not (d.HasField("dim_value") and d.dim_value > 0) for d in dims)
        out[inp.name] = (shape, dynamic)
    return out


def has_qdq(model: onnx.ModelProto) -> bool:
    """Whether the model is explicitly quantized (QuantizeLinear/DequantizeLinear pairs carry the INT8 scales)."""
    return any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node)


def _topological_order(graph: Any) -> None:
    """Sort `graph.node` in place so every node follows its producers (onnx's checker and TensorRT's parser insist).

    onnxruntime's float16 converter appends its input Casts at the end of the node list."""
    produced_by: dict[str, int] = {}
    for i, node in enumerate(graph.node):
        for name in node.output:
            produced_by[name] = i
    waiting = [0] * len(graph.node)
    users: dict[int, list[int]] = {}
    for i, node in enumerate(graph.node):
        for name in node.input:
            p = produced_by.get(name)
            if p is not None and p != i:
                waiting[i] += 1
                users.setdefault(p, []).append(i)
    ready = [i for i, w in enumerate(waiting) if w == 0]
    order: list[int] = []
    while ready:
        i = ready.pop(0)
        order.append(i)
        for u in users.get(i, ()):
            waiting[u] -= 1
            if waiting[u] == 0:
                ready.append(u)
    if len(order) != len(graph.node):
        return  # a cycle cannot be sorted; leave the order as the converter wrote it and let the checker speak
    nodes = [graph.node[i] for i in order]
    del graph.node[:]
    graph.node.extend(nodes)


def fp16_onnx(src: str | Path, dst: str | Path) -> Path:
    """An fp16 copy of `src` for TensorRT 11's strong typing: weights and activations in fp16, inputs and outputs
    kept fp32 (as `--fp16` kept them in TensorRT 8-10), so the engine is fed and timed like an fp16 engine of 10.x.

    Converted with onnxruntime's float16 converter (it ships with onnxruntime, a dependency), which keeps numerically
    risky operators in fp32; NVIDIA's ModelOpt AutoCast is the heavier alternative."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(src))
    try:
        converted = convert_float_to_float16(model, keep_io_types=True)
    except Exception as e:  # the converter raises plain Exceptions on unsupported graphs
        raise EdgePruneError(
            f"cannot convert {src} to fp16 for TensorRT 11 strong typing ({type(e).__name__}: {str(e)[:200]}); "
            f"convert it yourself (for example with NVIDIA ModelOpt AutoCast) and measure it with precision fp32"
        ) from None
    _topological_order(converted.graph)
    onnx.checker.check_model(converted)
    dst = Path(dst)
    onnx.save(converted, str(dst))
    return dst


def prepare_onnx(onnx_path: str | Path, precision: str, trt_version: TrtVersion, work_dir: str | Path) -> Path:
    """The ONNX file TensorRT `trt_version` should build for `precision`: the file itself up to 10.x; from 11 on an
    fp16 copy for fp16, and for int8 the file itself when it carries Q/DQ nodes (else an error naming the way out)."""
    onnx_path = Path(onnx_path)
    if trt_version[0] < 11 or precision == "fp32":
        return onnx_path
    if precision == "fp16":
        return fp16_onnx(onnx_path, Path(work_dir) / f"{onnx_path.stem}.fp16.onnx")
    import onnx

    if not has_qdq(onnx.load(str(onnx_path), load_external_data=False)):
        raise EdgePruneError(
            f"TensorRT {'.'.join(map(str, trt_version))} removed implicit INT8 calibration: an int8 target needs a "
            f"model with QuantizeLinear/DequantizeLinear nodes, and {onnx_path.name} has none; quantize it (for "
            f"example with NVIDIA ModelOpt) or use an fp16 target, or TensorRT 10.x for calibrated INT8"
        )
    return onnx_path


# ---------------------------------------------------------------- CUDA: cuda-python, else torch


class CudaBackend:
    """The few CUDA runtime calls timing needs: device buffers, one stream, event pairs."""

    name = ""

    def unavailable_reason(self) -> str | None:
        raise NotImplementedError

    def device_name(self) -> str:
        raise NotImplementedError

    def malloc(self, nbytes: int) -> int:
        raise NotImplementedError

    def free(self, ptr: int) -> None:
        raise NotImplementedError

    def copy_to_device(self, ptr: int, array: np.ndarray) -> None:
        raise NotImplementedError

    def stream(self) -> Any:
        raise NotImplementedError

    def stream_handle(self, stream: Any) -> int:
        raise NotImplementedError

    def synchronize(self, stream: Any) -> None:
        raise NotImplementedError

    def event(self) -> Any:
        raise NotImplementedError

    def record(self, event: Any, stream: Any) -> None:
        raise NotImplementedError

    def elapsed_ms(self, start: Any, end: Any) -> float:
        """Milliseconds between two recorded events; waits for `end` first."""
        raise NotImplementedError

    def destroy(self, stream: Any, events: Sequence[Any]) -> None:
        """Release a stream and its events."""


class CudaPython(CudaBackend):
    """cuda-python's runtime API (`cuda.bindings.runtime`, or `cuda.cudart` before cuda-python 12.6)."""

    name = "cuda-python"

    def __init__(self) -> None:
        try:
            from cuda.bindings import runtime as cudart
        except ImportError:
            from cuda import cudart  # type: ignore[no-redef]
        self.rt = cudart

    def _call(self, result: Any) -> Any:
        err, *rest = result if isinstance(result, tuple) else (result,)
        if err != self.rt.cudaError_t.cudaSuccess:
            name = self.rt.cudaGetErrorName(err)[1]
            name = name.decode() if isinstance(name, bytes) else str(name)
            raise DeviceUnreachable(f"CUDA call failed with {name}")
        return rest[0] if len(rest) == 1 else rest

    def unavailable_reason(self) -> str | None:
        err, count = self.rt.cudaGetDeviceCount()
        if err != self.rt.cudaError_t.cudaSuccess or count < 1:
            name = self.rt.cudaGetErrorName(err)[1]
            return f"no CUDA GPU is visible ({name.decode() if isinstance(name, bytes) else name})"
        return None

    def device_name(self) -> str:
        props = self._call(self.rt.cudaGetDeviceProperties(0))
        raw = props.name
        raw = raw.decode(errors="replace") if isinstance(raw, (bytes, bytearray)) else str(raw)
        return raw.split("\x00", 1)[0].strip()

    def malloc(self, nbytes: int) -> int:
        return int(self._call(self.rt.cudaMalloc(max(int(nbytes), 1))))

    def free(self, ptr: int) -> None:
        self._call(self.rt.cudaFree(ptr))

    def copy_to_device(self, ptr: int, array: np.ndarray) -> None:
        array = np.ascontiguousarray(array)
        kind = self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._call(self.rt.cudaMemcpy(ptr, array.ctypes.data, array.nbytes, kind))

    def stream(self) -> Any:
        return self._call(self.rt.cudaStreamCreate())

    def stream_handle(self, stream: Any) -> int:
        return int(stream)

    def synchronize(self, stream: Any) -> None:
        self._call(self.rt.cudaStreamSynchronize(stream))

    def event(self) -> Any:
        return self._call(self.rt.cudaEventCreate())

    def record(self, event: Any, stream: Any) -> None:
        self._call(self.rt.cudaEventRecord(event, stream))

    def elapsed_ms(self, start: Any, end: Any) -> float:
        self._call(self.rt.cudaEventSynchronize(end))
        return float(self._call(self.rt.cudaEventElapsedTime(start, end)))

    def destroy(self, stream: Any, events: Sequence[Any]) -> None:
        for e in events:
            self.rt.cudaEventDestroy(e)
        self.rt.cudaStreamDestroy(stream)


class CudaTorch(CudaBackend):
    """torch.cuda, for machines (Jetsons with NVIDIA's torch wheel) that have torch but not cuda-python."""

    name = "torch.cuda"

    def __init__(self) -> None:
        import torch

        self.torch = torch
        self._buffers: dict[int, Any] = {}

    def unavailable_reason(self) -> str | None:
        return None if self.torch.cuda.is_available() else "torch sees no CUDA GPU (torch.cuda.is_available() is False)"

    def device_name(self) -> str:
        return self.torch.cuda.get_device_name(0)

    def malloc(self, nbytes: int) -> int:
        t = self.torch.empty(max(int(nbytes), 1), dtype=self.torch.uint8, device="cuda")
        self._buffers[t.data_ptr()] = t
        return t.data_ptr()

    def free(self, ptr: int) -> None:
        self._buffers.pop(ptr, None)

    def copy_to_device(self, ptr: int, array: np.ndarray) -> None:
        flat = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
        self._buffers[ptr][: flat.size].copy_(self.torch.from_numpy(flat.copy()))
        self.torch.cuda.synchronize()

    def stream(self) -> Any:
        return self.torch.cuda.Stream()

    def stream_handle(self, stream: Any) -> int:
        return int(stream.cuda_stream)

    def synchronize(self, stream: Any) -> None:
        stream.synchronize()

    def event(self) -> Any:
        return self.torch.cuda.Event(enable_timing=True)

    def record(self, event: Any, stream: Any) -> None:
        event.record(stream)

    def elapsed_ms(self, start: Any, end: Any) -> float:
        end.synchronize()
        return float(start.elapsed_time(end))


def cuda_backend() -> CudaBackend:
    """cuda-python when installed (TensorRT's own samples use it), else torch with CUDA."""
    try:
        return CudaPython()
    except ImportError:
        pass
    try:
        import torch
    except ImportError:
        torch = None  # type: ignore[assignment]
    if torch is not None and torch.version.cuda is not None:
        return CudaTorch()
    raise EdgePruneError("neither cuda-python (pip install cuda-python) nor a CUDA build of torch is installed; "
                         "TensorRT timing needs one of them for CUDA events")


# ---------------------------------------------------------------- engine build and cache


def engine_key(model_sha256: str, precision: str, trt_version: str, gpu_name: str, calibration_digest: str = "") -> str:
    """Cache key of a built engine: the same model, precision, TensorRT and GPU always give the same engine file."""
    raw = f"{model_sha256}|{precision}|{trt_version}|{gpu_name}|{calibration_digest}"
    return hashlib.sha256(raw.encode()).hexdigest()[:32]


def calibration_digest(batches: Calibration | None) -> str:
    """Digest of the calibration data, so engines calibrated on other data are not reused."""
    if batches is None:
        return "random"
    h = hashlib.sha256()
    for b in batches:
        items = sorted(b.items()) if isinstance(b, Mapping) else [("", b)]
        for name, arr in items:
            arr = np.ascontiguousarray(arr)
            h.update(f"{name}|{arr.dtype}|{arr.shape}|".encode())
            h.update(arr.tobytes())
    return h.hexdigest()[:16]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "gpu"


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _make_calibrator(trt: Any, cuda: CudaBackend, batches: list[dict[str, np.ndarray]]) -> Any:
    """An IInt8EntropyCalibrator2 that feeds `batches` (host arrays by input name) through device buffers."""

    class Calibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)
            self.index = 0
            self.buffers: dict[str, tuple[int, int]] = {}

        def get_batch_size(self) -> int:
            return 1  # explicit-batch networks take the batch from the input shapes; TensorRT ignores this

        def get_batch(self, names: list[str], *args: Any) -> list[int] | None:
            if self.index >= len(batches):
                return None
            batch = batches[self.index]
            self.index += 1
            ptrs = []
            for name in names:
                arr = np.ascontiguousarray(batch[name])
                ptr, size = self.buffers.get(name, (0, 0))
                if size < arr.nbytes:
                    if ptr:
                        cuda.free(ptr)
                    ptr, size = cuda.malloc(arr.nbytes), arr.nbytes
                    self.buffers[name] = (ptr, size)
                cuda.copy_to_device(ptr, arr)
                ptrs.append(ptr)
            return ptrs

        def read_calibration_cache(self) -> bytes | None:
            return None  # the engine cache already keeps calibrated engines

        def write_calibration_cache(self, cache: Any) -> None:
            return None

        def release(self) -> None:
            for ptr, _ in self.buffers.values():
                cuda.free(ptr)
            self.buffers.clear()

    return Calibrator()


def _calibration_batches(batches: Calibration | None, shapes: dict[str, tuple[tuple[int, ...], bool]],
                         dtypes: Mapping[str, np.dtype]) -> list[dict[str, np.ndarray]]:
    """Calibration batches by input name, in the inputs' dtypes and in the shapes the engine is built for (an array
    holding several batches along the first axis is split); random-normal ones (seeded) when none are given."""
    names = list(shapes)
    if batches is None:
        log.warning("int8 engine calibrated on random data: its latency is representative, its accuracy is not; "
                    "pass calibration batches for a deployable engine")
        rng = np.random.default_rng(0)
        return [{n: rng.standard_normal(shapes[n][0]).astype(dtypes[n]) for n in names}
                for _ in range(RANDOM_CALIBRATION_BATCHES)]
    per_input: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for b in batches:
        if isinstance(b, Mapping):
            missing = set(names) - set(b)
            if missing:
                raise EdgePruneError(f"calibration batch lacks input(s) {sorted(missing)}; the model's inputs are {names}")
            items = {n: np.asarray(b[n]) for n in names}
        elif len(names) == 1:
            items = {names[0]: np.asarray(b)}
        else:
            raise EdgePruneError(f"the model has {len(names)} inputs ({names}); pass calibration batches as dicts "
                                 f"from input name to array")
        for name, arr in items.items():
            shape = shapes[name][0]
            if arr.shape == shape:
                per_input[name].append(arr.astype(dtypes[name], copy=False))
            elif arr.ndim == len(shape) and arr.shape[1:] == shape[1:] and shape[0] and arr.shape[0] % shape[0] == 0:
                per_input[name] += [a.astype(dtypes[name], copy=False) for a in np.split(arr, arr.shape[0] // shape[0])]
            else:
                raise EdgePruneError(f"calibration data for input {name} has shape {arr.shape}; the engine is built "
                                     f"for {shape} (several batches may be stacked along the first axis)")
    counts = {len(v) for v in per_input.values()}
    if counts == {0}:
        raise EdgePruneError("int8 calibration needs at least one batch; none were given")
    if len(counts) != 1:
        raise EdgePruneError(f"calibration inputs hold different numbers of batches: "
                             f"{ {n: len(v) for n, v in per_input.items()} }")
    return [{n: per_input[n][i] for n in names} for i in range(counts.pop())]


def build_engine(
    onnx_path: str | Path,
    target: Target,
    calibration: Calibration | None = None,
    cache_dir: str | Path | None = None,
) -> Path:
    """A serialized engine for `onnx_path` at the target's precision, from the on-disk cache when built before.

    Args:
        calibration: int8 only; batches as arrays (one-input models) or dicts by input name. None calibrates on
            random data, which times like a calibrated engine but must not be deployed.
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

    import onnx

    logger = trt.Logger(trt.Logger.WARNING)
    with tempfile.TemporaryDirectory(prefix="edgeprune-trt-") as tmp:
        model_path = prepare_onnx(onnx_path, target.precision, trt_ver, tmp)
        model = onnx.load(str(model_path), load_external_data=False)
        shapes = input_shapes(model)
        dtypes = {i.name: np.dtype(onnx.helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type))
                  for i in model.graph.input if i.name in shapes}
        qdq = has_qdq(model)
        builder = trt.Builder(logger)
        flags = 0
        if trt_ver[0] < 10:  # explicit batch is the default from 10 on and the flag is gone in 11
            flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(model_path)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise EdgePruneError(f"TensorRT {trt.__version__} cannot parse {onnx_path.name}: {errors[:500]}")
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
                if not qdq:  # explicit quantization needs no calibrator
                    calibrator = _make_calibrator(trt, cuda, _calibration_batches(calibration, shapes, dtypes))
                    config.int8_calibrator = calibrator
        profile = None
        if any(dynamic for _, dynamic in shapes.values()):
            profile = builder.create_optimization_profile()
            for name, (shape, _) in shapes.items():
                profile.set_shape(name, shape, shape, shape)
            config.add_optimization_profile(profile)
            if calibrator is not None:
                config.set_calibration_profile(profile)
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
        _write_atomic(timing_path, bytes(memoryview(config.get_timing_cache().serialize())))
        _write_atomic(engine_path, bytes(memoryview(serialized)))
    return engine_path


# ---------------------------------------------------------------- timing


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
    progress: Callable[[int, int], None] | None = None,
    calibration: Calibration | None = None,
    cache_dir: str | Path | None = None,
) -> LatencyStats:
    """GPU compute time of `onnx_path` on this machine's GPU at the target's precision, in ms.

    Args:
        repeats: fresh execution contexts to time; default the target's `measure.repeats`.
        calibration: int8 calibration batches (see `build_engine`).
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
        context = engine.create_execution_context()
        bindings, enqueue = _bind(trt, engine, context, shapes, cuda, seed=r)
        stream = cuda.stream()
        handle = cuda.stream_handle(stream)
        start, end = cuda.event(), cuda.event()
        try:
            for _ in range(cfg.warmup):
                if not enqueue(handle):
                    raise EdgePruneError(f"TensorRT could not enqueue {Path(onnx_path).name} (warm-up run)")
            cuda.synchronize(stream)
            times = []
            for i in range(cfg.iterations):
                cuda.record(start, stream)
                ok = enqueue(handle)
                cuda.record(end, stream)
                if not ok:
                    raise EdgePruneError(f"TensorRT could not enqueue {Path(onnx_path).name} (timed run {i})")
                times.append(cuda.elapsed_ms(start, end))
                if progress is not None:
                    progress(r * cfg.iterations + i + 1, total)
        finally:
            cuda.synchronize(stream)
            for b in bindings:
                cuda.free(b.ptr)
            cuda.destroy(stream, (start, end))
            del context
        per_repeat.append(times)
    return stats_from_repeats(
        per_repeat, target=target.name, runtime="tensorrt", runtime_version=trt.__version__,
        precision=target.precision, timing="gpu_compute",
    )
