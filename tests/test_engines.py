"""TensorRT engines: cache keys, profiles, paths, the missing-package errors, the TensorRT 10/11 build paths per
precision, the native backend and GPU probing.

Without TensorRT (CI, this build box) the build and run code is exercised against a small stand-in module
that records what it is asked; the `gpu` test builds a real engine where TensorRT and a CUDA GPU exist.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from trapedge.runtime.speciesnet import detector as det_ops
from trapedge.runtime.models import engines
from trapedge.runtime.models.backends import BackendError
from trapedge.runtime.models.bundle import Bundle, BundleError, ModelSpec
from trapedge.runtime.models.engines import (
    build_engine,
    default_profiles,
    engine_key,
    engine_path,
    ensure_engine,
    ort_profile_options,
    timing_cache_path,
)
from trapedge.runtime.models.gpu import gpu_info
from trapedge.runtime.models.tensorrt import TensorRTBackend

SHA = "ab" * 32
PROFILES = {"crops": ((1, 480, 480, 3), (8, 480, 480, 3), (32, 480, 480, 3))}
KEY_ARGS = dict(onnx_sha256=SHA, gpu_name="Orin", compute_capability="8.7", trt_version="10.3.0.30",
                precision="fp16", profiles=PROFILES)


def _spec(name: str, shape: list, preprocessing: dict | None = None, input_name: str = "images") -> ModelSpec:
    return ModelSpec(name=name, path=Path(f"{name}.onnx"),
                     inputs=[{"name": input_name, "dtype": "float32", "shape": shape}],
                     outputs=[], preprocessing=preprocessing or {}, raw={})


DETECTOR = _spec("detector", ["batch", 3, "height", "width"], {"image_size": 1280, "stride": 64})
CLASSIFIER = _spec("classifier", ["batch", 480, 480, 3], {"layout": "NHWC", "size": 480}, "crops")


def test_engines_module_imports_neither_torch_nor_tensorrt():
    code = ("import sys, trapedge.runtime.models.engines, trapedge.runtime.models.quantized, "
            "trapedge.runtime.models.tensorrt, trapedge.runtime.models.cuda_memory, trapedge.runtime.models.gpu, "
            "trapedge.runtime.models.select; "
            "print(sorted(m for m in ('torch', 'tensorrt', 'onnx', 'cupy') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_engine_key_is_deterministic_and_ignores_profile_order():
    assert engine_key(**KEY_ARGS) == engine_key(**KEY_ARGS)
    two = {"b": ((1, 4), (2, 4), (3, 4)), "a": ((1, 2), (1, 2), (1, 2))}
    reordered = dict(reversed(list(two.items())))
    assert engine_key(**{**KEY_ARGS, "profiles": two}) == engine_key(**{**KEY_ARGS, "profiles": reordered})
    assert engine_key(**{**KEY_ARGS, "compute_capability": (8, 7)}) == engine_key(**KEY_ARGS)
    assert engine_key(**{**KEY_ARGS, "onnx_sha256": SHA.upper()}) == engine_key(**KEY_ARGS)


@pytest.mark.parametrize("component, value", [
    ("onnx_sha256", "cd" * 32),
    ("gpu_name", "Orin Nano"),
    ("compute_capability", "8.6"),
    ("trt_version", "10.3.0.31"),
    ("precision", "fp32"),
    ("profiles", {"crops": ((1, 480, 480, 3), (4, 480, 480, 3), (32, 480, 480, 3))}),
    ("profiles", {"crops": ((1, 480, 480, 3), (8, 480, 480, 3), (16, 480, 480, 3))}),
    ("profiles", {"images": PROFILES["crops"]}),
])
def test_engine_key_changes_with_every_component(component: str, value: Any):
    assert engine_key(**{**KEY_ARGS, component: value}) != engine_key(**KEY_ARGS)


def test_engine_key_is_a_readable_file_name():
    key = engine_key(**{**KEY_ARGS, "gpu_name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"})
    assert key.startswith("nvidia-h100-80gb-hbm3-sm90-trt10.3.0.30-fp16-")
    assert len(key.rsplit("-", 1)[1]) == 20
    assert "/" not in key and " " not in key


@pytest.mark.parametrize("bad", [
    {"precision": "int4"},
    {"onnx_sha256": "not-a-hash"},
    {"profiles": {"crops": ((8, 480, 480, 3), (1, 480, 480, 3), (32, 480, 480, 3))}},
    {"profiles": {"crops": ((1, 480, 480, 3), (8, 480, 480), (32, 480, 480, 3))}},
    {"profiles": {"crops": ((1, 480, 480, 3), (8, 480, 480, 3))}},
])
def test_engine_key_rejects_bad_components(bad: dict):
    with pytest.raises(ValueError):
        engine_key(**{**KEY_ARGS, **bad})


def test_engine_path_layout(tmp_path: Path):
    key = engine_key(**KEY_ARGS)
    path = engine_path(tmp_path, "classifier", key)
    assert path == tmp_path / ".engines" / f"classifier-{key}.plan"
    cache = timing_cache_path(tmp_path, "Orin", "8.7", "10.3.0.30")
    assert cache == tmp_path / ".engines" / "timing-orin-sm87-trt10.3.0.30.cache"
    for bad in ("../classifier", "a/b", ""):
        with pytest.raises(ValueError):
            engine_path(tmp_path, bad, key)


def test_detector_profile_covers_dynamic_height_width_and_batch():
    lo, opt, hi = default_profiles(DETECTOR)["images"]
    assert lo == (1, 3, 64, 64)
    assert opt == (1, 3, 960, 1280)
    assert hi == (8, 3, 1280, 1280)
    assert all(d % 64 == 0 for shape in (lo, opt, hi) for d in shape[2:])
    assert default_profiles(DETECTOR, batch=4)["images"][1][0] == 4
    assert default_profiles(DETECTOR, batch=16)["images"][2][0] == 16


@pytest.mark.parametrize("height, width", [(1440, 2048), (1536, 2048), (1080, 1920), (2048, 1536),
                                           (3000, 4000), (720, 2560), (1280, 1280), (500, 375)])
def test_every_letterboxed_shape_fits_the_detector_profile(height: int, width: int):
    lo, _, hi = default_profiles(DETECTOR)["images"]
    config = det_ops.DetectorConfig()
    boxed = det_ops.letterbox(np.zeros((height, width, 3), np.uint8), config)
    h, w = boxed.shape
    assert h % config.stride == 0 and w % config.stride == 0
    assert lo[2] <= h <= hi[2] and lo[3] <= w <= hi[3]


def test_classifier_encoder_and_head_profiles():
    assert default_profiles(CLASSIFIER) == {
        "crops": ((1, 480, 480, 3), (8, 480, 480, 3), (32, 480, 480, 3))}
    encoder = _spec("encoder", ["batch", 3, 224, 224])
    assert default_profiles(encoder)["images"] == ((1, 3, 224, 224), (8, 3, 224, 224), (32, 3, 224, 224))
    head = {"name": "head", "inputs": [{"name": "embedding", "shape": ["batch", 768]}]}
    assert default_profiles(head)["embedding"] == ((1, 768), (8, 768), (32, 768))
    assert default_profiles(CLASSIFIER, batch=64)["crops"][2][0] == 64


def test_profiles_as_onnxruntime_tensorrt_options():
    options = ort_profile_options(default_profiles(DETECTOR, batch=4))
    assert options == {"trt_profile_min_shapes": "images:1x3x64x64",
                       "trt_profile_opt_shapes": "images:4x3x960x1280",
                       "trt_profile_max_shapes": "images:8x3x1280x1280"}
    two = ort_profile_options({"b": ((1, 2), (1, 2), (1, 2)), "a": ((1,), (2,), (3,))})
    assert two["trt_profile_max_shapes"] == "a:3,b:1x2"


def test_unknown_dynamic_dimension_has_no_profile():
    with pytest.raises(BackendError, match="tokens"):
        default_profiles(_spec("text", ["batch", "tokens"]))
    with pytest.raises(BackendError, match="no inputs"):
        default_profiles({"name": "empty", "inputs": []})
    with pytest.raises(BackendError, match="at least 1"):
        default_profiles(CLASSIFIER, batch=0)


def test_without_tensorrt_backend_and_builder_raise_one_line(monkeypatch, tmp_path: Path):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    for call in (lambda: TensorRTBackend(tmp_path / "x.plan"),
                 lambda: build_engine(tmp_path / "x.onnx", tmp_path / "x.plan", PROFILES)):
        with pytest.raises(BackendError) as raised:
            call()
        message = str(raised.value)
        assert "\n" not in message and "tensorrt is not installed" in message


def test_without_device_buffers_backend_names_both_options(monkeypatch, tmp_path: Path):
    monkeypatch.setitem(sys.modules, "tensorrt", _fake_tensorrt())
    for name in ("cuda", "cuda.bindings", "cuda.bindings.runtime", "cuda.cudart", "cupy"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(BackendError, match="cuda-python.*CuPy"):
        TensorRTBackend(tmp_path / "x.plan")


def test_gpu_info_never_raises_without_a_gpu(monkeypatch, tmp_path: Path):
    monkeypatch.setenv("PATH", str(tmp_path))
    info = gpu_info()
    assert isinstance(info, dict)
    assert "error" not in info


def test_gpu_info_reads_nvidia_smi(monkeypatch, tmp_path: Path):
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'NVIDIA H100 80GB HBM3, 9.0, 550.54.15, 81559'\n")
    smi.chmod(smi.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ.get('PATH', '')}")
    info = gpu_info()
    assert info["name"] == "NVIDIA H100 80GB HBM3"
    assert info["compute_capability"] == "9.0"
    assert info["driver"] == "550.54.15" and info["memory_mib"] == 81559


# A stand-in for the tensorrt module: enough of the TensorRT 10/11 Python API for build_engine and
# TensorRTBackend, with "engines" that double their input and sum its rows.


class _Memory:
    """Host bytearrays posing as device memory."""

    stream = 7

    def __init__(self) -> None:
        self.blocks: dict[int, bytearray] = {}
        self.freed: list[int] = []

    def alloc(self, nbytes: int) -> int:
        ptr = 0x1000 * (len(self.blocks) + 1)
        self.blocks[ptr] = bytearray(nbytes)
        return ptr

    def free(self, ptr: int) -> None:
        self.freed.append(ptr)

    def to_device(self, ptr: int, host: np.ndarray) -> None:
        self.blocks[ptr][: host.nbytes] = host.tobytes()

    def to_host(self, host: np.ndarray, ptr: int) -> None:
        host[...] = np.frombuffer(bytes(self.blocks[ptr][: host.nbytes]), host.dtype).reshape(host.shape)

    def synchronize(self) -> None:
        pass

    def read(self, ptr: int, shape: tuple, dtype=np.float32) -> np.ndarray:
        count = int(np.prod(shape))
        return np.frombuffer(bytes(self.blocks[ptr][: count * 4]), dtype).reshape(shape)


def _fake_tensorrt(version: str = "10.3.0.30", fp16_flag: bool = True, memory: _Memory | None = None):
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.calls = {"builds": 0, "flags": [], "network_flags": [], "profiles": [], "timing": []}
    trt.memory = memory

    class Logger:
        WARNING = 2

        def __init__(self, level: int) -> None:
            self.level = level

    class BuilderFlag:
        pass

    if fp16_flag:
        BuilderFlag.FP16 = "FP16"
        BuilderFlag.INT8 = "INT8"

    class NetworkDefinitionCreationFlag:
        EXPLICIT_BATCH = 0
        STRONGLY_TYPED = 1

    class MemoryPoolType:
        WORKSPACE = "WORKSPACE"

    class TensorIOMode:
        INPUT = "INPUT"
        OUTPUT = "OUTPUT"

    class Tensor:
        def __init__(self, name: str, shape: tuple) -> None:
            self.name, self.shape = name, shape

    class Network:
        def __init__(self, flags: int) -> None:
            self.flags, self.inputs = flags, []

        @property
        def num_inputs(self) -> int:
            return len(self.inputs)

        def get_input(self, i: int) -> Tensor:
            return self.inputs[i]

    class OnnxParser:
        def __init__(self, network: Network, logger: Logger) -> None:
            self.network, self.errors = network, []

        def parse_from_file(self, path: str) -> bool:
            text = Path(path).read_text()
            if text.startswith("BAD"):
                self.errors = ["In node 3 (Foo): unsupported operator\nmore", "second"]
                return False
            self.network.inputs = [Tensor(k, tuple(v)) for k, v in json.loads(text).items()]
            return True

        @property
        def num_errors(self) -> int:
            return len(self.errors)

        def get_error(self, i: int) -> str:
            return self.errors[i]

    class Profile:
        def __init__(self) -> None:
            self.shapes = {}

        def set_shape(self, name: str, lo, opt, hi) -> None:
            self.shapes[name] = (tuple(lo), tuple(opt), tuple(hi))

    class TimingCache:
        def __init__(self, data: bytes) -> None:
            self.data = data

        def serialize(self) -> bytes:
            return self.data + b"+"

    class Config:
        def __init__(self) -> None:
            self.flags, self.profiles, self.cache, self.pool = [], [], None, {}

        def set_memory_pool_limit(self, pool: str, size: int) -> None:
            self.pool[pool] = size

        def set_flag(self, flag: str) -> None:
            self.flags.append(flag)

        def add_optimization_profile(self, profile: Profile) -> None:
            self.profiles.append(profile)

        def create_timing_cache(self, data: bytes) -> TimingCache:
            trt.calls["timing"].append(bytes(data))
            return TimingCache(bytes(data))

        def set_timing_cache(self, cache: TimingCache, ignore_mismatch: bool) -> None:
            self.cache = cache

        def get_timing_cache(self) -> TimingCache:
            return self.cache

    class Builder:
        def __init__(self, logger: Logger) -> None:
            pass

        def create_network(self, flags: int) -> Network:
            trt.calls["network_flags"].append(flags)
            return Network(flags)

        def create_builder_config(self) -> Config:
            return Config()

        def create_optimization_profile(self) -> Profile:
            return Profile()

        def build_serialized_network(self, network: Network, config: Config):
            trt.calls["builds"] += 1
            trt.calls["flags"].append(list(config.flags))
            trt.calls["profiles"].append(config.profiles[0].shapes)
            return b"PLAN" + json.dumps({n: s for n, s in config.profiles[0].shapes.items()}).encode()

    class Context:
        def __init__(self, engine: Engine) -> None:
            self.engine, self.shapes, self.addresses = engine, {}, {}

        def set_input_shape(self, name: str, shape: tuple) -> bool:
            lo, _, hi = self.engine.get_tensor_profile_shape(name, 0)
            if not all(a <= d <= b for a, d, b in zip(lo, shape, hi)) or len(shape) != len(lo):
                return False
            self.shapes[name] = tuple(shape)
            return True

        def set_tensor_address(self, name: str, ptr: int) -> None:
            self.addresses[name] = ptr

        def get_tensor_shape(self, name: str) -> tuple:
            batch = self.shapes["x"][0]
            return (batch, 4) if name == "y" else (batch,)

        def execute_async_v3(self, stream: int) -> bool:
            assert stream == trt.memory.stream
            x = trt.memory.read(self.addresses["x"], self.shapes["x"])
            trt.memory.to_device(self.addresses["y"], (2 * x).astype(np.float32))
            trt.memory.to_device(self.addresses["z"], x.sum(axis=1).astype(np.float32))
            return True

    class Engine:
        names = ("x", "y", "z")

        @property
        def num_io_tensors(self) -> int:
            return 3

        def get_tensor_name(self, i: int) -> str:
            return self.names[i]

        def get_tensor_mode(self, name: str) -> str:
            return TensorIOMode.INPUT if name == "x" else TensorIOMode.OUTPUT

        def get_tensor_dtype(self, name: str) -> str:
            return "float32"

        def get_tensor_shape(self, name: str) -> tuple:
            return (-1, 4) if name in ("x", "y") else (-1,)

        def get_tensor_profile_shape(self, name: str, index: int) -> list:
            return [(1, 4), (4, 4), (64, 4)]

        def create_execution_context(self) -> Context:
            return Context(self)

    class Runtime:
        def __init__(self, logger: Logger) -> None:
            pass

        def deserialize_cuda_engine(self, plan: bytes):
            return Engine() if plan.startswith(b"PLAN") else None

    for obj in (Logger, BuilderFlag, NetworkDefinitionCreationFlag, MemoryPoolType, TensorIOMode, OnnxParser,
                Builder, Runtime):
        setattr(trt, obj.__name__, obj)
    trt.nptype = lambda dtype: np.dtype(dtype).type
    return trt


def _fake_onnx(path: Path, inputs: dict[str, list[int]]) -> Path:
    path.write_text(json.dumps(inputs))
    return path


def test_build_engine_tensorrt10_sets_fp16_and_keeps_a_timing_cache(monkeypatch, tmp_path: Path):
    trt = _fake_tensorrt("10.3.0.30", fp16_flag=True)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    onnx_path = _fake_onnx(tmp_path / "m.onnx", {"crops": [-1, 480, 480, 3]})
    cache = tmp_path / ".engines" / "timing.cache"
    logs: list[str] = []
    out = build_engine(onnx_path, tmp_path / ".engines" / "m.plan", PROFILES, timing_cache=cache, log=logs.append)
    assert out.read_bytes().startswith(b"PLAN")
    assert trt.calls["flags"] == [["FP16"]] and trt.calls["network_flags"] == [0]
    assert trt.calls["profiles"] == [PROFILES]
    assert cache.read_bytes() == b"+"
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["tensorrt"] == "10.3.0.30" and record["fp16_flag"] and not record["strongly_typed"]
    build_engine(onnx_path, tmp_path / ".engines" / "m2.plan", PROFILES, timing_cache=cache, log=logs.append)
    assert trt.calls["timing"] == [b"", b"+"] and cache.read_bytes() == b"++"
    build_engine(onnx_path, tmp_path / "m3.plan", PROFILES, precision="fp32", log=logs.append)
    assert trt.calls["flags"][-1] == []
    assert json.loads((tmp_path / "m3.json").read_text())["fp16_flag"] is False


def test_build_engine_tensorrt10_int8_sets_only_the_int8_flag(monkeypatch, tmp_path: Path):
    trt = _fake_tensorrt("10.3.0.30", fp16_flag=True)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    onnx_path = _fake_onnx(tmp_path / "m_int8.onnx", {"crops": [-1, 480, 480, 3]})
    out = build_engine(onnx_path, tmp_path / "m.plan", PROFILES, precision="int8", log=lambda _: None)
    assert trt.calls["flags"] == [["INT8"]] and trt.calls["network_flags"] == [0]
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["precision"] == "int8" and record["int8_flag"] and not record["fp16_flag"]
    with pytest.raises(BackendError, match="unknown precision"):
        build_engine(onnx_path, tmp_path / "x.plan", PROFILES, precision="int4", log=lambda _: None)


def test_build_engine_tensorrt11_is_strongly_typed(monkeypatch, tmp_path: Path):
    trt = _fake_tensorrt("11.4.0.106", fp16_flag=False)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    onnx_path = _fake_onnx(tmp_path / "m.onnx", {"crops": [-1, 480, 480, 3]})
    logs: list[str] = []
    out = build_engine(onnx_path, tmp_path / "m.plan", PROFILES, log=logs.append)
    assert trt.calls["flags"] == [[]]
    assert trt.calls["network_flags"] == [1 << 1]
    assert any("strongly typed" in line and "fp16 ONNX" in line for line in logs)
    assert json.loads(out.with_suffix(".json").read_text())["strongly_typed"] is True
    build_engine(onnx_path, tmp_path / "q.plan", PROFILES, precision="int8", log=logs.append)
    assert trt.calls["flags"][-1] == [] and trt.calls["network_flags"][-1] == 1 << 1


def test_build_engine_reports_parse_errors_and_missing_profiles(monkeypatch, tmp_path: Path):
    monkeypatch.setitem(sys.modules, "tensorrt", _fake_tensorrt())
    bad = tmp_path / "bad.onnx"
    bad.write_text("BAD")
    with pytest.raises(BackendError) as raised:
        build_engine(bad, tmp_path / "bad.plan", PROFILES, log=lambda _: None)
    assert "\n" not in str(raised.value) and "2 errors" in str(raised.value)
    dynamic = _fake_onnx(tmp_path / "d.onnx", {"images": [-1, 3, -1, -1]})
    with pytest.raises(BackendError, match="no profile"):
        build_engine(dynamic, tmp_path / "d.plan", {}, log=lambda _: None)
    with pytest.raises(BackendError, match="does not have: crops"):
        build_engine(dynamic, tmp_path / "d.plan", PROFILES, log=lambda _: None)
    assert not (tmp_path / "d.plan").exists()


def _engine_file(tmp_path: Path) -> Path:
    plan = tmp_path / "m.plan"
    plan.write_bytes(b"PLAN{}")
    return plan


def test_backend_runs_an_engine_like_onnx_backend(monkeypatch, tmp_path: Path):
    memory = _Memory()
    monkeypatch.setitem(sys.modules, "tensorrt", _fake_tensorrt("10.3.0.30", memory=memory))
    backend = TensorRTBackend(_engine_file(tmp_path), memory=memory)
    assert backend.providers == ["TensorRT 10.3 (native)"]
    assert backend.input_names() == ["x"]
    assert backend.output_shape("y") == [None, 4]
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    y, z = backend.run({"x": x})
    np.testing.assert_array_equal(y, 2 * x)
    np.testing.assert_array_equal(z, x.sum(axis=1))
    (only,) = backend.run({"x": x[:1].astype(np.float64)}, ["z"])
    np.testing.assert_array_equal(only, x[:1].sum(axis=1))
    big = np.ones((64, 4), np.float32)
    np.testing.assert_array_equal(backend.run({"x": big}, ["y"])[0], 2 * big)
    assert memory.freed, "buffers grow by reallocating"
    backend.close()


def test_backend_errors_are_one_line(monkeypatch, tmp_path: Path):
    memory = _Memory()
    monkeypatch.setitem(sys.modules, "tensorrt", _fake_tensorrt(memory=memory))
    backend = TensorRTBackend(_engine_file(tmp_path), memory=memory)
    cases = [({"x": np.ones((65, 4), np.float32)}, None, "outside the engine's profile"),
             ({"x": np.ones((2, 4), np.float32)}, ["nope"], "no output"),
             ({}, None, "missing input")]
    for inputs, outputs, expected in cases:
        with pytest.raises(BackendError, match=expected) as raised:
            backend.run(inputs, outputs)
        assert "\n" not in str(raised.value)
    with pytest.raises(BackendError, match="no output named"):
        backend.output_shape("nope")
    stale = tmp_path / "stale.plan"
    stale.write_bytes(b"OLD")
    with pytest.raises(BackendError, match="delete it to rebuild"):
        TensorRTBackend(stale, memory=memory).input_names()


def _bundle(tmp_path: Path, with_fp16: bool, int8_tensorrt: bool | None = None) -> Bundle:
    models = {"classifier": {"file": "classifier.onnx", "sha256": "11" * 32, "inputs": CLASSIFIER.inputs,
                             "preprocessing": CLASSIFIER.preprocessing}}
    _fake_onnx(tmp_path / "classifier.onnx", {"crops": [-1, 480, 480, 3]})
    if with_fp16:
        models["classifier_fp16"] = {**models["classifier"], "file": "classifier_fp16.onnx", "sha256": "22" * 32,
                                     "precision": "fp16", "base_model": "classifier"}
        _fake_onnx(tmp_path / "classifier_fp16.onnx", {"crops": [-1, 480, 480, 3]})
    if int8_tensorrt is not None:
        models["classifier_int8"] = {**models["classifier"], "file": "classifier_int8.onnx", "sha256": "33" * 32,
                                     "precision": "int8", "base_model": "classifier",
                                     "quantization": {"format": "QDQ", "tensorrt": int8_tensorrt,
                                                      "activations": "int8" if int8_tensorrt else "uint8"}}
        _fake_onnx(tmp_path / "classifier_int8.onnx", {"crops": [-1, 480, 480, 3]})
    return Bundle(tmp_path, {"models": models, "files": {}}, [])


@pytest.mark.parametrize("version, fp16_flag", [("10.3.0.30", True), ("11.4.0.106", False)])
def test_ensure_engine_builds_once_per_key(monkeypatch, tmp_path: Path, version: str, fp16_flag: bool):
    trt = _fake_tensorrt(version, fp16_flag=fp16_flag)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(engines, "gpu_info", lambda: {"name": "Orin", "compute_capability": "8.7"})
    bundle = _bundle(tmp_path, with_fp16=True)
    first = ensure_engine(bundle, "classifier", log=lambda _: None)
    assert first.parent == tmp_path / ".engines" and first.name.startswith(f"classifier-orin-sm87-trt{version}-fp16-")
    assert ensure_engine(bundle, "classifier", log=lambda _: None) == first
    assert trt.calls["builds"] == 1
    assert trt.calls["profiles"] == [default_profiles(bundle.model("classifier"))]
    source = "22" * 32 if not fp16_flag else "11" * 32
    expected = engine_key(source, "Orin", "8.7", version, "fp16", default_profiles(bundle.model("classifier")))
    assert first.name == f"classifier-{expected}.plan"
    assert list((tmp_path / ".engines").glob("timing-orin-sm87-*.cache"))
    ensure_engine(bundle, "classifier", batch=4, log=lambda _: None)
    assert trt.calls["builds"] == 2


def test_ensure_engine_on_tensorrt11_without_an_fp16_onnx_builds_fp32(monkeypatch, tmp_path: Path):
    monkeypatch.setitem(sys.modules, "tensorrt", _fake_tensorrt("11.4.0.106", fp16_flag=False))
    monkeypatch.setattr(engines, "gpu_info", lambda: {})
    logs: list[str] = []
    path = ensure_engine(_bundle(tmp_path, with_fp16=False), "classifier", log=logs.append)
    assert "-smunknown-trt11.4.0.106-fp32-" in path.name
    assert any("no classifier_fp16 model" in line for line in logs)


@pytest.mark.parametrize("version, fp16_flag", [("10.3.0.30", True), ("11.4.0.106", False)])
def test_ensure_engine_keys_and_builds_each_precision(monkeypatch, tmp_path: Path, version: str, fp16_flag: bool):
    trt = _fake_tensorrt(version, fp16_flag=fp16_flag)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(engines, "gpu_info", lambda: {"name": "Orin", "compute_capability": "8.7"})
    bundle = _bundle(tmp_path, with_fp16=False, int8_tensorrt=True)
    paths = {p: ensure_engine(bundle, "classifier", precision=p, log=lambda _: None) for p in ("fp32", "int8")}
    assert len(set(paths.values())) == 2 and trt.calls["builds"] == 2
    assert f"-trt{version}-int8-" in paths["int8"].name and f"-trt{version}-fp32-" in paths["fp32"].name
    profiles = default_profiles(bundle.model("classifier"))
    assert paths["int8"].name == f"classifier-{engine_key('33' * 32, 'Orin', '8.7', version, 'int8', profiles)}.plan"
    assert trt.calls["flags"] == ([[], ["INT8"]] if fp16_flag else [[], []])
    assert json.loads(paths["int8"].with_suffix(".json").read_text())["onnx"] == "classifier_int8.onnx"


def test_ensure_engine_int8_needs_a_tensorrt_ready_qdq_variant(monkeypatch, tmp_path: Path):
    monkeypatch.setitem(sys.modules, "tensorrt", _fake_tensorrt())
    monkeypatch.setattr(engines, "gpu_info", lambda: {})
    with pytest.raises(BackendError) as missing:
        ensure_engine(_bundle(tmp_path, with_fp16=False), "classifier", precision="int8", log=lambda _: None)
    assert f"trapedge quantize --bundle {tmp_path} --precision int8" in str(missing.value)
    with pytest.raises(BundleError, match="TensorRT refuses"):
        ensure_engine(_bundle(tmp_path, with_fp16=False, int8_tensorrt=False), "classifier", precision="int8",
                      log=lambda _: None)
    with pytest.raises(BackendError, match="unknown precision"):
        ensure_engine(_bundle(tmp_path, with_fp16=False), "classifier", precision="bf16", log=lambda _: None)


def test_from_bundle_refuses_before_building_without_device_buffers(monkeypatch, tmp_path: Path):
    trt = _fake_tensorrt()
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    for name in ("cuda", "cuda.bindings", "cuda.bindings.runtime", "cuda.cudart", "cupy"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(BackendError, match="cuda-python.*CuPy"):
        TensorRTBackend.from_bundle(_bundle(tmp_path, with_fp16=False), "classifier", precision="fp16")
    assert trt.calls["builds"] == 0


def _cuda_gpu() -> str | None:
    info = gpu_info()
    return info.get("name")


def _tiny_onnx(path: Path) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = {"w": rng.standard_normal((8, 3, 3, 3)).astype(np.float32) * 0.3,
               "b": rng.standard_normal(8).astype(np.float32) * 0.1,
               "fc": rng.standard_normal((5, 8)).astype(np.float32), "fcb": np.zeros(5, np.float32)}
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("GlobalAveragePool", ["r"], ["p"]),
             helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("Gemm", ["f", "fc", "fcb"], ["logits"], transB=1)]
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 32, 32])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 5])],
        [numpy_helper.from_array(v, k) for k, v in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


@pytest.mark.gpu
@pytest.mark.tensorrt
@pytest.mark.parametrize("precision, tolerance", [("fp32", 1e-3), ("fp16", 3e-2)])
def test_real_engine_matches_onnxruntime(tmp_path: Path, precision: str, tolerance: float):
    pytest.importorskip("tensorrt", reason="TensorRT Python bindings are not installed")
    if _cuda_gpu() is None:
        pytest.skip("no CUDA GPU visible (nvidia-smi / cuda-python found none)")
    ort = pytest.importorskip("onnxruntime")
    model = _tiny_onnx(tmp_path / "tiny.onnx")
    profiles = {"x": ((1, 3, 32, 32), (2, 3, 32, 32), (4, 3, 32, 32))}
    plan = build_engine(model, tmp_path / ".engines" / "tiny.plan", profiles, precision=precision,
                        timing_cache=tmp_path / ".engines" / "timing.cache", log=lambda _: None)
    backend = TensorRTBackend(plan)
    x = np.random.default_rng(1).random((3, 3, 32, 32), dtype=np.float32)
    (got,) = backend.run({"x": x}, ["logits"])
    (want,) = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(["logits"], {"x": x})
    np.testing.assert_allclose(got, want, atol=tolerance, rtol=tolerance)
    assert backend.providers[0].startswith("TensorRT ") and backend.input_names() == ["x"]
    backend.close()
