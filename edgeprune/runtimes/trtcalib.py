"""INT8 calibration for TensorRT's implicit quantization: the batch feeder and the calibrator that hands the
batches to the builder.

    batches = calibration_batches(data, {"input": ((1, 3, 224, 224), False)}, {"input": np.dtype(np.float32)})
    config.int8_calibrator = make_calibrator(trt, cuda_backend(), batches)      # TensorRT < 11

`calibration_batches` needs only NumPy; `make_calibrator` needs the `tensorrt` module.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np

from edgeprune.errors import EdgePruneError
from edgeprune.runtimes.base import Calibration, calibration_list
from edgeprune.runtimes.cuda import CudaBackend

log = logging.getLogger(__name__)

RANDOM_CALIBRATION_BATCHES = 8  # used only when an int8 target is measured without calibration data


def make_calibrator(trt: Any, cuda: CudaBackend, batches: list[dict[str, np.ndarray]]) -> Any:
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


def calibration_batches(batches: Calibration | None, shapes: dict[str, tuple[tuple[int, ...], bool]],
                        dtypes: Mapping[str, np.dtype]) -> list[dict[str, np.ndarray]]:
    """Calibration batches by input name, in the inputs' dtypes and in the shapes the engine is built for (an array
    holding several batches along the first axis is split); random-normal ones (seeded) when none are given."""
    names = list(shapes)
    given = calibration_list(batches)
    if given is None:
        log.warning("int8 engine calibrated on random data: its latency is representative, its accuracy is not; "
                    "pass calibration batches for a deployable engine")
        rng = np.random.default_rng(0)
        return [{n: rng.standard_normal(shapes[n][0]).astype(dtypes[n]) for n in names}
                for _ in range(RANDOM_CALIBRATION_BATCHES)]
    per_input: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for b in given:
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
