"""Native TensorRT engines built on the device from a bundle's ONNX, cached by GPU, TensorRT version, precision and
ONNX hash; the same optimisation profiles and caches for onnxruntime's TensorRT execution provider."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

from ..atomic import atomic_write_bytes
from .backends import PRECISIONS, BackendError
from .bundle import Bundle, ModelSpec
from .gpu import gpu_info
from .quantized import check_tensorrt, require_variant

__all__ = [
    "ENGINE_DIR",
    "PRECISIONS",
    "build_engine",
    "default_profiles",
    "engine_key",
    "engine_path",
    "ensure_engine",
    "load_tensorrt",
    "ort_cache_dir",
    "ort_profile_options",
    "ort_tensorrt_options",
    "strongly_typed",
    "timing_cache_path",
]

logger = logging.getLogger("trapedge")

ENGINE_DIR = ".engines"
DETECTOR_MAX_BATCH = 8
DETECTOR_OPT_BATCH = 1
DEFAULT_MAX_BATCH = 32
DEFAULT_OPT_BATCH = 8
CAMERA_ASPECT = 3 / 4

Shape = tuple[int, ...]
Profile = tuple[Shape, Shape, Shape]
Log = Callable[[str], None]

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def load_tensorrt() -> Any:
    """The tensorrt module, or a one-line BackendError naming what to install."""
    try:
        import tensorrt
    except ImportError as e:
        raise BackendError(
            "tensorrt is not installed: on Jetson use JetPack's python3-libnvinfer (a venv needs "
            "--system-site-packages), elsewhere pip install 'trapedge[tensorrt]'"
        ) from e
    except OSError as e:
        raise BackendError(f"tensorrt is installed but its libraries do not load: {e}") from e
    return tensorrt


def strongly_typed(trt: Any) -> bool:
    """True for TensorRT 11 and later, which have no FP16 builder flag and take precision from the ONNX."""
    return not hasattr(trt.BuilderFlag, "FP16")


def _check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise BackendError(f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}")


def _slug(text: str, limit: int = 32) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", str(text).lower()).strip("-")
    return slug[:limit].rstrip("-") or "unknown"


def _sm(compute_capability: Union[str, Sequence[int], None]) -> str:
    if compute_capability is None:
        return "unknown"
    if isinstance(compute_capability, str):
        text = compute_capability.strip()
        return text if re.fullmatch(r"\d+\.\d+", text) else "unknown"
    major, minor = compute_capability
    return f"{int(major)}.{int(minor)}"


def _check_profile(name: str, profile: Sequence[Sequence[int]]) -> Profile:
    if len(profile) != 3:
        raise ValueError(f"profile for {name!r} needs (min, opt, max) shapes; got {len(profile)}")
    shapes = tuple(tuple(int(d) for d in shape) for shape in profile)
    if len({len(s) for s in shapes}) != 1:
        raise ValueError(f"profile for {name!r} mixes ranks: {shapes}")
    for lo, opt, hi in zip(*shapes):
        if not 1 <= lo <= opt <= hi:
            raise ValueError(f"profile for {name!r} needs 1 <= min <= opt <= max in every dimension: {shapes}")
    return shapes  # type: ignore[return-value]


def engine_key(
    onnx_sha256: str,
    gpu_name: str,
    compute_capability: Union[str, Sequence[int], None],
    trt_version: str,
    precision: str,
    profiles: Mapping[str, Sequence[Sequence[int]]],
) -> str:
    """Cache key of an engine: readable GPU, SM, TensorRT and precision, then a digest of every component."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
    if not re.fullmatch(r"[0-9a-fA-F]{64}", onnx_sha256 or ""):
        raise ValueError(f"onnx_sha256 must be 64 hex digits; got {onnx_sha256!r}")
    sm = _sm(compute_capability)
    version = re.sub(r"[^0-9A-Za-z.]+", "", str(trt_version)) or "unknown"
    canonical = {
        "onnx": onnx_sha256.lower(),
        "gpu": str(gpu_name).strip(),
        "sm": sm,
        "tensorrt": str(trt_version),
        "precision": precision,
        "profiles": {name: [list(s) for s in _check_profile(name, p)] for name, p in sorted(profiles.items())},
    }
    digest = hashlib.sha256(json.dumps(canonical, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    return f"{_slug(gpu_name)}-sm{sm.replace('.', '')}-trt{version}-{precision}-{digest[:20]}"


def engine_path(bundle_root: Path, model_name: str, key: str) -> Path:
    """Where a model's engine lives: <bundle>/.engines/<model>-<key>.plan."""
    for what, value in (("model name", model_name), ("engine key", key)):
        if not _NAME_RE.match(value):
            raise ValueError(f"{what} {value!r} is not a safe file name")
    return Path(bundle_root) / ENGINE_DIR / f"{model_name}-{key}.plan"


def timing_cache_path(bundle_root: Path, gpu_name: str, compute_capability: Union[str, Sequence[int], None],
                      trt_version: str) -> Path:
    """The timing cache shared by all engines built for one GPU and TensorRT version."""
    sm = _sm(compute_capability).replace(".", "")
    version = re.sub(r"[^0-9A-Za-z.]+", "", str(trt_version)) or "unknown"
    return Path(bundle_root) / ENGINE_DIR / f"timing-{_slug(gpu_name)}-sm{sm}-trt{version}.cache"


def _round_up(value: float, multiple: int) -> int:
    return max(multiple, int(math.ceil(value / multiple)) * multiple)


def default_profiles(spec: Union[ModelSpec, Mapping[str, Any]], *, batch: Optional[int] = None) -> dict[str, Profile]:
    """(min, opt, max) shapes per input: detector batch 1..8 and H/W stride..image_size, others batch 1..32."""
    if isinstance(spec, ModelSpec):
        name, inputs, preprocessing = spec.name, spec.inputs, spec.preprocessing
    else:
        name, inputs, preprocessing = spec.get("name", "model"), spec.get("inputs", []), spec.get("preprocessing", {})
    if not inputs:
        raise BackendError(f"{name}: the manifest declares no inputs, so no TensorRT profile can be chosen")
    if batch is not None and batch < 1:
        raise BackendError(f"{name}: batch must be at least 1; got {batch}")
    stride = int(preprocessing.get("stride", 64))
    size = _round_up(int(preprocessing.get("image_size", 1280)), stride)
    spatial = {"height": (stride, _round_up(size * CAMERA_ASPECT, stride), size), "width": (stride, size, size)}
    profiles: dict[str, Profile] = {}
    for declared in inputs:
        shape = list(declared["shape"])
        is_detector = any(d in spatial for d in shape)
        opt_batch = batch or (DETECTOR_OPT_BATCH if is_detector else DEFAULT_OPT_BATCH)
        max_batch = max(DETECTOR_MAX_BATCH if is_detector else DEFAULT_MAX_BATCH, opt_batch)
        ranges = []
        for dim in shape:
            if isinstance(dim, int):
                ranges.append((dim, dim, dim))
            elif dim == "batch":
                ranges.append((1, opt_batch, max_batch))
            elif dim in spatial:
                ranges.append(spatial[dim])
            else:
                raise BackendError(
                    f"{name}: input {declared['name']!r} has a dynamic dimension {dim!r} with no known range"
                )
        profiles[declared["name"]] = tuple(tuple(r[i] for r in ranges) for i in range(3))  # type: ignore[assignment]
    return profiles


def ort_profile_options(profiles: Mapping[str, Sequence[Sequence[int]]]) -> dict[str, str]:
    """The same profiles as onnxruntime TensorRT EP options (trt_profile_min/opt/max_shapes)."""
    checked = {name: _check_profile(name, p) for name, p in sorted(profiles.items())}
    return {
        f"trt_profile_{which}_shapes": ",".join(
            f"{name}:{'x'.join(str(d) for d in shapes[i])}" for name, shapes in checked.items()
        )
        for i, which in enumerate(("min", "opt", "max"))
    }


def ort_cache_dir(bundle_root: Path, precision: str) -> Path:
    """Where onnxruntime's TensorRT EP keeps a precision's engines: <bundle>/.engines/onnxruntime-<precision>."""
    _check_precision(precision)
    return Path(bundle_root) / ENGINE_DIR / f"onnxruntime-{precision}"


def ort_tensorrt_options(bundle: Bundle, model_name: str, precision: str, *,
                         batch: Optional[int] = None) -> dict[str, Any]:
    """TensorRT EP options for a bundle model: the native engines' profiles, an engine cache per precision and the
    bundle's timing cache (the precision flags themselves come from `providers_for`)."""
    cache = ort_cache_dir(bundle.root, precision)
    return {
        **ort_profile_options(default_profiles(bundle.model(model_name), batch=batch)),
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": str(cache),
        "trt_timing_cache_enable": True,
        "trt_timing_cache_path": str(cache.parent),
    }


def _flags(trt: Any, precision: str, typed: bool) -> list:
    """Builder flags: none when strongly typed (precision is in the ONNX); FP16 for fp16; INT8 for a QDQ int8
    network, which TensorRT 10 needs set for explicit quantization when not strongly typed."""
    if typed or precision == "fp32":
        return []
    return [trt.BuilderFlag.FP16 if precision == "fp16" else trt.BuilderFlag.INT8]


def build_engine(
    onnx_path: Path,
    out_path: Path,
    profiles: Mapping[str, Sequence[Sequence[int]]],
    *,
    precision: str = "fp16",
    timing_cache: Optional[Path] = None,
    workspace_bytes: int = 1 << 30,
    log: Log = print,
) -> Path:
    """Builds and writes a serialised engine: TensorRT 10 weakly typed (FP16 or INT8 flag), 11 strongly typed."""
    _check_precision(precision)
    trt = load_tensorrt()
    onnx_path, out_path = Path(onnx_path), Path(out_path)
    typed = strongly_typed(trt)
    trt_logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(trt_logger)
    flags = 0
    creation = trt.NetworkDefinitionCreationFlag
    if typed and hasattr(creation, "STRONGLY_TYPED"):
        flags |= 1 << int(creation.STRONGLY_TYPED)
    if int(trt.__version__.split(".")[0]) < 10 and hasattr(creation, "EXPLICIT_BATCH"):
        flags |= 1 << int(creation.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, trt_logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)).replace("\n", " ") for i in range(parser.num_errors)]
        first = errors[0] if errors else "no error reported"
        raise BackendError(f"{onnx_path}: TensorRT {trt.__version__} cannot parse this ONNX "
                           f"({len(errors)} errors; first: {first})")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    set_flags = _flags(trt, precision, typed)
    for flag in set_flags:
        config.set_flag(flag)
    if typed and precision == "fp16":
        log(f"TensorRT {trt.__version__} builds strongly typed: precision comes from {onnx_path.name}; "
            "give it an fp16 ONNX (trapedge.export.quantize.quantize_fp16) for fp16 kernels")
    inputs = [network.get_input(i) for i in range(network.num_inputs)]
    names = {t.name for t in inputs}
    unknown = sorted(set(profiles) - names)
    if unknown:
        raise BackendError(f"{onnx_path}: profiles name inputs the network does not have: {', '.join(unknown)}")
    profile = builder.create_optimization_profile()
    for tensor in inputs:
        if tensor.name in profiles:
            lo, opt, hi = _check_profile(tensor.name, profiles[tensor.name])
            profile.set_shape(tensor.name, lo, opt, hi)
        elif any(d < 0 for d in tuple(tensor.shape)):
            raise BackendError(f"{onnx_path}: input {tensor.name!r} has dynamic shape {tuple(tensor.shape)} "
                               "but no profile")
    config.add_optimization_profile(profile)
    if timing_cache is not None:
        timing_cache = Path(timing_cache)
        previous = timing_cache.read_bytes() if timing_cache.is_file() else b""
        config.set_timing_cache(config.create_timing_cache(previous), ignore_mismatch=False)
    log(f"building a TensorRT {trt.__version__} engine for {onnx_path.name} "
        f"({'strongly typed' if typed else precision}); this can take minutes")
    started = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise BackendError(f"{onnx_path}: TensorRT {trt.__version__} failed to build an engine (see its log above)")
    seconds = time.perf_counter() - started
    atomic_write_bytes(out_path, bytes(plan))
    if timing_cache is not None:
        atomic_write_bytes(timing_cache, bytes(config.get_timing_cache().serialize()))
    record = {
        "onnx": onnx_path.name,
        "tensorrt": trt.__version__,
        "precision": precision,
        "strongly_typed": typed,
        "fp16_flag": precision == "fp16" and not typed,
        "int8_flag": precision == "int8" and not typed,
        "profiles": {k: [list(s) for s in _check_profile(k, v)] for k, v in profiles.items()},
        "workspace_bytes": int(workspace_bytes),
        "build_seconds": round(seconds, 2),
    }
    atomic_write_bytes(out_path.with_suffix(".json"), (json.dumps(record, indent=2) + "\n").encode())
    log(f"built {out_path.name} in {seconds:.0f} s")
    return out_path


