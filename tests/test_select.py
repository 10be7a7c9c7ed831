"""One device and precision vocabulary for every model (`models.select.open_model`), proved without a GPU.

Availability is faked: `onnxruntime.get_available_providers`, a stand-in `tensorrt` module in `sys.modules` (the
one tests/test_engines.py builds engines with) and the CUDA device probe. Bundles are the demo bundle
(`runtime/demo.py`, real ONNX for the pipeline tests) and the same bundle with stand-in model files that the fake
TensorRT parser reads.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Optional

import pytest

pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from test_engines import _fake_tensorrt, _Memory  # noqa: E402

from trapedge.runtime.demo import build_demo_bundle  # noqa: E402
from trapedge.runtime.models import engines, select  # noqa: E402
from trapedge.runtime.models import tensorrt as native  # noqa: E402
from trapedge.runtime.models.backends import DEVICES, PRECISIONS, BackendError, OnnxBackend  # noqa: E402
from trapedge.runtime.models.bundle import MANIFEST, Bundle, BundleError, sha256_file  # noqa: E402
from trapedge.runtime.models.engines import default_profiles, ort_profile_options  # noqa: E402
from trapedge.runtime.models.select import open_model, tensorrt_route  # noqa: E402
from trapedge.runtime.models.tensorrt import TensorRTBackend  # noqa: E402
from trapedge.runtime.pipeline import Runner, RunOptions  # noqa: E402
from trapedge.runtime.reclassify.embed import HEAD_BATCH, Embedder, head_backend  # noqa: E402
from trapedge.runtime.reclassify.runner import Reclassifier  # noqa: E402

TRT, CUDA, CPU = "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"
GOOD = {"top1_agreement": 0.995, "feature_cosine": 0.999, "count": 40}
FLOOR = {"top1_agreement": 0.99, "feature_cosine": 0.99}
INPUTS = {"detector": ("images", ["batch", 3, "height", "width"]), "classifier": ("crops", ["batch", 480, 480, 3]),
          "encoder": ("pixels", ["batch", 3, 224, 224]), "head": ("embedding", ["batch", 64])}


def _providers(monkeypatch, *names: str) -> None:
    monkeypatch.setattr(ort, "get_available_providers", lambda: list(names))


def _no_native(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)


def _native(monkeypatch, version: str = "10.3.0.30"):
    memory = _Memory()
    trt = _fake_tensorrt(version, fp16_flag=not version.startswith("11"), memory=memory)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(select, "cuda_device", lambda: "Orin")
    monkeypatch.setattr(engines, "gpu_info", lambda: {"name": "Orin", "compute_capability": "8.7"})
    monkeypatch.setattr(native, "memory_class", lambda: (lambda: memory))
    return trt


def _variant(base: str, precision: str, agreement: Optional[dict] = None, floor=None, tensorrt: bool = True) -> dict:
    entry = {"precision": precision, "base_model": base,
             "agreement": agreement or ({"boxes_found": 1.0, "boxes": 9, "found": 9, "count": 5}
                                        if base == "detector" else dict(GOOD)),
             "agreement_floor": floor or ({"boxes_found": 0.9} if base == "detector" else dict(FLOOR))}
    if precision == "int8":
        entry["quantization"] = {"format": "QDQ", "tensorrt": tensorrt, "activations": "int8" if tensorrt else "uint8"}
    return entry


def _stand_in(root: Path, variants: dict[str, dict]) -> Bundle:
    """The demo bundle's files with every model replaced by a stand-in (input shapes as JSON) and given variants."""
    loaded = Bundle.load(root)
    models = {}
    for name in ("detector", "classifier", "encoder", "head", *variants):
        base = name.split("_")[0]
        input_name, shape = INPUTS[base]
        path = root / f"{name}.onnx"
        path.write_text(json.dumps({input_name: [-1 if isinstance(d, str) else d for d in shape]}))
        spec = loaded.manifest["models"].get(base, {})
        models[name] = {"file": path.name, "sha256": f"{len(models):02d}" * 32,
                        "inputs": [{"name": input_name, "dtype": "float32", "shape": shape}],
                        "outputs": spec.get("outputs", [{"name": "embedding", "shape": ["batch", 64]}]),
                        "preprocessing": spec.get("preprocessing", {"size": 224}), **variants.get(name, {})}
    manifest = {**loaded.manifest, "models": models,
                "embedding": {"backbone": "test", "model": "encoder", "output": "embedding", "dim": 64}}
    return Bundle(root, manifest, loaded.labels)


@pytest.fixture()
def demo(tmp_path: Path) -> Path:
    return build_demo_bundle(tmp_path / "demo")


