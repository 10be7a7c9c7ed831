"""fp16 and static int8 (QDQ) bundle models: files, calibration, agreement figures, manifest records, refusal."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from fixtures_models import copy_photos  # noqa: E402
from trapedge.export.quantize import (  # noqa: E402
    BOX_CONF_TOLERANCE,
    BOX_MIN_CONF,
    BOX_MIN_IOU,
    CPU_OP_TYPES,
    DEFAULT_METHOD,
    QUANTIZED_OP_TYPES,
    RuntimeInputs,
    add_quantized_model,
    boundary_nodes,
    box_iou,
    classifier_agreement,
    collect_photos,
    detector_agreement,
    match_boxes,
    model_reader,
    quantize_bundle,
    quantize_fp16,
    quantize_int8_static,
    runtime_inputs,
    split_photos,
)
from trapedge.runtime.speciesnet import detector as det_ops  # noqa: E402
from trapedge.runtime.models.bundle import Bundle, BundleError, sha256_file  # noqa: E402
from trapedge.runtime.speciesnet.classifier import preprocess_crop, to_network_input  # noqa: E402
from trapedge.runtime.demo import SAMPLE_DATA  # noqa: E402
from trapedge.runtime.card.ingest import decode  # noqa: E402
from trapedge.runtime.models.quantized import check_agreement, check_tensorrt, floors, is_quantized  # noqa: E402
from trapedge.export.random_models import calibrate_batchnorm  # noqa: E402

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
    calibrate_batchnorm(net, calibration)
    with torch.no_grad():
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
    measured = classifier_agreement(tiny_cnn, out, real_crops)
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
    measured = classifier_agreement(tiny_cnn, out, real_crops[:8])
    assert measured["max_logit_diff"] < 0.25 and measured["min_feature_cosine"] > 0.999


def test_fp16_falls_back_to_onnxruntime_without_onnxconverter_common(monkeypatch, random_mlp: Path,
                                                                     tmp_path: Path):
    monkeypatch.setitem(sys.modules, "onnxconverter_common", None)
    monkeypatch.setitem(sys.modules, "onnxconverter_common.float16", None)
    info = quantize_fp16(random_mlp, tmp_path / "mlp_fp16.onnx")
    assert info["converter"].startswith("onnxruntime ")


def test_random_weight_mlp_fp16(random_mlp: Path, tmp_path: Path):
    x = np.random.default_rng(2).standard_normal((64, 256)).astype(np.float32)
    out = tmp_path / "mlp_fp16.onnx"
    info = quantize_fp16(random_mlp, out)
    assert info["bytes_out"] < 0.55 * info["bytes_in"]
    measured = classifier_agreement(random_mlp, out, {"embedding": x})
    assert measured["max_feature_diff"] is None and measured["feature_cosine"] is None
    assert measured["top1_agreement"] >= 0.9, measured


# --- photos: calibration and held-out sets -------------------------------------------------------------


def test_photos_are_deduplicated_and_split_disjointly(photos: list[Path], tmp_path: Path):
    copies = tmp_path / "card" / "100MEDIA"
    copies.mkdir(parents=True)
    for i, path in enumerate(photos[:4]):
        shutil.copyfile(path, copies / f"COPY_{i}.JPG")  # the same bytes under other names
    found = collect_photos([SAMPLE_DATA, tmp_path / "card"])
    assert len(found) == len({sha256_file(p) for p in SAMPLE_DATA.glob("*.JPG")}) == 10
    calibration, held_out = split_photos(found)
    assert {p.sha256 for p in calibration}.isdisjoint({p.sha256 for p in held_out})
    assert {p.sha256 for p in calibration} | {p.sha256 for p in held_out} == {p.sha256 for p in found}
    assert len(calibration) == len(held_out) == 5
    again = split_photos(list(reversed(found)) + found[:3])
    assert [p.sha256 for p in again[1]] == [p.sha256 for p in held_out]
    small_calibration, small_held_out = split_photos(found, max_photos=4)
    assert len(small_calibration) == len(small_held_out) == 2
    with pytest.raises(ValueError, match="at least 2 distinct photos"):
        split_photos(found[:1] * 3)


def test_runtime_inputs_are_what_trapedge_run_feeds_the_models(bundle: Path, photos: list[Path], tmp_path: Path):
    from test_end_to_end import run_cli

    card = tmp_path / "card"
    copy_photos(photos[:3], card)
    (card / "grey.png").write_bytes(b"")  # unreadable: skipped by collect_photos (empty file)
    from PIL import Image

    Image.fromarray(np.full((600, 800, 3), 128, np.uint8)).save(card / "flat.png")  # no detections
    run_cli("run", str(card), "--bundle", str(bundle), "--out", str(tmp_path / "out"), "--quiet")
    predictions = {Path(p["filepath"]).name: p for p in
                   json.loads((tmp_path / "out" / "predictions.json").read_text())["predictions"]}
    loaded = Bundle.load(bundle)
    found = collect_photos([card])
    assert len(found) == 4
    inputs = runtime_inputs(loaded, found)
    threshold = loaded.manifest["speciesnet"]["detection_threshold_for_classification"]
    assert len(inputs.images) == len(inputs.detections) == len(found)
    expected_crops, whole = [], 0
    for photo, boxed, detections in zip(found, inputs.images, inputs.detections):
        pixels = decode(photo.record).pixels
        assert np.array_equal(boxed.pixels, det_ops.letterbox(pixels).pixels)
        written = predictions[photo.record.path.name].get("detections", [])
        assert [(d["category"], round(d["conf"], 4), [round(v, 4) for v in d["bbox"]]) for d in detections] == \
            [(d["category"], d["conf"], d["bbox"]) for d in written]
        boxes = [d["bbox"] for d in detections if d["conf"] >= threshold]
        if not boxes:
            boxes, whole = [[0.0, 0.0, 1.0, 1.0]], whole + 1
        expected_crops += [preprocess_crop(pixels, box) for box in boxes]
    assert whole == inputs.whole_photo_crops >= 1
    assert inputs.detection_crops == len(expected_crops) - whole > 0
    assert len(inputs.crops) == len(expected_crops)
    assert all(np.array_equal(a, b) for a, b in zip(inputs.crops, expected_crops))


# --- static int8 files -----------------------------------------------------------------------------------


def _calibration(bundle: Path) -> tuple[RuntimeInputs, RuntimeInputs]:
    loaded = Bundle.load(bundle)
    calibration, held_out = split_photos(collect_photos([SAMPLE_DATA]))
    return runtime_inputs(loaded, calibration), runtime_inputs(loaded, held_out)


@pytest.fixture(scope="module")
def inputs(bundle: Path) -> tuple[RuntimeInputs, RuntimeInputs]:
    return _calibration(bundle)


def _downstream(model: onnx.ModelProto, names: set[str]) -> set[str]:
    """Names of the nodes fed, directly or not, by the named nodes (the named ones included)."""
    consumers: dict[str, list] = {}
    for node in model.graph.node:
        for tensor in node.input:
            consumers.setdefault(tensor, []).append(node)
    seen: set[str] = set()
    stack = [n for n in model.graph.node if n.name in names]
    while stack:
        node = stack.pop()
        if node.name in seen:
            continue
        seen.add(node.name)
        stack += [c for out in node.output for c in consumers.get(out, [])]
    return seen


def _conv_weights(model: onnx.ModelProto) -> dict[str, tuple]:
    """Conv name -> (weight dtype, scale shape, zero points, axis) of the DequantizeLinear feeding its weight,
    or None for a Conv whose weight is a float initializer."""
    inits = {t.name: t for t in model.graph.initializer}
    dq = {n.output[0]: n for n in model.graph.node if n.op_type == "DequantizeLinear"}
    found = {}
    for node in model.graph.node:
        if node.op_type != "Conv":
            continue
        source = dq.get(node.input[1])
        if source is None:
            assert node.input[1] in inits and inits[node.input[1]].data_type == onnx.TensorProto.FLOAT
            found[node.name] = None
            continue
        weight, scale, zero = (inits[name] for name in source.input[:3])
        axis = next((a.i for a in source.attribute if a.name == "axis"), 1)
        found[node.name] = (weight.data_type, tuple(weight.dims), tuple(scale.dims),
                            onnx.numpy_helper.to_array(zero), axis)
    return found


@pytest.mark.parametrize("name", ["classifier", "detector"])
def test_static_int8_is_qdq_with_int8_per_channel_conv_weights(name: str, bundle: Path, inputs, tmp_path: Path,
                                                               monkeypatch):
    calibration, _ = inputs
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)  # onnxruntime's symbolic shape inference leaves files in the CWD when it gives up
    source = bundle / f"{name}.onnx"
    spec = Bundle.load(bundle).model(name)
    out = tmp_path / f"{name}_int8.onnx"
    info = quantize_int8_static(source, out, model_reader(name, spec.inputs[0]["name"], calibration))
    model = onnx.load(str(out))
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("QuantizeLinear") > 0 and ops.count("DequantizeLinear") > ops.count("QuantizeLinear")
    assert info["format"] == "QDQ" and info["calibration_method"] == DEFAULT_METHOD
    assert info["quantized_nodes"]["QuantizeLinear"] == ops.count("QuantizeLinear")
    assert model.ir_version <= 9 and _io_types(out) == {onnx.TensorProto.FLOAT}
    weights = _conv_weights(model)
    quantized = {k: v for k, v in weights.items() if v is not None}
    assert len(quantized) >= len(weights) - 6 and info["quantized_nodes"]["int8_per_channel_convs"] == len(quantized)
    for dtype, dims, scale_dims, zero, axis in quantized.values():
        assert dtype == onnx.TensorProto.INT8
        assert scale_dims == (dims[0],) and axis == 0  # one scale per output channel
        assert not zero.any()  # symmetric
    for node in model.graph.node:  # activations symmetric int8 too (zero point 0), as TensorRT needs
        if node.op_type == "QuantizeLinear":
            zero = next(t for t in model.graph.initializer if t.name == node.input[2])
            assert zero.data_type == onnx.TensorProto.INT8 and not onnx.numpy_helper.to_array(zero).any()
    boundary = boundary_nodes(onnx.load(str(source)))
    float_convs = {k for k, v in weights.items() if v is None}
    assert float_convs == {n for n in boundary["first"] + boundary["last"] if n in weights}
    assert len(boundary["first"]) == 1
    tail = _downstream(model, set(boundary["last"]))
    assert tail and not any(n.op_type in ("QuantizeLinear", "DequantizeLinear")
                            for n in model.graph.node if n.name in tail)
    if name == "detector":
        assert len(boundary["last"]) == 4  # the Detect convolutions of P3..P6
    else:
        assert {n.op_type for n in model.graph.node if n.name in boundary["last"]} == {"Conv", "Gemm"}
    excluded = set(info["excluded_nodes"])  # named in the pre-processed graph, which folds some constants away
    assert set(boundary["first"] + boundary["last"]) <= excluded <= set(sum(boundary.values(), []))
    assert not list(cwd.iterdir())


def test_static_int8_without_exclusions_quantizes_every_conv(bundle: Path, inputs, tmp_path: Path):
    calibration, held_out = inputs
    out = tmp_path / "all.onnx"
    info = quantize_int8_static(bundle / "classifier.onnx", out, model_reader("classifier", "crops", calibration),
                                exclude=[], method="minmax")
    assert info["excluded_nodes"] == [] and info["calibration_method"] == "minmax"
    assert all(v is not None for v in _conv_weights(onnx.load(str(out))).values())
    measured = classifier_agreement(bundle / "classifier.onnx", out, to_network_input(held_out.crops))
    assert measured["count"] == len(held_out.crops) and measured["max_logit_diff"] > 0.0
    with pytest.raises(ValueError, match="unknown calibration method"):
        quantize_int8_static(bundle / "classifier.onnx", out, model_reader("classifier", "crops", calibration),
                             method="kl")


def test_uint8_activations_are_for_onnxruntime_only(bundle: Path, inputs, tmp_path: Path):
    calibration, held_out = inputs
    out = tmp_path / "uint8.onnx"
    info = quantize_int8_static(bundle / "classifier.onnx", out, model_reader("classifier", "crops", calibration),
                                activations="uint8")
    model = onnx.load(str(out))
    inits = {t.name: t for t in model.graph.initializer}
    zeros = [inits[n.input[2]] for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert zeros and all(z.data_type == onnx.TensorProto.UINT8 for z in zeros)
    assert any(onnx.numpy_helper.to_array(z).any() for z in zeros)  # asymmetric: zero points off 0
    assert all(v[0] == onnx.TensorProto.INT8 and not v[3].any() for v in _conv_weights(model).values() if v)
    assert info["tensorrt"] is False and info["activations"].startswith("uint8")
    measured = classifier_agreement(bundle / "classifier.onnx", out, to_network_input(held_out.crops))
    assert measured["count"] == len(held_out.crops) and 0.0 < measured["feature_cosine"] < 1.0
    with pytest.raises(BundleError, match="TensorRT refuses"):
        check_tensorrt({"file": "classifier_int8.onnx", "quantization": info})
    check_tensorrt({"file": "classifier_int8.onnx", "quantization": {**info, "tensorrt": True}})
    with pytest.raises(ValueError, match="unknown activation type"):
        quantize_int8_static(bundle / "classifier.onnx", out, model_reader("classifier", "crops", calibration),
                             activations="int4")


def _eight_bit_ops(model: onnx.ModelProto) -> set[str]:
    """Op types of the nodes between a DequantizeLinear and a QuantizeLinear (what onnxruntime runs in 8 bits)."""
    dq = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    q = {n.input[0] for n in model.graph.node if n.op_type == "QuantizeLinear"}
    return {n.op_type for n in model.graph.node if any(i in dq for i in n.input) and any(o in q for o in n.output)}


def test_uint8_tries_the_elementwise_layers_first_and_keeps_them_above_the_floor(bundle_copy: Path, inputs):
    calibration, held_out = inputs
    said: list[str] = []
    entry = add_quantized_model(bundle_copy, "classifier", "int8", held_out, 0.0, calibration=calibration,
                                options={"activations": "uint8"}, log=said.append)
    assert entry["quantization"]["op_types"] == list(CPU_OP_TYPES) and "tried_first" not in entry["quantization"]
    model = onnx.load(str(bundle_copy / entry["file"]))
    assert {"Sigmoid", "Mul"} <= _eight_bit_ops(model)  # SiLU in 8 bits (the tiny net has no residual Add)
    assert len(said) == 1 and "convolutions only" not in said[0]


def test_uint8_below_the_floor_falls_back_to_the_convolutions_with_both_figures(bundle_copy: Path, inputs):
    calibration, held_out = inputs
    said: list[str] = []
    entry = add_quantized_model(bundle_copy, "classifier", "int8", held_out, 1.0, calibration=calibration,
                                options={"activations": "uint8"}, log=said.append)
    quantization = entry["quantization"]
    assert quantization["op_types"] == list(QUANTIZED_OP_TYPES)
    (first,) = quantization["tried_first"]
    assert first["op_types"] == list(CPU_OP_TYPES)
    assert min(first["agreement"]["top1_agreement"], first["agreement"]["feature_cosine"]) < 1.0  # below the floor
    model = onnx.load(str(bundle_copy / entry["file"]))
    assert "Sigmoid" not in _eight_bit_ops(model) and any(_conv_weights(model).values())
    assert "convolutions only" in said[0] and "below the floor" in said[-1]
    assert entry["sha256"] == sha256_file(bundle_copy / entry["file"])  # the file kept is the one recorded
    entry_int8 = add_quantized_model(bundle_copy, "detector", "int8", held_out, 1.0, calibration=calibration,
                                     log=said.append)
    assert entry_int8["quantization"]["op_types"] == list(QUANTIZED_OP_TYPES)  # TensorRT's: weighted layers only
    assert "tried_first" not in entry_int8["quantization"]


# --- detector agreement ----------------------------------------------------------------------------------


def _det(conf: float, bbox, category: str = "1") -> dict:
    return {"category": category, "conf": conf, "bbox": list(bbox)}


def test_box_matching_on_hand_made_boxes():
    box = (0.1, 0.1, 0.2, 0.2)
    shift = 0.2 * 0.15 / 1.85  # a shift along x to IoU (w - dx) / (w + dx) = 0.85
    shifted = (0.1 + shift, 0.1, 0.2, 0.2)
    assert box_iou(box, shifted) == pytest.approx(0.85, abs=1e-9)
    close = (0.1 + 0.2 * 0.1 / 1.9, 0.1, 0.2, 0.2)  # IoU 0.90, the least that counts
    assert box_iou(box, close) == pytest.approx(0.90, abs=1e-9)
    assert box_iou(box, (0.5, 0.5, 0.1, 0.1)) == 0.0
    assert (BOX_MIN_CONF, BOX_MIN_IOU, BOX_CONF_TOLERANCE) == (0.2, 0.9, 0.02)

    def found(reference, candidate):
        return [j for _, j, _, _ in match_boxes(reference, candidate)]

    assert found([_det(0.8, box)], [_det(0.8, box)]) == [0]
    assert found([_det(0.8, box)], [_det(0.8, shifted)]) == [None]  # IoU 0.85
    assert found([_det(0.8, box)], [_det(0.8, close)]) == [0]  # IoU 0.90
    assert found([_det(0.8, box)], [_det(0.75, box)]) == [None]  # confidence 0.05 lower
    assert found([_det(0.8, box)], [_det(0.85, box)]) == [None]  # confidence 0.05 higher
    assert found([_det(0.8, box)], [_det(0.785, box)]) == [0]  # within 0.02
    assert found([_det(0.8, box)], [_det(0.8, box, "2")]) == [None]  # another category
    assert found([_det(0.19, box)], [_det(0.19, box)]) == []  # below 0.2: not counted
    assert found([_det(0.21, box)], [_det(0.195, box)]) == [0]  # the int8 box may fall below 0.2
    # one candidate is found once: the higher-confidence reference takes it
    assert found([_det(0.5, box), _det(0.9, close)], [_det(0.89, box)]) == [0, None]
    # the best-overlapping eligible candidate is taken
    matches = match_boxes([_det(0.6, box)], [_det(0.6, close), _det(0.61, box), _det(0.6, shifted)])
    assert [m[:2] for m in matches] == [(0, 1)] and matches[0][2:] == pytest.approx((1.0, 0.01))


def _scaled_outputs(source: Path, out: Path, factors: list[float]) -> Path:
    """The detector with its predictions multiplied column-wise (w, h or objectness changed)."""
    model = onnx.load(str(source))
    graph = model.graph
    name = graph.output[0].name
    for node in graph.node:
        node.output[:] = [f"{name}__raw" if o == name else o for o in node.output]
        node.input[:] = [f"{name}__raw" if i == name else i for i in node.input]
    graph.initializer.append(onnx.numpy_helper.from_array(np.array(factors, np.float32), f"{name}__factors"))
    graph.node.append(onnx.helper.make_node("Mul", [f"{name}__raw", f"{name}__factors"], [name]))
    onnx.save(model, str(out))
    return out


def test_detector_agreement_counts_found_boxes(bundle: Path, inputs, tmp_path: Path):
    _, held_out = inputs
    source = bundle / "detector.onnx"
    same = detector_agreement(source, source, held_out.images)
    assert same["count"] == len(held_out.images) and same["boxes"] > 0
    assert same["found"] == same["boxes"] and same["boxes_found"] == 1.0
    assert same["max_conf_diff_found"] == 0.0 and same["min_iou_found"] == 1.0
    wider = detector_agreement(source, _scaled_outputs(source, tmp_path / "w.onnx", [1, 1, 1.2, 1.2, 1, 1, 1, 1]),
                               held_out.images)  # IoU 1 / 1.44 = 0.69
    assert wider["boxes"] == same["boxes"] and wider["found"] == 0 and wider["boxes_found"] == 0.0
    dimmer = detector_agreement(source, _scaled_outputs(source, tmp_path / "d.onnx", [1, 1, 1, 1, 0.85, 1, 1, 1]),
                                held_out.images)  # every confidence 15% lower: at least 0.03 off at >= 0.2
    assert dimmer["boxes"] == same["boxes"] and dimmer["found"] == 0
    slight = detector_agreement(source, _scaled_outputs(source, tmp_path / "s.onnx", [1, 1, 1, 1, 0.99, 1, 1, 1]),
                                held_out.images)  # at most 0.01 lower
    assert slight["found"] == slight["boxes"] == same["boxes"] and 0 < slight["max_conf_diff_found"] <= 0.01


# --- bundle records and refusal --------------------------------------------------------------------------


def test_int8_models_record_agreement_calibration_and_floors(bundle_copy: Path, inputs):
    calibration, held_out = inputs
    entries = {name: add_quantized_model(bundle_copy, name, "int8", held_out, 0.5, calibration=calibration,
                                         log=lambda _: None)
               for name in ("classifier", "detector")}
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    loaded = Bundle.load(bundle_copy)  # hashes verified
    everything = {p.sha256 for p in collect_photos([SAMPLE_DATA])}
    for name, entry in entries.items():
        raw = manifest["models"][f"{name}_int8"]
        assert raw == entry and loaded.has_model(f"{name}_int8")
        assert raw["file"] == f"{name}_int8.onnx" and raw["sha256"] == sha256_file(bundle_copy / raw["file"])
        assert raw["precision"] == "int8" and raw["base_model"] == name and "parity" not in raw
        assert raw["quantization"]["format"] == "QDQ" and raw["quantization"]["tensorrt"] is True
        check_tensorrt(raw)
        assert raw["quantization"]["calibration_method"] == DEFAULT_METHOD
        calibrated, measured_on = set(raw["calibration"]["sha256"]), set(raw["agreement"]["held_out"]["sha256"])
        assert calibrated.isdisjoint(measured_on) and calibrated | measured_on == everything
        assert raw["agreement_floor"] == floors(raw) and is_quantized(raw)
    classifier = manifest["models"]["classifier_int8"]
    assert classifier["agreement_floor"] == {"top1_agreement": 0.5, "feature_cosine": 0.5}
    assert classifier["calibration"]["crops"] == len(calibration.crops)
    assert classifier["agreement"]["count"] == classifier["agreement"]["held_out"]["crops"] == len(held_out.crops)
    assert 0.0 <= classifier["agreement"]["top1_agreement"] <= 1.0
    assert 0.9 < classifier["agreement"]["feature_cosine"] < 1.0
    detector = manifest["models"]["detector_int8"]
    assert detector["agreement_floor"] == {"boxes_found": 0.5}
    assert detector["calibration"]["images"] == len(calibration.images)
    agreement = detector["agreement"]
    assert agreement["count"] == len(held_out.images) and agreement["boxes"] > 0
    assert agreement["boxes_found"] == agreement["found"] / agreement["boxes"]
    print(json.dumps({name: {k: v for k, v in entry["agreement"].items() if k != "held_out"}
                      for name, entry in entries.items()}))
    for name, entry in entries.items():  # refused exactly when a recorded figure is below its floor
        below = [m for m, f in entry["agreement_floor"].items() if entry["agreement"][m] < f]
        if below:
            with pytest.raises(BundleError, match="below the floor"):
                check_agreement(entry, None)
        else:
            check_agreement(entry, None)
        assert min(entry["agreement"][m] for m in entry["agreement_floor"]) < 1.0  # random weights: never exact
        with pytest.raises(BundleError) as refused:
            check_agreement(entry, 1.0)
        assert "\n" not in str(refused.value) and f"{name}_int8.onnx" in str(refused.value)
    with pytest.raises(ValueError, match="already derived"):
        add_quantized_model(bundle_copy, "classifier_int8", "int8", held_out, None, calibration=calibration)
    with pytest.raises(ValueError, match="both the calibration and the held-out set"):
        add_quantized_model(bundle_copy, "classifier", "int8", held_out, None,
                            calibration=RuntimeInputs(held_out.photos[:1]))


def test_fp16_models_record_agreement_on_held_out_photos(bundle_copy: Path, inputs):
    _, held_out = inputs
    entry = add_quantized_model(bundle_copy, "classifier", "fp16", held_out, 0.99, log=lambda _: None)
    assert "calibration" not in entry and entry["quantization"]["method"] == "fp16"
    assert entry["agreement"]["count"] == len(held_out.crops)
    assert entry["agreement"]["top1_agreement"] >= 0.9 and entry["agreement"]["feature_cosine"] > 0.999
    Bundle.load(bundle_copy)
    with pytest.raises(ValueError, match="fp16 covers the classifier only"):
        add_quantized_model(bundle_copy, "detector", "fp16", held_out, 0.99)
    with pytest.raises(ValueError, match="fp16 covers the classifier only"):
        quantize_bundle(bundle_copy, "fp16", models=["detector"])
    assert not (bundle_copy / "detector_fp16.onnx").exists()


def _classifier_entry(top1: float, cosine: float, floor) -> dict:
    return {"file": "classifier_int8.onnx", "precision": "int8", "base_model": "classifier",
            "agreement": {"count": 40, "top1_agreement": top1, "feature_cosine": cosine},
            "agreement_floor": floor}


def test_quantized_model_below_a_floor_is_refused_with_its_figures():
    both = {"top1_agreement": 0.99, "feature_cosine": 0.99}
    check_agreement(_classifier_entry(0.995, 0.993, both), None)
    with pytest.raises(BundleError) as refused:
        check_agreement(_classifier_entry(0.975, 0.993, both), None)
    message = str(refused.value)
    assert "\n" not in message and message.startswith("classifier_int8.onnx: int8 model")
    assert "top-1 agreement 0.9750 (floor 0.9900, below)" in message
    assert "mean feature cosine 0.9930 (floor 0.9900)" in message and "40 held-out" in message
    with pytest.raises(BundleError, match=r"mean feature cosine 0\.9890 \(floor 0\.9900, below\)"):
        check_agreement(_classifier_entry(1.0, 0.989, both), None)
    with pytest.raises(BundleError, match=r"0\.9899 \(floor 0\.9900, below\)"):  # never rounded up to the floor
        check_agreement(_classifier_entry(0.98999, 1.0, both), None)
    check_agreement(_classifier_entry(0.975, 0.993, both), 0.97)  # --agreement-floor overrides every floor
    with pytest.raises(BundleError, match=r"0\.9930 \(floor 0\.9950, below\)"):
        check_agreement(_classifier_entry(0.999, 0.993, both), 0.995)
    check_agreement(_classifier_entry(0.5, 0.5, None), None)  # recorded without a floor
    with pytest.raises(BundleError, match="top-1 agreement 0.5000"):
        check_agreement(_classifier_entry(0.5, 0.5, None), 0.6)
    legacy = _classifier_entry(0.95, 0.5, 0.9)  # a bare number gates top-1 only
    assert floors(legacy) == {"top1_agreement": 0.9, "feature_cosine": 0.9}
    legacy["agreement"]["feature_cosine"] = None
    assert floors(legacy) == {"top1_agreement": 0.9}
    check_agreement(legacy, None)
    detector = {"file": "detector_int8.onnx", "precision": "int8", "base_model": "detector",
                "agreement_floor": {"boxes_found": 0.99},
                "agreement": {"count": 5, "boxes": 40, "found": 39, "boxes_found": 0.975, "min_conf": 0.2}}
    with pytest.raises(BundleError) as refused:
        check_agreement(detector, None)
    message = str(refused.value)
    assert "fp32 boxes found 0.9750 (floor 0.9900, below)" in message and "39/40 boxes" in message
    assert "5 held-out photos" in message and "\n" not in message
    check_agreement(detector, 0.97)
    detector["agreement"].update(boxes=0, found=0, boxes_found=None)
    with pytest.raises(BundleError, match="measured on no fp32 boxes"):
        check_agreement(detector, 0.0)
    missing = _classifier_entry(0.99, 0.99, both)
    del missing["agreement"]["feature_cosine"]
    with pytest.raises(BundleError, match="no recorded mean feature cosine"):
        check_agreement(missing, None)
    with pytest.raises(BundleError, match="not a number in"):
        check_agreement(_classifier_entry(0.99, 0.99, {"top1_agreement": 1.5}), None)
    check_agreement({"file": "classifier.onnx", "agreement": {}}, 0.99)  # fp32 models are never gated


def test_quantize_cli_then_run_with_the_int8_variants(bundle_copy: Path, photos, tmp_path: Path) -> None:
    from test_end_to_end import run_cli

    proc = run_cli("quantize", "--bundle", str(bundle_copy), "--precision", "int8", "--images", str(photos[0].parent),
                   "--agreement-floor", "0.5")
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    classifier, detector = manifest["models"]["classifier_int8"], manifest["models"]["detector_int8"]
    assert classifier["agreement_floor"] == {"top1_agreement": 0.5, "feature_cosine": 0.5}
    assert detector["agreement_floor"] == {"boxes_found": 0.5}
    assert "5 calibration and 5 held-out photos" in proc.stderr
    out = tmp_path / "o"
    run = run_cli("run", str(photos[0].parent), "--bundle", str(bundle_copy), "--out", str(out), "--quiet",
                  "--precision", "int8", "--agreement-floor", "0.0", check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    assert json.loads((out / "predictions.json").read_text())["predictions"]
    refused = run_cli("run", str(photos[0].parent), "--bundle", str(bundle_copy), "--out", str(tmp_path / "o2"),
                      "--precision", "int8", "--agreement-floor", "1.0", check=False)
    last = refused.stderr.strip().splitlines()[-1]
    assert detector["agreement"]["boxes_found"] < 1.0  # random weights: int8 never keeps every box
    assert refused.returncode == 2 and "below the floor" in last
    assert "detector_int8.onnx" in last and f"{detector['agreement']['found']}/{detector['agreement']['boxes']}" in last