def ensure_engine(
    bundle: Bundle,
    model_name: str,
    *,
    precision: str = "fp16",
    batch: Optional[int] = None,
    workspace_bytes: int = 1 << 30,
    log: Log = print,
) -> Path:
    """The cached engine for a bundle model at a precision on this GPU and TensorRT, built first if missing:
    fp32 and fp16 from the model's ONNX (TensorRT 11: fp16 from its `_fp16` variant), int8 from its QDQ variant."""
    _check_precision(precision)
    trt = load_tensorrt()
    spec = bundle.model(model_name)
    source, built = spec, precision
    if precision == "int8":
        source = require_variant(bundle, model_name, "int8")
        check_tensorrt(source.raw)
    elif precision == "fp16" and strongly_typed(trt):
        if bundle.has_model(f"{model_name}_fp16"):
            source = bundle.model(f"{model_name}_fp16")
        else:
            log(f"TensorRT {trt.__version__} needs an fp16 ONNX for fp16 and the bundle has no "
                f"{model_name}_fp16 model; building fp32")
            built = "fp32"
    profiles = default_profiles(spec, batch=batch)
    info = gpu_info()
    gpu, sm = info.get("name") or "unknown-gpu", info.get("compute_capability")
    key = engine_key(source.raw["sha256"], gpu, sm, trt.__version__, built, profiles)
    path = engine_path(bundle.root, model_name, key)
    if path.is_file():
        return path
    return build_engine(source.path, path, profiles, precision=built,
                        timing_cache=timing_cache_path(bundle.root, gpu, sm, trt.__version__),
                        workspace_bytes=workspace_bytes, log=log)