@pytest.fixture()
def full(demo: Path) -> Bundle:
    """Every model, with fp16 and int8 variants where `trapedge quantize` makes them."""
    return _stand_in(demo, {"classifier_fp16": _variant("classifier", "fp16"),
                            "classifier_int8": _variant("classifier", "int8"),
                            "detector_int8": _variant("detector", "int8")})


def _trt_options(backend) -> dict:
    first = backend.requested_providers()[0]
    assert isinstance(first, tuple) and first[0] == TRT, first
    return first[1]


def _shapes(options: dict) -> dict[str, tuple]:
    """trt_profile_*_shapes strings back to {input: (min, opt, max)}."""
    parsed: dict[str, list] = {}
    for which in ("min", "opt", "max"):
        for item in options[f"trt_profile_{which}_shapes"].split(","):
            name, dims = item.split(":")
            parsed.setdefault(name, []).append(tuple(int(d) for d in dims.split("x")))
    return {name: tuple(shapes) for name, shapes in parsed.items()}


def test_vocabulary_is_one_for_every_model():
    assert select.DEVICES == DEVICES == ("auto", "cpu", "cuda", "tensorrt")
    assert select.PRECISIONS == PRECISIONS == ("fp32", "fp16", "int8")
    assert not hasattr(RunOptions(), "engine")


def test_select_rejects_unknown_device_and_precision(full: Bundle):
    with pytest.raises(BackendError, match="unknown device"):
        open_model(full, "classifier", device="tensorrt-native")
    with pytest.raises(BackendError, match="unknown precision"):
        open_model(full, "classifier", device="cpu", precision="bf16")


@pytest.mark.parametrize("device, first", [("cpu", CPU), ("cuda", CUDA), ("auto", CUDA)])
@pytest.mark.parametrize("precision, file", [("fp32", "classifier.onnx"), ("fp16", "classifier_fp16.onnx"),
                                             ("int8", "classifier_int8.onnx")])
def test_cpu_and_cuda_run_the_bundle_variant(monkeypatch, full: Bundle, device: str, first: str,
                                             precision: str, file: str):
    _providers(monkeypatch, TRT, CUDA, CPU)
    backend = open_model(full, "classifier", device=device, precision=precision)
    assert isinstance(backend, OnnxBackend) and backend.path.name == file
    requested = backend.requested_providers()
    assert [p if isinstance(p, str) else p[0] for p in requested] == ([CPU] if first == CPU else [CUDA, CPU])


@pytest.mark.parametrize("precision, file", [("fp32", "classifier.onnx"), ("fp16", "classifier.onnx"),
                                             ("int8", "classifier_int8.onnx")])
def test_tensorrt_ep_flags_profiles_and_caches_per_precision(monkeypatch, full: Bundle, precision: str, file: str):
    _providers(monkeypatch, TRT, CUDA, CPU)
    _no_native(monkeypatch)
    backend = open_model(full, "classifier", device="tensorrt", precision=precision, batch=8)
    assert isinstance(backend, OnnxBackend) and backend.path.name == file
    assert [p if isinstance(p, str) else p[0] for p in backend.requested_providers()] == [TRT, CUDA, CPU]
    options = _trt_options(backend)
    assert options["trt_fp16_enable"] is (precision == "fp16")
    assert options["trt_int8_enable"] is (precision == "int8")
    assert "trt_int8_calibration_table_name" not in options  # QDQ models carry their scales
    profiles = default_profiles(full.model("classifier"), batch=8)
    assert {k: options[k] for k in options if k.startswith("trt_profile_")} == ort_profile_options(profiles)
    engine_cache = Path(options["trt_engine_cache_path"])
    assert options["trt_engine_cache_enable"] and options["trt_timing_cache_enable"]
    assert engine_cache.parent == full.root / ".engines" and precision in engine_cache.name
    assert engine_cache.is_dir() and Path(options["trt_timing_cache_path"]) == full.root / ".engines"


def test_tensorrt_ep_engine_caches_differ_per_precision(monkeypatch, full: Bundle):
    _providers(monkeypatch, TRT, CUDA, CPU)
    _no_native(monkeypatch)
    caches = {_trt_options(open_model(full, "detector", device="tensorrt", precision=p))["trt_engine_cache_path"]
              for p in PRECISIONS}
    assert len(caches) == 3


def test_tensorrt_ep_profiles_equal_the_native_engine_profiles(monkeypatch, full: Bundle):
    _providers(monkeypatch, TRT, CUDA, CPU)
    for name, batch in (("detector", 1), ("classifier", 8), ("encoder", 16), ("head", HEAD_BATCH)):
        _no_native(monkeypatch)
        ep = _shapes(_trt_options(open_model(full, name, device="tensorrt", precision="fp16", batch=batch)))
        trt = _native(monkeypatch)
        backend = open_model(full, name, device="tensorrt", precision="fp16", batch=batch)
        assert isinstance(backend, TensorRTBackend)
        assert trt.calls["profiles"] == [ep], name


