"""Device buffers and one CUDA stream for native TensorRT engines, through cuda-python or CuPy."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from .backends import BackendError

__all__ = ["memory_class"]


class _CudaPythonMemory:
    """Device buffers and one stream through cuda-python's runtime bindings."""

    library = "cuda-python"

    def __init__(self) -> None:
        try:
            from cuda.bindings import runtime
        except ImportError:
            from cuda import cudart as runtime
        self._rt = runtime
        self._stream_obj = self._call(runtime.cudaStreamCreate)
        self.stream = int(self._stream_obj)

    def _call(self, fn: Callable, *args: Any) -> Any:
        result = fn(*args)
        err, values = (result[0], result[1:]) if isinstance(result, tuple) else (result, ())
        if err != self._rt.cudaError_t.cudaSuccess:
            raise BackendError(f"CUDA {getattr(fn, '__name__', fn)} failed: {err}")
        return values[0] if len(values) == 1 else None

    def alloc(self, nbytes: int) -> int:
        """Allocates device memory and returns its address."""
        return int(self._call(self._rt.cudaMalloc, nbytes))

    def free(self, ptr: int) -> None:
        """Frees device memory."""
        self._call(self._rt.cudaFree, ptr)

    def to_device(self, ptr: int, host: np.ndarray) -> None:
        """Queues a host-to-device copy on the stream."""
        kind = self._rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._call(self._rt.cudaMemcpyAsync, ptr, host.ctypes.data, host.nbytes, kind, self._stream_obj)

    def to_host(self, host: np.ndarray, ptr: int) -> None:
        """Queues a device-to-host copy on the stream."""
        kind = self._rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self._call(self._rt.cudaMemcpyAsync, host.ctypes.data, ptr, host.nbytes, kind, self._stream_obj)

    def synchronize(self) -> None:
        """Waits for the stream."""
        self._call(self._rt.cudaStreamSynchronize, self._stream_obj)


class _CuPyMemory:
    """Device buffers and one stream through CuPy's CUDA runtime wrapper."""

    library = "CuPy"

    def __init__(self) -> None:
        from cupy.cuda import runtime

        self._rt = runtime
        self.stream = int(runtime.streamCreate())

    def alloc(self, nbytes: int) -> int:
        """Allocates device memory and returns its address."""
        return int(self._rt.malloc(nbytes))

    def free(self, ptr: int) -> None:
        """Frees device memory."""
        self._rt.free(ptr)

    def to_device(self, ptr: int, host: np.ndarray) -> None:
        """Queues a host-to-device copy on the stream."""
        self._rt.memcpyAsync(ptr, host.ctypes.data, host.nbytes, self._rt.memcpyHostToDevice, self.stream)

    def to_host(self, host: np.ndarray, ptr: int) -> None:
        """Queues a device-to-host copy on the stream."""
        self._rt.memcpyAsync(host.ctypes.data, ptr, host.nbytes, self._rt.memcpyDeviceToHost, self.stream)

    def synchronize(self) -> None:
        """Waits for the stream."""
        self._rt.streamSynchronize(self.stream)


def memory_class() -> type:
    """The device-memory helper to use: cuda-python if importable, else CuPy; a BackendError naming both if neither."""
    try:
        try:
            from cuda.bindings import runtime  # noqa: F401
        except ImportError:
            from cuda import cudart  # noqa: F401
        return _CudaPythonMemory
    except ImportError:
        pass
    try:
        import cupy  # noqa: F401
        return _CuPyMemory
    except ImportError:
        raise BackendError(
            "native TensorRT needs device buffers from cuda-python (pip install cuda-python) or CuPy; "
            "neither is importable"
        ) from None
