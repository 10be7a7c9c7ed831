"""Native TensorRT engines built on the device from a bundle's ONNX, cached by GPU, TensorRT version and ONNX hash."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import numpy as np

from .backends import BackendError
from .bundle import Bundle, ModelSpec

__all__ = [
    "ENGINE_DIR",
    "PRECISIONS",
    "TensorRTBackend",
    "build_engine",
    "default_profiles",
    "engine_key",
    "engine_path",
    "ensure_engine",
    "gpu_info",
    "ort_profile_options",
    "strongly_typed",
    "timing_cache_path",
]

logger = logging.getLogger("trapedge")

ENGINE_DIR = ".engines"
PRECISIONS = ("fp32", "fp16", "int8")
DETECTOR_MAX_BATCH = 8
DETECTOR_OPT_BATCH = 1
DEFAULT_MAX_BATCH = 32
DEFAULT_OPT_BATCH = 8
CAMERA_ASPECT = 3 / 4

Shape = tuple[int, ...]
Profile = tuple[Shape, Shape, Shape]
Log = Callable[[str], None]

_JETSON_SM = (("orin", "8.7"), ("xavier", "7.2"), ("tx2", "6.2"), ("nano", "5.3"), ("tx1", "5.3"))
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _tensorrt():
    """The tensorrt module, or a BackendError naming what is missing."""
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


def _trt_major_minor(version: str) -> str:
    return ".".join(str(version).split(".")[:2])


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


def build_engine(
    onnx_path: Path,
    out_path: Path,
    profiles: Mapping[str, Sequence[Sequence[int]]],
    *,
    fp16: bool = True,
    timing_cache: Optional[Path] = None,
    workspace_bytes: int = 1 << 30,
    log: Log = print,
) -> Path:
    """Builds and writes a serialised engine (TensorRT 10 weakly typed with FP16, or 11 strongly typed)."""
    trt = _tensorrt()
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
    if fp16 and not typed:
        config.set_flag(trt.BuilderFlag.FP16)
    elif fp16:
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
        f"({'strongly typed' if typed else 'fp16' if fp16 else 'fp32'}); this can take minutes")
    started = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise BackendError(f"{onnx_path}: TensorRT {trt.__version__} failed to build an engine (see its log above)")
    seconds = time.perf_counter() - started
    _write_atomic(out_path, bytes(plan))
    if timing_cache is not None:
        _write_atomic(timing_cache, bytes(config.get_timing_cache().serialize()))
    record = {
        "onnx": onnx_path.name,
        "tensorrt": trt.__version__,
        "strongly_typed": typed,
        "fp16_flag": bool(fp16 and not typed),
        "profiles": {k: [list(s) for s in _check_profile(k, v)] for k, v in profiles.items()},
        "workspace_bytes": int(workspace_bytes),
        "build_seconds": round(seconds, 2),
    }
    _write_atomic(out_path.with_suffix(".json"), (json.dumps(record, indent=2) + "\n").encode())
    log(f"built {out_path.name} in {seconds:.0f} s")
    return out_path


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def ensure_engine(
    bundle: Bundle,
    model_name: str,
    *,
    fp16: bool = True,
    batch: Optional[int] = None,
    workspace_bytes: int = 1 << 30,
    log: Log = print,
) -> Path:
    """The cached engine for a bundle model on this GPU and TensorRT, built first if missing."""
    trt = _tensorrt()
    spec = bundle.model(model_name)
    source, precision = spec, "fp16" if fp16 else "fp32"
    if fp16 and strongly_typed(trt):
        if bundle.has_model(f"{model_name}_fp16"):
            source = bundle.model(f"{model_name}_fp16")
        else:
            log(f"TensorRT {trt.__version__} needs an fp16 ONNX for fp16 and the bundle has no "
                f"{model_name}_fp16 model; building fp32")
            precision = "fp32"
    profiles = default_profiles(spec, batch=batch)
    info = gpu_info()
    gpu, sm = info.get("name") or "unknown-gpu", info.get("compute_capability")
    key = engine_key(source.raw["sha256"], gpu, sm, trt.__version__, precision, profiles)
    path = engine_path(bundle.root, model_name, key)
    if path.is_file():
        return path
    return build_engine(source.path, path, profiles, fp16=fp16,
                        timing_cache=timing_cache_path(bundle.root, gpu, sm, trt.__version__),
                        workspace_bytes=workspace_bytes, log=log)


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


def _memory_class() -> type:
    """The device-memory helper to use: cuda-python if importable, else CuPy."""
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
            "TensorRTBackend needs device buffers from cuda-python (pip install cuda-python) or CuPy; "
            "neither is importable"
        ) from None


class TensorRTBackend:
    """A serialised TensorRT engine behind OnnxBackend's interface; the engine is loaded on first use."""

    def __init__(self, path: Path, memory: Optional[Any] = None) -> None:
        self.path = Path(path)
        self._trt = _tensorrt()
        self._memory_factory = (lambda: memory) if memory is not None else _memory_class()
        self._memory: Any = None
        self._engine: Any = None
        self._context: Any = None
        self._inputs: list[str] = []
        self._outputs: list[str] = []
        self._buffers: dict[str, tuple[int, int]] = {}

    @classmethod
    def from_bundle(cls, bundle: Bundle, model_name: str, *, fp16: bool = True, batch: Optional[int] = None,
                    log: Log = print) -> TensorRTBackend:
        """The backend of a bundle model, building and caching its engine when needed."""
        return cls(ensure_engine(bundle, model_name, fp16=fp16, batch=batch, log=log))

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


