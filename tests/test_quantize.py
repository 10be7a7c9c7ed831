"""fp16 and dynamic int8 copies of bundle models: files, agreement numbers, manifest records and refusal."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from trapedge.export.quantize import (  # noqa: E402
    CONV_OP_TYPES,
    add_quantized_model,
    agreement,
    quantize_fp16,
    quantize_int8_dynamic,
)
from trapedge.runtime.bundle import Bundle, BundleError, sha256_file  # noqa: E402
from trapedge.runtime.classifier import preprocess_crop, to_network_input  # noqa: E402
from trapedge.runtime.quantized import check_agreement, is_quantized  # noqa: E402

NUM_CLASSES = 12
CROP = 480
FEATURES = 32


class TinyCNN(torch.nn.Module):
    """NHWC crops -> (logits, pooled features), the shape of SpeciesNet's exported classifier."""

    def __init__(self) -> None:
        super().__init__()
        layers: list[torch.nn.Module] = []
        channels = 3
        for i, width in enumerate((8, 16, FEATURES)):
            layers += [torch.nn.Conv2d(channels, width, 3, stride=4 if i == 0 else 2, padding=1, bias=False),
                       torch.nn.BatchNorm2d(width), torch.nn.ReLU()]
            channels = width
        self.body = torch.nn.Sequential(*layers)
        self.head = torch.nn.Linear(FEATURES, NUM_CLASSES)

    def forward(self, crops: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.body(crops.permute(0, 3, 1, 2)).mean(dim=(2, 3))
        return self.head(features), features


def _export(module: torch.nn.Module, example: torch.Tensor, path: Path, input_name: str,
            output_names: list[str]) -> Path:
    with torch.no_grad():
        torch.onnx.export(module.eval(), (example,), str(path), dynamo=False, opset_version=17,
                          input_names=[input_name], output_names=output_names,
                          dynamic_axes={input_name: {0: "batch"}, **{n: {0: "batch"} for n in output_names}})
    return path


@pytest.fixture(scope="module")
def real_crops(photos: list[Path]) -> np.ndarray:
    """Four SpeciesNet-preprocessed crops per real photo (fixed boxes), NHWC float32."""
    from PIL import Image, ImageOps

    boxes = ([0.05, 0.1, 0.5, 0.6], [0.4, 0.3, 0.5, 0.6], [0.2, 0.5, 0.3, 0.4], [0.6, 0.05, 0.35, 0.5])
    crops = []
    for path in photos:
        pixels = np.asarray(ImageOps.exif_transpose(Image.open(path)).convert("RGB"))
        crops += [preprocess_crop(pixels, box) for box in boxes]
    return to_network_input(crops)


@pytest.fixture(scope="module")
def tiny_cnn(tmp_path_factory, real_crops: np.ndarray) -> Path:
    """The tiny CNN with batch-norm statistics from real crops and a head spreading their logits."""
    torch.manual_seed(0)
    net = TinyCNN()
    calibration = torch.from_numpy(real_crops[::2])
    for bn in (m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        bn.reset_running_stats()
        bn.momentum = None
    net.train()
    with torch.no_grad():
        net(calibration)
        net.eval()
        _, features = net(calibration)
        mean, std = features.mean(0), features.std(0).clamp_min(1e-6)
        weight = torch.randn(NUM_CLASSES, FEATURES) * 3.0 / std / FEATURES**0.5
        net.head.weight.copy_(weight)
        net.head.bias.copy_(-(weight @ mean))
    folder = tmp_path_factory.mktemp("tiny-cnn")
    return _export(net, torch.rand(2, CROP, CROP, 3), folder / "classifier.onnx", "crops", ["logits", "features"])


@pytest.fixture(scope="module")
def random_mlp(tmp_path_factory) -> Path:
    """A random-weight MLP (Gemm layers only) over 256-d embeddings."""
    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.ReLU(), torch.nn.Linear(512, 100))
    folder = tmp_path_factory.mktemp("mlp")
    return _export(net, torch.randn(2, 256), folder / "mlp.onnx", "embedding", ["logits"])


def _io_types(path: Path) -> set[int]:
    model = onnx.load(str(path))
    return {v.type.tensor_type.elem_type for v in list(model.graph.input) + list(model.graph.output)}


def _initializer_types(path: Path) -> dict[int, int]:
    model = onnx.load(str(path))
    counts: dict[int, int] = {}
    for tensor in model.graph.initializer:
        counts[tensor.data_type] = counts.get(tensor.data_type, 0) + 1
    return counts


def test_fp16_halves_the_weights_and_keeps_float32_io(tiny_cnn: Path, real_crops: np.ndarray, tmp_path: Path):
    out = tmp_path / "classifier_fp16.onnx"
    info = quantize_fp16(tiny_cnn, out)
    assert out.is_file() and info["bytes_out"] < 0.65 * info["bytes_in"]
    assert info["converter"]
    assert _io_types(out) == {onnx.TensorProto.FLOAT}
    assert onnx.TensorProto.FLOAT16 in _initializer_types(out)
    measured = agreement(tiny_cnn, out, real_crops)
    assert measured["count"] == len(real_crops)
    assert measured["top1_agreement"] >= 0.95
    assert measured["max_feature_diff"] < 0.05 and measured["min_feature_cosine"] > 0.999


@pytest.mark.parametrize("converter", ["onnxconverter-common", "onnxruntime"])
def test_fp16_converters_handle_an_output_that_feeds_the_head(converter: str, tiny_cnn: Path,
                                                               real_crops: np.ndarray, tmp_path: Path):
    if converter == "onnxconverter-common":
        pytest.importorskip("onnxconverter_common")
    out = tmp_path / "fp16.onnx"
    info = quantize_fp16(tiny_cnn, out, converter=converter)
    assert info["converter"].startswith(converter)
    assert info["separated_outputs"] == 1
    measured = agreement(tiny_cnn, out, real_crops[:8])
    assert measured["max_logit_diff"] < 0.25 and measured["min_feature_cosine"] > 0.999


def test_fp16_falls_back_to_onnxruntime_without_onnxconverter_common(monkeypatch, random_mlp: Path,
                                                                     tmp_path: Path):
    monkeypatch.setitem(sys.modules, "onnxconverter_common", None)
    monkeypatch.setitem(sys.modules, "onnxconverter_common.float16", None)
    info = quantize_fp16(random_mlp, tmp_path / "mlp_fp16.onnx")
    assert info["converter"].startswith("onnxruntime ")


def test_int8_dynamic_quantizes_gemm_by_default_and_conv_on_request(tiny_cnn: Path, real_crops: np.ndarray,
                                                                    tmp_path: Path):
    default = quantize_int8_dynamic(tiny_cnn, tmp_path / "gemm.onnx")
    assert default["quantized_nodes"] == {"DynamicQuantizeLinear": 1, "MatMulInteger": 1}
    out = tmp_path / "classifier_int8.onnx"
    info = quantize_int8_dynamic(tiny_cnn, out, op_types=CONV_OP_TYPES)
    assert out.is_file() and info["bytes_out"] < info["bytes_in"]
    assert info["quantized_nodes"].get("ConvInteger") == 3
    assert info["quantized_nodes"].get("MatMulInteger") == 1
    measured = agreement(tiny_cnn, out, real_crops)
    assert 0.0 <= measured["top1_agreement"] <= 1.0
    assert measured["max_logit_diff"] > 0.0


def test_random_weight_mlp_fp16_and_int8(random_mlp: Path, tmp_path: Path):
    x = np.random.default_rng(2).standard_normal((64, 256)).astype(np.float32)
    for name, quantize, ratio in (("fp16", quantize_fp16, 0.55), ("int8", quantize_int8_dynamic, 0.30)):
        out = tmp_path / f"mlp_{name}.onnx"
        info = quantize(random_mlp, out)
        assert info["bytes_out"] < ratio * info["bytes_in"], name
        measured = agreement(random_mlp, out, {"embedding": x})
        assert set(measured) >= {"top1_agreement", "top5_agreement", "max_logit_diff", "max_feature_diff"}
        assert measured["max_feature_diff"] is None
        assert measured["top1_agreement"] >= 0.9, (name, measured)


def _labels(count: int) -> list[str]:
    return [f"{i:08x}-0000-4000-8000-000000000000;mammalia;order;family;genus{i};species{i};animal {i}"
            for i in range(count)]


@pytest.fixture()
def tiny_bundle(tiny_cnn: Path, tmp_path: Path) -> Path:
    """A minimal valid bundle whose classifier is the tiny CNN."""
    root = tmp_path / "bundle"
    root.mkdir()
    shutil.copyfile(tiny_cnn, root / "classifier.onnx")
    (root / "labels.txt").write_text("\n".join(_labels(NUM_CLASSES)) + "\n")
    (root / "taxonomy.txt").write_text("\n".join(_labels(NUM_CLASSES)) + "\n")
    (root / "geofence.json").write_text("{}\n")
    manifest = {
        "schema_version": 1,
        "kind": "trapedge-bundle",
        "models": {"classifier": {
            "file": "classifier.onnx", "sha256": sha256_file(root / "classifier.onnx"), "format": "onnx",
            "opset": 17,
            "inputs": [{"name": "crops", "dtype": "float32", "shape": ["batch", CROP, CROP, 3]}],
            "outputs": [{"name": "logits", "dtype": "float32", "shape": ["batch", NUM_CLASSES]},
                        {"name": "features", "dtype": "float32", "shape": ["batch", FEATURES]}],
            "preprocessing": {"layout": "NHWC", "size": CROP},
            "parity": {"top1_agreement": 1.0},
        }},
        "files": {name: {"file": file, "sha256": sha256_file(root / file)}
                  for name, file in (("labels", "labels.txt"), ("taxonomy", "taxonomy.txt"),
                                     ("geofence", "geofence.json"))},
    }
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return root


def test_add_quantized_model_records_the_manifest(tiny_bundle: Path, real_crops: np.ndarray):
    for precision in ("fp16", "int8"):
        options = {"op_types": CONV_OP_TYPES} if precision == "int8" else None
        entry = add_quantized_model(tiny_bundle, "classifier", precision, real_crops, 0.5,
                                    inputs_description="real crops", options=options, log=lambda _: None)
        assert entry["file"] == f"classifier_{precision}.onnx"
    int8 = json.loads((tiny_bundle / "manifest.json").read_text())["models"]["classifier_int8"]
    assert int8["quantization"]["op_types"] == list(CONV_OP_TYPES)
    bundle = Bundle.load(tiny_bundle)
    for precision in ("fp16", "int8"):
        raw = bundle.manifest["models"][f"classifier_{precision}"]
        assert raw["sha256"] == sha256_file(tiny_bundle / raw["file"])
        assert raw["precision"] == precision and raw["base_model"] == "classifier"
        assert raw["agreement_floor"] == 0.5 and raw["agreement"]["inputs"] == "real crops"
        assert raw["agreement"]["count"] == len(real_crops)
        assert raw["outputs"] == bundle.manifest["models"]["classifier"]["outputs"]
        assert "parity" not in raw
        assert is_quantized(raw)
        check_agreement(raw, None)
    assert not is_quantized(bundle.manifest["models"]["classifier"])
    check_agreement(bundle.manifest["models"]["classifier"], 0.99)
    with pytest.raises(ValueError, match="already derived"):
        add_quantized_model(tiny_bundle, "classifier_int8", "int8", real_crops, None)


def test_quantized_model_below_the_floor_is_refused(tiny_bundle: Path, real_crops: np.ndarray):
    add_quantized_model(tiny_bundle, "classifier", "int8", real_crops, 0.9, log=lambda _: None)
    raw = json.loads((tiny_bundle / "manifest.json").read_text())["models"]["classifier_int8"]
    raw["agreement"]["top1_agreement"] = 0.8
    with pytest.raises(BundleError) as refused:
        check_agreement(raw, None)
    message = str(refused.value)
    assert "\n" not in message
    assert "classifier_int8.onnx" in message and "0.800" in message and "0.900" in message
    check_agreement(raw, 0.75)
    with pytest.raises(BundleError, match="0.850"):
        check_agreement(raw, 0.85)
    raw["agreement_floor"] = None
    check_agreement(raw, None)
    del raw["agreement"]
    with pytest.raises(BundleError, match="no recorded top-1 agreement"):
        check_agreement(raw, None)


def test_top1_agreement_on_real_photo_crops(tiny_cnn: Path, real_crops: np.ndarray, tmp_path: Path,
                                            record_property):
    results = {}
    variants = (("fp16", quantize_fp16, {}), ("int8", quantize_int8_dynamic, {}),
                ("int8_conv", quantize_int8_dynamic, {"op_types": CONV_OP_TYPES}))
    for name, quantize, options in variants:
        out = tmp_path / f"classifier_{name}.onnx"
        quantize(tiny_cnn, out, **options)
        results[name] = agreement(tiny_cnn, out, real_crops)
        record_property(f"{name}_top1_agreement", results[name]["top1_agreement"])
    print(json.dumps({k: {m: v[m] for m in ("count", "top1_agreement", "top5_agreement", "max_logit_diff")}
                      for k, v in results.items()}))
    assert results["fp16"]["top1_agreement"] >= 0.95
    assert results["int8"]["top1_agreement"] >= 0.75
    assert results["int8_conv"]["top1_agreement"] >= 0.6


def test_quantize_cli_then_run_with_the_int8_variant(bundle_copy: Path, photos, tmp_path: Path) -> None:
    from test_end_to_end import run_cli

    proc = subprocess.run([sys.executable, "-m", "trapedge.runtime.cli", "quantize", str(bundle_copy), "--precision",
                           "int8", "--images", str(photos[0].parent), "--floor", "0.5"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    entry = manifest["models"]["classifier_int8"]
    assert entry["agreement"]["top1_agreement"] >= 0.5 and entry["agreement_floor"] == 0.5
    run_cli("run", str(photos[0].parent), "--bundle", str(bundle_copy), "--out", str(tmp_path / "o"), "--quiet",
            "--precision", "int8")
    refused = run_cli("run", str(photos[0].parent), "--bundle", str(bundle_copy), "--out", str(tmp_path / "o2"),
                      "--precision", "int8", "--agreement-floor", "1.0", check=False)
    if entry["agreement"]["top1_agreement"] < 1.0:
        assert refused.returncode == 1 and "below the floor" in refused.stderr.strip().splitlines()[-1]
