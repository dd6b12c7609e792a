"""ONNX Runtime backend: wall-clock latency of synchronous `InferenceSession.run` calls (DESIGN.md §5).

Why a fresh session per repeat: a session's memory arena and thread pool settle into one layout; several fresh
sessions sample the layouts a deployment will see, and the median of their medians is the repeatable figure.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from edgeprune.common.progress import Tick
from edgeprune.errors import EdgePruneError, first_line
from edgeprune.inputs.targets import Target
from edgeprune.runtimes.base import Calibration, calibration_list
from edgeprune.runtimes.stats import LatencyStats, stats_from_repeats

_DTYPES = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_,
}


def version(target: Target | None = None) -> str | None:
    try:
        import onnxruntime
    except ImportError:
        return None
    return onnxruntime.__version__


def unavailable_reason(target: Target | None = None) -> str | None:
    return None if version() is not None else "onnxruntime is not installed (pip install onnxruntime)"


def session_options(target: Target):  # -> onnxruntime.SessionOptions
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.intra_op_num_threads = target.threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return so


def random_feeds(session, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs with the model's declared shapes (symbolic dims become 1); values do not change a CNN's latency."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for inp in session.get_inputs():
        shape = [d if isinstance(d, int) and d > 0 else 1 for d in inp.shape]
        dtype = _DTYPES.get(inp.type)
        if dtype is None:
            raise EdgePruneError(f"model input {inp.name} has type {inp.type}, which edgeprune cannot feed")
        check_input_memory(inp.name, shape, dtype)
        if dtype in (np.float32, np.float64):
            feeds[inp.name] = rng.standard_normal(shape, dtype=dtype)  # drawn at its own precision: no float64 copy
        elif dtype == np.float16:
            feeds[inp.name] = rng.standard_normal(shape, dtype=np.float32).astype(dtype)
        else:
            feeds[inp.name] = np.zeros(shape, dtype)
    return feeds


def check_input_memory(name: str, shape: list[int], dtype: type) -> None:
    """Refuse, before allocating it, an input that takes more than half the memory available: the model's own
    tensors need at least as much again (a 94-byte ONNX file can declare a 40 GB input)."""
    from edgeprune.inputs.data import available_memory

    need = int(np.prod(shape, dtype=np.float64)) * np.dtype(dtype).itemsize
    free = available_memory()
    if free is not None and need > free // 2:
        raise EdgePruneError(f"model input {name} declares shape {shape}: {need / 2**30:.1f} GiB of "
                             f"{np.dtype(dtype).name}, and this machine has {free / 2**30:.1f} GiB available (the "
                             f"model's own tensors need as much again); export the model for a smaller input, or "
                             f"measure it on a device with more memory")


def _run(sess, feeds: dict[str, np.ndarray], onnx_path: str | Path) -> None:
    try:
        sess.run(None, feeds)
    except Exception as e:  # ORT raises its own InvalidArgument/Fail types
        dims = [f"{i.name} {i.shape}" for i in sess.get_inputs() if any(not isinstance(d, int) for d in i.shape)]
        hint = (f"; its input {', '.join(dims)} has symbolic dimensions, which edgeprune feeds as 1: export the model "
                f"with fixed input shapes") if dims else ""
        raise EdgePruneError(f"ONNX Runtime cannot run {onnx_path}: {first_line(e, 300)}{hint}") from None


def timed_model(onnx_path: Path, target: Target, calibration: Calibration | None) -> bytes:
    """The bytes of the model to time: `onnx_path`, quantised first when the target is int8 and it is a float model."""
    model_bytes = onnx_path.read_bytes()
    if target.precision != "int8" or target.quantization is None:
        return model_bytes
    import dataclasses

    import onnx

    from edgeprune.export.quantize import SEARCH_SAMPLES, has_qdq, quantize_onnx

    model = onnx.load_from_string(model_bytes)
    if has_qdq(model):
        return model_bytes
    dims = model.graph.input[0].type.tensor_type.shape.dim
    shape = [d.dim_value if d.dim_value > 0 else 1 for d in dims]
    count = SEARCH_SAMPLES * shape[0]  # samples in the model's batches (1 for edgeprune's exports)
    batches = calibration_list(calibration)
    if batches and all(isinstance(b, np.ndarray) for b in batches):
        samples = np.concatenate([np.asarray(b, np.float32) for b in batches])
    else:
        samples = np.random.default_rng(0).standard_normal((count, *shape[1:]), np.float32)
    config = dataclasses.replace(target.quantization, method="minmax")
    from edgeprune.common.atomic import scratch_dir

    with scratch_dir("int8") as tmp:
        return quantize_onnx(onnx_path, Path(tmp) / "model.int8.onnx", samples, config, samples=count).read_bytes()


def measure(onnx_path: str | Path, target: Target, repeats: int | None = None, progress: Tick | None = None,
            calibration: Calibration | None = None) -> LatencyStats:
    """Latency of `onnx_path` under the target's thread count: warm-up, then timed runs, in fresh sessions.

    An int8 target times a quantised model as it is; a float model is first quantised as a search candidate is
    (`quantize.Quantizer(search=True)`: MinMax on `calibration`'s first samples, or on seeded random inputs when none
    are given, which times the same: integer kernels take as long whatever the scales). A build quantises its models
    itself, so what it measures is what it releases; this serves `edgeprune profile` and latency tables.

    `progress(done, total)` is called after every run, warm-up runs included (with the timed count so far): an
    exception it raises stops the measurement (the agent stops a request whose client has gone or whose time is up).
    """
    import onnxruntime as ort

    model_bytes = timed_model(Path(onnx_path), target, calibration)
    cfg = target.measure
    repeats = repeats or cfg.repeats
    total = repeats * cfg.iterations
    per_repeat: list[list[float]] = []
    for r in range(repeats):
        try:
            sess = ort.InferenceSession(model_bytes, session_options(target), providers=["CPUExecutionProvider"])
        except Exception as e:  # ORT raises its own Fail/InvalidGraph types
            raise EdgePruneError(f"ONNX Runtime cannot load {onnx_path}: {first_line(e, 300)}") from None
        feeds = random_feeds(sess)
        warm, start = 0, time.perf_counter()
        while not cfg.warmup_done(warm, time.perf_counter() - start):
            _run(sess, feeds, onnx_path)
            warm += 1
            if progress is not None:
                progress(r * cfg.iterations, total)
        times: list[float] = []
        start = time.perf_counter()
        while not cfg.runs_done(len(times), time.perf_counter() - start):
            t0 = time.perf_counter_ns()
            _run(sess, feeds, onnx_path)
            times.append((time.perf_counter_ns() - t0) / 1e6)
            if progress is not None:  # a repeat ends at `iterations` runs or at `max_seconds`, whichever comes first
                by_time = int(cfg.iterations * (time.perf_counter() - start) / cfg.max_seconds) if cfg.max_seconds else 0
                progress(r * cfg.iterations + min(max(len(times), by_time), cfg.iterations), total)
        if progress is not None:
            progress((r + 1) * cfg.iterations, total)
        per_repeat.append(times)
        del sess
    return stats_from_repeats(
        per_repeat, target=target.name, runtime="onnxruntime", runtime_version=version() or "unknown",
        precision=target.precision, timing="wall",
    )