def _run(command: Sequence[str], timeout: float = 10.0) -> Optional[str]:
    try:
        done = subprocess.run(list(command), capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _read(path: str) -> Optional[str]:
    try:
        return Path(path).read_bytes().replace(b"\x00", b"").decode("utf-8", "replace").strip() or None
    except OSError:
        return None


def gpu_info() -> dict[str, Any]:
    """Best-effort GPU, driver, Jetson and TensorRT facts (nvidia-smi, device tree, nvpmodel); never raises."""
    info: dict[str, Any] = {}
    try:
        smi = _run(["nvidia-smi", "--query-gpu=name,compute_cap,driver_version,memory.total",
                    "--format=csv,noheader,nounits"])
        if smi:
            fields = [f.strip() for f in smi.splitlines()[0].split(",")]
            keys = ("name", "compute_capability", "driver", "memory_mib")
            for key, value in zip(keys, fields):
                if value and not value.startswith("[") and value != "N/A":
                    info[key] = int(value) if key == "memory_mib" and value.isdigit() else value
        model = _read("/proc/device-tree/model")
        if model and ("jetson" in model.lower() or "nvidia" in model.lower()):
            info["jetson_model"] = model
        release = _read("/etc/nv_tegra_release")
        if release:
            info["l4t"] = release.splitlines()[0].lstrip("# ").strip()
        power = _run(["nvpmodel", "-q"], timeout=5)
        if power:
            info["nvpmodel"] = " ".join(line.strip() for line in power.splitlines() if line.strip())
        if "name" not in info or "compute_capability" not in info:
            info.update({k: v for k, v in _cuda_properties().items() if k not in info})
        if "compute_capability" not in info and "jetson_model" in info:
            lowered = info["jetson_model"].lower()
            sm = next((sm for word, sm in _JETSON_SM if word in lowered), None)
            if sm:
                info["compute_capability"] = sm
        if "name" not in info and "jetson_model" in info:
            info["name"] = info["jetson_model"]
        try:
            import tensorrt

            info["tensorrt"] = tensorrt.__version__
        except Exception:  # absent or broken bindings are simply not reported
            pass
    except Exception as e:  # best effort: report what failed instead of raising
        info["error"] = f"{type(e).__name__}: {e}"
    return info


def _cuda_properties() -> dict[str, Any]:
    try:
        try:
            from cuda.bindings import runtime
        except ImportError:
            from cuda import cudart as runtime
        err, count = runtime.cudaGetDeviceCount()
        if err != runtime.cudaError_t.cudaSuccess or not count:
            return {}
        err, props = runtime.cudaGetDeviceProperties(0)
        if err != runtime.cudaError_t.cudaSuccess:
            return {}
        name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else str(props.name)
        return {"name": name.rstrip("\x00"), "compute_capability": f"{props.major}.{props.minor}"}
    except Exception:  # no cuda-python, no driver or no GPU
        return {}
