"""Opens a bundle model on a device at a precision: one vocabulary for every model and every backend.

Devices (`DEVICES`): auto (CUDA when this onnxruntime has it, else CPU), cpu, cuda, tensorrt. `tensorrt` runs native
TensorRT engines (`TensorRTBackend`) when the tensorrt package imports and a CUDA device is visible; otherwise
onnxruntime's TensorRT execution provider when this onnxruntime has it; otherwise it is refused, naming what to
install.

Precisions (`PRECISIONS`):
- fp32: the base model; on TensorRT an fp32 engine (no FP16 flag; the EP's trt_fp16_enable off).
- fp16: on TensorRT an FP16 engine built from the fp32 ONNX (TensorRT 11, strongly typed, builds from the
  `{name}_fp16` variant when the bundle has one); on cpu/cuda the bundle's `{name}_fp16` variant.
- int8: the bundle's `{name}_int8` QDQ variant, refused below its agreement floor; on TensorRT also refused unless
  its activations are symmetric int8, and the engine is built from that QDQ model (TensorRT 10 weakly typed: the
  INT8 builder flag; TensorRT 11: strongly typed, no flag; the EP: trt_int8_enable).
- A variant `trapedge quantize` makes for the model (fp16: classifier; int8: classifier, detector) but the bundle
  lacks is refused with the command that makes it: `trapedge quantize --bundle <root> --precision <p>`.
- A model with no variant at that precision (encoder, head; the detector at fp16): on TensorRT built at fp16 when
  fp16 or int8 is asked for, on cpu/cuda run fp32; one line through `log` says so.
- On the TensorRT EP every model gets the native engines' optimisation profiles (`engines.default_profiles`), an
  engine cache per precision and the timing cache under `<bundle>/.engines`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Optional, Union

from .backends import DEVICES, PRECISIONS, BackendError, OnnxBackend, available_providers
from .bundle import Bundle
from .engines import load_tensorrt, ort_tensorrt_options
from .gpu import cuda_device
from .quantized import check_agreement, check_tensorrt, makes_variant, require_variant
from .tensorrt import TensorRTBackend

__all__ = ["DEVICES", "PRECISIONS", "open_model", "tensorrt_route"]

logger = logging.getLogger("trapedge")

Backend = Union[OnnxBackend, TensorRTBackend]
Log = Callable[[str], None]

_TRT_EP = "TensorrtExecutionProvider"


def tensorrt_route() -> str:
    """How `--device tensorrt` runs here: 'native' or 'onnxruntime'; a one-line BackendError when neither can."""
    try:
        load_tensorrt()
        native = None if cuda_device() else "the tensorrt package imports but no CUDA device is visible"
    except BackendError as e:
        native = str(e)
    if native is None:
        return "native"
    try:
        providers = available_providers()
    except BackendError:
        providers = []
    if _TRT_EP in providers:
        return "onnxruntime"
    raise BackendError(f"--device tensorrt needs native TensorRT or onnxruntime's TensorRT execution provider and "
                       f"neither is here: {native}; this onnxruntime has {', '.join(providers) or 'no providers'} "
                       "(install onnxruntime-gpu built with TensorRT, or 'trapedge[tensorrt]' on a CUDA machine)")


def _choose(bundle: Bundle, name: str, precision: str, tensorrt: bool,
            agreement_floor: Optional[float]) -> tuple[str, str, Optional[str]]:
    """The bundle model whose ONNX is loaded, the precision it runs or is built at, and what to say about it."""
    if precision == "fp32":
        return name, "fp32", None
    if not bundle.has_model(f"{name}_{precision}") and not makes_variant(name, precision):
        if tensorrt:
            note = f"{name}: no int8 variant; its TensorRT engine is built at fp16" if precision == "int8" else None
            return name, "fp16", note
        return name, "fp32", f"{name}: no {precision} variant; runs fp32 on onnxruntime (cpu/cuda)"
    if tensorrt and precision == "fp16":
        return name, "fp16", None
    variant = require_variant(bundle, name, precision)
    check_agreement(variant.raw, agreement_floor)
    if tensorrt:
        check_tensorrt(variant.raw)
    return variant.name, precision, None


def open_model(
    bundle: Bundle,
    name: str,
    *,
    device: str = "auto",
    precision: str = "fp32",
    threads: Optional[int] = None,
    batch: Optional[int] = None,
    agreement_floor: Optional[float] = None,
    log: Log = logger.info,
) -> Backend:
    """The backend that runs a bundle model on a device at a precision, chosen by the rules of this module."""
    if device not in DEVICES:
        raise BackendError(f"unknown device {device!r}; expected one of {', '.join(DEVICES)}")
    if precision not in PRECISIONS:
        raise BackendError(f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
    bundle.model(name)
    route = tensorrt_route() if device == "tensorrt" else None
    model, runs, note = _choose(bundle, name, precision, route is not None, agreement_floor)
    if note:
        log(note)
    if route == "native":
        return TensorRTBackend.from_bundle(bundle, name, precision=runs, batch=batch, log=log)
    if route == "onnxruntime":
        options = ort_tensorrt_options(bundle, name, runs, batch=batch)
        Path(options["trt_engine_cache_path"]).mkdir(parents=True, exist_ok=True)
        return OnnxBackend(bundle.model(model).path, "tensorrt", threads, precision=runs, tensorrt_options=options)
    return OnnxBackend(bundle.model(model).path, device, threads, precision=runs)
