"""The few CUDA runtime calls TensorRT timing and INT8 calibration need, from cuda-python or else torch.

    cuda = cuda_backend()                       # CudaPython when cuda-python is installed, else CudaTorch
    ptr = cuda.malloc(array.nbytes); cuda.copy_to_device(ptr, array)

Both are imported only when a backend is made.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from edgeprune.common.resources import install_hint
from edgeprune.errors import DeviceUnreachable, EdgePruneError


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
    raise EdgePruneError(f"neither cuda-python nor a CUDA build of torch is installed; TensorRT timing needs one of "
                         f"them for CUDA events: {install_hint('tensorrt')} brings cuda-python")