@pytest.mark.parametrize("precision, flags, source", [("fp32", [], "classifier.onnx"),
                                                      ("fp16", ["FP16"], "classifier.onnx"),
                                                      ("int8", ["INT8"], "classifier_int8.onnx")])
def test_native_tensorrt_engine_per_precision(monkeypatch, full: Bundle, precision: str, flags: list, source: str):
    _providers(monkeypatch, TRT, CUDA, CPU)
    trt = _native(monkeypatch)
    assert tensorrt_route() == "native"
    backend = open_model(full, "classifier", device="tensorrt", precision=precision)
    assert isinstance(backend, TensorRTBackend) and backend.providers == ["TensorRT 10.3 (native)"]
    assert trt.calls["flags"] == [flags]
    assert f"-trt10.3.0.30-{precision}-" in backend.path.name
    assert json.loads(backend.path.with_suffix(".json").read_text())["onnx"] == source


def test_native_tensorrt_11_takes_precision_from_the_onnx(monkeypatch, full: Bundle):
    trt = _native(monkeypatch, "11.4.0.106")
    fp16 = open_model(full, "classifier", device="tensorrt", precision="fp16")
    int8 = open_model(full, "classifier", device="tensorrt", precision="int8")
    assert trt.calls["flags"] == [[], []]
    assert json.loads(fp16.path.with_suffix(".json").read_text())["onnx"] == "classifier_fp16.onnx"
    assert json.loads(int8.path.with_suffix(".json").read_text())["onnx"] == "classifier_int8.onnx"


def test_missing_variant_is_refused_naming_the_quantize_command(monkeypatch, demo: Path):
    bundle = _stand_in(demo, {})
    _providers(monkeypatch, TRT, CUDA, CPU)
    _no_native(monkeypatch)
    cases = [("classifier", "cpu", "fp16"), ("classifier", "cuda", "int8"), ("detector", "cpu", "int8"),
             ("detector", "tensorrt", "int8"), ("classifier", "tensorrt", "int8")]
    for name, device, precision in cases:
        with pytest.raises(BackendError) as refused:
            open_model(bundle, name, device=device, precision=precision)
        message = str(refused.value)
        assert "\n" not in message and message.startswith(f"{name}: ")
        assert f"trapedge quantize --bundle {demo} --precision {precision}" in message
    open_model(bundle, "classifier", device="tensorrt", precision="fp16")  # an FP16 engine from the fp32 ONNX


def test_int8_variant_below_its_floor_is_refused(monkeypatch, demo: Path):
    low = {"top1_agreement": 0.9, "feature_cosine": 0.999, "count": 40}
    bundle = _stand_in(demo, {"classifier_int8": _variant("classifier", "int8", agreement=low)})
    _providers(monkeypatch, TRT, CUDA, CPU)
    _no_native(monkeypatch)
    for device in ("cpu", "tensorrt"):
        with pytest.raises(BundleError, match=r"classifier_int8.onnx: int8 model.*below the floor.*0\.9000"):
            open_model(bundle, "classifier", device=device, precision="int8")
        open_model(bundle, "classifier", device=device, precision="int8", agreement_floor=0.85)


def test_int8_with_asymmetric_activations_runs_on_cpu_but_not_on_tensorrt(monkeypatch, demo: Path):
    bundle = _stand_in(demo, {"classifier_int8": _variant("classifier", "int8", tensorrt=False)})
    _providers(monkeypatch, TRT, CUDA, CPU)
    _no_native(monkeypatch)
    assert open_model(bundle, "classifier", device="cpu", precision="int8").path.name == "classifier_int8.onnx"
    with pytest.raises(BundleError, match="TensorRT refuses"):
        open_model(bundle, "classifier", device="tensorrt", precision="int8")


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_models_without_variants_run_fp32_on_onnxruntime_and_fp16_on_tensorrt(monkeypatch, full: Bundle,
                                                                               precision: str):
    _providers(monkeypatch, TRT, CUDA, CPU)
    _no_native(monkeypatch)
    logs: list[str] = []
    cuda = open_model(full, "head", device="cuda", precision=precision, log=logs.append)
    assert cuda.path.name == "head.onnx" and cuda.requested_providers()[0][0] == CUDA
    assert logs == [f"head: no {precision} variant; runs fp32 on onnxruntime (cpu/cuda)"]
    logs.clear()
    ep = open_model(full, "encoder", device="tensorrt", precision=precision, log=logs.append)
    assert ep.path.name == "encoder.onnx"
    assert _trt_options(ep)["trt_fp16_enable"] is True and _trt_options(ep)["trt_int8_enable"] is False
    assert logs == (["encoder: no int8 variant; its TensorRT engine is built at fp16"] if precision == "int8" else [])
    detector = open_model(full, "detector", device="cpu", precision="fp16", log=logs.append)
    assert detector.path.name == "detector.onnx" and logs[-1].startswith("detector: no fp16 variant; runs fp32")


