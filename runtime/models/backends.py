"""One small interface over ONNX Runtime sessions with explicit providers, reporting what really runs."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np

__all__ = ["BackendError", "DEVICES", "PRECISIONS", "OnnxBackend", "available_providers", "providers_for"]

logger = logging.getLogger("trapedge")

DEVICES = ("auto", "cpu", "cuda", "tensorrt")
PRECISIONS = ("fp32", "fp16", "int8")
_CPU = "CPUExecutionProvider"
_CUDA = "CUDAExecutionProvider"
_TRT = "TensorrtExecutionProvider"


class BackendError(RuntimeError):
    """A model cannot be run as asked (missing package, provider or a broken model file)."""


def _ort():
    try:
        import onnxruntime
    except ImportError as e:
        raise BackendError(
            "onnxruntime is not installed: pip install 'trapedge[cpu]' (or [gpu] on a CUDA machine)"
        ) from e
    return onnxruntime


def available_providers() -> list[str]:
    """Execution providers this onnxruntime build offers."""
    return list(_ort().get_available_providers())


def providers_for(device: str, precision: str = "fp32",
                  tensorrt_options: Optional[Mapping[str, Any]] = None) -> list:
    """Explicit provider list for a device; on tensorrt the EP's precision flags follow `precision` and the
    model's own options (profiles, caches) are added; 'auto' takes CUDA when this onnxruntime has it."""
    if device not in DEVICES:
        raise BackendError(f"unknown device {device!r}; expected one of {', '.join(DEVICES)}")
    if precision not in PRECISIONS:
        raise BackendError(f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
    available = available_providers()
    if device == "cpu" or (device == "auto" and _CUDA not in available):
        return [_CPU]
    if device in ("cuda", "auto"):
        if _CUDA not in available:
            raise BackendError(f"--device cuda needs onnxruntime-gpu; this onnxruntime has {available}")
        return [(_CUDA, {"device_id": 0}), _CPU]
    if _TRT not in available:
        raise BackendError(f"--device tensorrt needs onnxruntime-gpu with TensorRT; have {available}")
    options: dict[str, Any] = {"device_id": 0, "trt_fp16_enable": precision == "fp16",
                               "trt_int8_enable": precision == "int8"}
    options.update(tensorrt_options or {})
    return [(_TRT, options), (_CUDA, {"device_id": 0}), _CPU]


class OnnxBackend:
    """A lazily opened ONNX Runtime session: `run(inputs) -> outputs`, providers checked after opening."""

    def __init__(
        self,
        path: Path,
        device: str = "auto",
        threads: Optional[int] = None,
        *,
        precision: str = "fp32",
        tensorrt_options: Optional[Mapping[str, Any]] = None,
    ) -> None:
        self.path = Path(path)
        self.device = device
        self.threads = threads
        self.precision = precision
        self.tensorrt_options = dict(tensorrt_options or {})
        self._session = None

    def requested_providers(self) -> list:
        """The provider list this backend asks onnxruntime for (TensorRT EP options included)."""
        return providers_for(self.device, self.precision, self.tensorrt_options)

    @property
    def session(self):
        """The ONNX Runtime session, opened on first use."""
        if self._session is None:
            ort = _ort()
            requested = self.requested_providers()
            options = ort.SessionOptions()
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            options.log_severity_level = 3
            if self.threads:
                options.intra_op_num_threads = self.threads
            try:
                self._session = ort.InferenceSession(
                    str(self.path), sess_options=options, providers=requested
                )
            except Exception as e:  # onnxruntime raises its own exception types
                raise BackendError(f"{self.path}: onnxruntime cannot load this model: {e}") from e
            wanted = requested[0] if isinstance(requested[0], str) else requested[0][0]
            if wanted not in self._session.get_providers():
                logger.warning(
                    "%s: asked for %s but onnxruntime runs it on %s",
                    self.path.name,
                    wanted,
                    ", ".join(self._session.get_providers()),
                )
        return self._session

    @property
    def providers(self) -> list[str]:
        """Providers the session really uses (not merely those onnxruntime lists as available)."""
        return list(self.session.get_providers())

    def input_names(self) -> list[str]:
        """Names of the model inputs."""
        return [i.name for i in self.session.get_inputs()]

    def output_shape(self, name: str) -> Sequence:
        """Shape the ONNX graph declares for a named output."""
        for out in self.session.get_outputs():
            if out.name == name:
                return out.shape
        raise BackendError(f"{self.path}: no output named {name!r}")

    def run(self, inputs: dict[str, np.ndarray], outputs: Optional[list[str]] = None) -> list[np.ndarray]:
        """Runs one batch and returns the requested outputs (all by default)."""
        return self.session.run(outputs, inputs)
