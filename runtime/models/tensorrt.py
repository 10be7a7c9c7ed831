"""A serialised native TensorRT engine behind OnnxBackend's interface (run, providers, input_names, output_shape)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from .backends import BackendError
from .bundle import Bundle
from .cuda_memory import memory_class
from .engines import ensure_engine, load_tensorrt

__all__ = ["TensorRTBackend"]

Log = Callable[[str], None]


def _trt_major_minor(version: str) -> str:
    return ".".join(str(version).split(".")[:2])


class TensorRTBackend:
    """A serialised TensorRT engine behind OnnxBackend's interface; the engine is loaded on first use."""

    def __init__(self, path: Path, memory: Optional[Any] = None) -> None:
        self.path = Path(path)
        self._trt = load_tensorrt()
        self._memory_factory = (lambda: memory) if memory is not None else memory_class()
        self._memory: Any = None
        self._engine: Any = None
        self._context: Any = None
        self._inputs: list[str] = []
        self._outputs: list[str] = []
        self._buffers: dict[str, tuple[int, int]] = {}

    @classmethod
    def from_bundle(cls, bundle: Bundle, model_name: str, *, precision: str = "fp16", batch: Optional[int] = None,
                    log: Log = print) -> TensorRTBackend:
        """The backend of a bundle model at a precision, building and caching its engine when needed."""
        load_tensorrt()
        memory_class()  # refuse before a build that can take minutes
        return cls(ensure_engine(bundle, model_name, precision=precision, batch=batch, log=log))

    def _open(self) -> Any:
        if self._context is not None:
            return self._context
        trt = self._trt
        if not self.path.is_file():
            raise BackendError(f"{self.path}: no such TensorRT engine")
        self._memory = self._memory_factory()
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        engine = runtime.deserialize_cuda_engine(self.path.read_bytes())
        if engine is None:
            raise BackendError(f"{self.path}: TensorRT {trt.__version__} cannot load this engine (built by another "
                               "TensorRT version or GPU?); delete it to rebuild")
        context = engine.create_execution_context()
        if context is None:
            raise BackendError(f"{self.path}: TensorRT could not create an execution context (out of GPU memory?)")
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self._inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self._outputs = [n for n in names if engine.get_tensor_mode(n) != trt.TensorIOMode.INPUT]
        self._runtime, self._engine, self._context = runtime, engine, context
        return context

    @property
    def providers(self) -> list[str]:
        """What runs the model, e.g. ['TensorRT 10.3 (native)']."""
        return [f"TensorRT {_trt_major_minor(self._trt.__version__)} (native)"]

    def input_names(self) -> list[str]:
        """Names of the engine inputs."""
        self._open()
        return list(self._inputs)

    def output_shape(self, name: str) -> list[Optional[int]]:
        """Shape the engine declares for a named output; None for dynamic dimensions."""
        self._open()
        if name not in self._outputs:
            raise BackendError(f"{self.path}: no output named {name!r}")
        return [d if d >= 0 else None for d in tuple(self._engine.get_tensor_shape(name))]

    def _dtype(self, name: str) -> np.dtype:
        return np.dtype(self._trt.nptype(self._engine.get_tensor_dtype(name)))

    def _buffer(self, name: str, nbytes: int) -> int:
        ptr, size = self._buffers.get(name, (0, 0))
        if size < nbytes:
            if ptr:
                self._memory.free(ptr)
            size = max(nbytes, 256)
            ptr = self._memory.alloc(size)
            self._buffers[name] = (ptr, size)
        return ptr

    def run(self, inputs: dict[str, np.ndarray], outputs: Optional[list[str]] = None) -> list[np.ndarray]:
        """Runs one batch and returns the requested outputs (all by default)."""
        context = self._open()
        wanted = list(outputs) if outputs else list(self._outputs)
        unknown = [n for n in wanted if n not in self._outputs]
        missing = [n for n in self._inputs if n not in inputs]
        if unknown or missing:
            what = f"no output {unknown}" if unknown else f"missing input {missing}"
            raise BackendError(f"{self.path.name}: {what}; the engine has inputs {self._inputs}, "
                               f"outputs {self._outputs}")
        staged = []
        for name in self._inputs:
            host = np.ascontiguousarray(inputs[name], dtype=self._dtype(name))
            if not context.set_input_shape(name, tuple(host.shape)):
                lo, _, hi = (tuple(s) for s in self._engine.get_tensor_profile_shape(name, 0))
                raise BackendError(f"{self.path.name}: input {name!r} shape {tuple(host.shape)} is outside the "
                                   f"engine's profile {lo}..{hi}; rebuild with a wider profile")
            ptr = self._buffer(name, host.nbytes)
            self._memory.to_device(ptr, host)
            context.set_tensor_address(name, ptr)
            staged.append(host)
        results: dict[str, np.ndarray] = {}
        for name in self._outputs:
            host = np.empty(tuple(context.get_tensor_shape(name)), dtype=self._dtype(name))
            ptr = self._buffer(name, host.nbytes)
            context.set_tensor_address(name, ptr)
            results[name] = host
        if not context.execute_async_v3(self._memory.stream):
            raise BackendError(f"{self.path.name}: TensorRT execution failed (see its log)")
        for name in wanted:
            self._memory.to_host(results[name], self._buffers[name][0])
        self._memory.synchronize()
        return [results[name] for name in wanted]

    def close(self) -> None:
        """Frees the device buffers and drops the engine."""
        buffers = getattr(self, "_buffers", {})
        if getattr(self, "_memory", None) is not None:
            for ptr, _ in buffers.values():
                try:
                    self._memory.free(ptr)
                except Exception:  # freeing during interpreter shutdown may fail; nothing to recover
                    pass
        buffers.clear()
        self._context = self._engine = None

    def __del__(self) -> None:
        self.close()