def test_encoder_and_head_follow_the_device(monkeypatch, full: Bundle):
    _providers(monkeypatch, TRT, CUDA, CPU)
    _no_native(monkeypatch)
    embedder = Embedder(full, "tensorrt", None, 16, precision="int8")
    options = _trt_options(embedder.backend)
    assert embedder.backend.path.name == "encoder.onnx" and options["trt_fp16_enable"] is True
    assert _shapes(options)["pixels"][2][0] == 32
    head = head_backend(full, "tensorrt", "fp32")
    assert _trt_options(head)["trt_fp16_enable"] is False
    assert _shapes(_trt_options(head))["embedding"][2][0] == HEAD_BATCH
    reclassifier = Reclassifier(full, device="cuda", precision="fp16")
    assert reclassifier.head.path.name == "head.onnx" and reclassifier.head.requested_providers()[0][0] == CUDA
    trt = _native(monkeypatch)
    assert isinstance(Reclassifier(full, device="tensorrt", precision="int8").head, TensorRTBackend)
    assert isinstance(Embedder(full, "tensorrt", precision="fp32").backend.inner, TensorRTBackend)
    assert trt.calls["flags"] == [["FP16"], []]


def test_tensorrt_falls_back_to_the_execution_provider(monkeypatch, full: Bundle):
    _providers(monkeypatch, TRT, CUDA, CPU)
    _no_native(monkeypatch)
    assert tensorrt_route() == "onnxruntime"
    assert isinstance(open_model(full, "classifier", device="tensorrt"), OnnxBackend)
    monkeypatch.setitem(sys.modules, "tensorrt", _fake_tensorrt())
    monkeypatch.setattr(select, "cuda_device", lambda: None)  # the package imports but there is no GPU
    assert tensorrt_route() == "onnxruntime"


def test_tensorrt_without_either_way_is_refused_in_one_line(monkeypatch, full: Bundle):
    _providers(monkeypatch, CPU)
    _no_native(monkeypatch)
    with pytest.raises(BackendError) as refused:
        open_model(full, "classifier", device="tensorrt", precision="fp16")
    message = str(refused.value)
    assert "\n" not in message and "tensorrt is not installed" in message
    assert "this onnxruntime has CPUExecutionProvider" in message and "onnxruntime-gpu" in message
    assert "trapedge[tensorrt]" in message


# --- the pipeline, on the real demo models --------------------------------------------------------------


def _add_variant(root: Path, name: str, entry: dict) -> None:
    base = entry["base_model"]
    shutil.copy(root / f"{base}.onnx", root / f"{name}.onnx")
    manifest = json.loads((root / MANIFEST).read_text())
    manifest["models"][name] = {**manifest["models"][base], "file": f"{name}.onnx",
                                "sha256": sha256_file(root / f"{name}.onnx"), **entry}
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def test_pipeline_refuses_a_missing_variant_instead_of_running_fp32(demo: Path):
    with pytest.raises(BackendError, match=f"classifier: .*trapedge quantize --bundle {demo} --precision fp16"):
        Runner(Bundle.load(demo), RunOptions(device="cpu", precision="fp16", embed=False))
    runner = Runner(Bundle.load(demo), RunOptions(device="cpu", embed=False))
    assert runner.open() == {"detector": [CPU], "classifier": [CPU]}


def test_pipeline_runs_int8_variants_and_refuses_them_below_the_floor(demo: Path):
    _add_variant(demo, "detector_int8", _variant("detector", "int8"))
    _add_variant(demo, "classifier_int8", _variant("classifier", "int8",
                                                   agreement={"top1_agreement": 0.5, "feature_cosine": 0.9,
                                                              "count": 40}))
    with pytest.raises(BundleError, match="classifier_int8.onnx: int8 model.*below the floor"):
        Runner(Bundle.load(demo), RunOptions(device="cpu", precision="int8", embed=False))
    runner = Runner(Bundle.load(demo), RunOptions(device="cpu", precision="int8", agreement_floor=0.0, embed=False))
    assert runner.detector.path.name == "detector_int8.onnx" and runner.classifier.path.name == "classifier_int8.onnx"
    assert runner.open()["classifier"] == [CPU]
