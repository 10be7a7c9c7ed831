"""`trapedge demo`: an untrained demo bundle built locally (no torch, no downloads) and a run on sample photos."""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

import numpy as np

from . import __version__
from .models.bundle import MANIFEST, SCHEMA_VERSION, sha256_file
from .speciesnet.ensemble import Classification

__all__ = ["SAMPLE_DATA", "build_demo_bundle", "sample_photos"]

SAMPLE_DATA = Path(__file__).parent / "sample_data"
DEMO_VERSION = "demo-untrained"
_CELL = 64
_FEATURES = 64
_OPSET = 17
_IR_VERSION = 8


def sample_photos() -> list[Path]:
    """The packaged sample camera-trap photos (MIT licence, see sample_data/LICENSE)."""
    return sorted(SAMPLE_DATA.glob("*.JPG"))


def _demo_taxonomy() -> tuple[list[str], list[str]]:
    rng = np.random.default_rng(7)
    uid = lambda: str(uuid.UUID(int=int(rng.integers(0, 2**62)) << 64 | int(rng.integers(0, 2**62))))  # noqa: E731
    tree = [("aves", "anseriformes", "anatidae", "anas", ["platyrhynchos", "acuta"]),
            ("aves", "passeriformes", "corvidae", "corvus", ["corax"]),
            ("mammalia", "carnivora", "canidae", "vulpes", ["vulpes"]),
            ("mammalia", "artiodactyla", "cervidae", "odocoileus", ["virginianus", "hemionus"])]
    taxonomy, labels = [], [c.value for c in (Classification.BLANK, Classification.ANIMAL, Classification.HUMAN,
                                              Classification.VEHICLE)]
    seen = set()
    for cls, order, family, genus, species in tree:
        for ranks, common in (((cls, "", "", "", ""), cls), ((cls, order, "", "", ""), order),
                              ((cls, order, family, "", ""), family), ((cls, order, family, genus, ""), genus)):
            if ranks not in seen:
                seen.add(ranks)
                taxonomy.append(f"{uid()};{';'.join(ranks)};{common}")
        for sp in species:
            taxonomy.append(f"{uid()};{cls};{order};{family};{genus};{sp};{genus} {sp}")
    labels += [t for t in taxonomy if t.split(";")[5] or t.split(";")[2] == ""]
    return labels, taxonomy + [Classification.HUMAN.value]


def _detector(path: Path) -> None:
    """A saliency heuristic, not a trained detector: 64-px cells that stand out from the frame mean."""
    from onnx import TensorProto, helper, numpy_helper

    def const(name: str, value) -> helper.NodeProto:
        return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(value), name))

    f = lambda *v: np.array(v, dtype=np.float32)  # noqa: E731
    i = lambda *v: np.array(v, dtype=np.int64)  # noqa: E731
    nodes = [
        const("cell", f(float(_CELL))), const("half", f(0.5)), const("gain", f(15.0)), const("bias", f(-15.0)),
        const("size", f(3.0 * _CELL)), const("cls", f(0.9, 0.06, 0.04).reshape(1, 3, 1, 1)),
        const("zero", i(0)), const("one", i(1)), const("i2", i(2)), const("i3", i(3)),
        const("shape_col", i(1, 1, -1, 1)), const("shape_row", i(1, 1, 1, -1)), const("flat", i(0, 8, -1)),
        helper.make_node("AveragePool", ["images"], ["cells"], kernel_shape=[_CELL, _CELL], strides=[_CELL, _CELL]),
        helper.make_node("ReduceMean", ["cells"], ["frame"], axes=[2, 3], keepdims=1),
        helper.make_node("Sub", ["cells", "frame"], ["dev"]),
        helper.make_node("Abs", ["dev"], ["absdev"]),
        helper.make_node("ReduceSum", ["absdev", "one"], ["sal"], keepdims=1),
        helper.make_node("Mul", ["sal", "gain"], ["scaled"]),
        helper.make_node("Add", ["scaled", "bias"], ["logit"]),
        helper.make_node("Sigmoid", ["logit"], ["obj"]),
        helper.make_node("Shape", ["obj"], ["oshape"]),
        helper.make_node("Gather", ["oshape", "i2"], ["h"], axis=0),
        helper.make_node("Gather", ["oshape", "i3"], ["w"], axis=0),
        helper.make_node("Range", ["zero", "h", "one"], ["ry"]),
        helper.make_node("Range", ["zero", "w", "one"], ["rx"]),
        helper.make_node("Cast", ["ry"], ["fy"], to=TensorProto.FLOAT),
        helper.make_node("Cast", ["rx"], ["fx"], to=TensorProto.FLOAT),
        helper.make_node("Add", ["fy", "half"], ["fy2"]), helper.make_node("Mul", ["fy2", "cell"], ["py"]),
        helper.make_node("Add", ["fx", "half"], ["fx2"]), helper.make_node("Mul", ["fx2", "cell"], ["px"]),
        helper.make_node("Reshape", ["py", "shape_col"], ["py4"]),
        helper.make_node("Reshape", ["px", "shape_row"], ["px4"]),
        helper.make_node("Expand", ["py4", "oshape"], ["cy"]),
        helper.make_node("Expand", ["px4", "oshape"], ["cx"]),
        helper.make_node("Expand", ["size", "oshape"], ["bw"]),
        helper.make_node("Shape", ["cells"], ["cshape"]),
        helper.make_node("Expand", ["cls", "cshape"], ["probs"]),
        helper.make_node("Concat", ["cx", "cy", "bw", "bw", "obj", "probs"], ["rows"], axis=1),
        helper.make_node("Reshape", ["rows", "flat"], ["flat_rows"]),
        helper.make_node("Transpose", ["flat_rows"], ["predictions"], perm=[0, 2, 1]),
    ]
    graph = helper.make_graph(
        nodes, "trapedge-demo-detector",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, "height", "width"])],
        [helper.make_tensor_value_info("predictions", TensorProto.FLOAT, ["batch", "anchors", 8])])
    _save(helper, graph, path)


def _classifier(path: Path, num_labels: int) -> None:
    """Random projections of pooled colour: deterministic, untrained; outputs logits and features."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(11)
    pooled = 3 * 15 * 15
    w1 = (rng.normal(0, 1, (pooled, _FEATURES)) / np.sqrt(pooled) * 8).astype(np.float32)
    w2 = (rng.normal(0, 1, (_FEATURES, num_labels)) * 1.5).astype(np.float32)
    inits = [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2"),
             numpy_helper.from_array(np.zeros(_FEATURES, np.float32), "b1"),
             numpy_helper.from_array(np.zeros(num_labels, np.float32), "b2"),
             numpy_helper.from_array(np.array([0, -1], dtype=np.int64), "flat"),
             numpy_helper.from_array(np.array([0.5], dtype=np.float32), "center")]
    nodes = [
        helper.make_node("Transpose", ["crops"], ["nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("AveragePool", ["nchw"], ["pool"], kernel_shape=[32, 32], strides=[32, 32]),
        helper.make_node("Sub", ["pool", "center"], ["centred"]),
        helper.make_node("Reshape", ["centred", "flat"], ["vec"]),
        helper.make_node("Gemm", ["vec", "w1", "b1"], ["hidden"]),
        helper.make_node("Relu", ["hidden"], ["features"]),
        helper.make_node("Gemm", ["features", "w2", "b2"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes, "trapedge-demo-classifier",
        [helper.make_tensor_value_info("crops", TensorProto.FLOAT, ["batch", 480, 480, 3])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", num_labels]),
         helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", _FEATURES])], inits)
    _save(helper, graph, path)


def _save(helper, graph, path: Path) -> None:
    import onnx

    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", _OPSET)], producer_name="trapedge-demo")
    model.ir_version = _IR_VERSION
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def build_demo_bundle(dest: Path) -> Path:
    """Writes an untrained demo bundle (heuristic detector, random classifier) in the real bundle format."""
    try:
        import onnx  # noqa: F401
    except ImportError as e:
        raise RuntimeError("the demo builds its models with the onnx package: pip install onnx") from e
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    labels, taxonomy = _demo_taxonomy()
    (dest / "labels.txt").write_text("\n".join(labels) + "\n", encoding="utf-8")
    (dest / "taxonomy.txt").write_text("\n".join(taxonomy) + "\n", encoding="utf-8")
    (dest / "geofence.json").write_text("{}\n", encoding="utf-8")
    _detector(dest / "detector.onnx")
    _classifier(dest / "classifier.onnx", len(labels))
    io = lambda name, shape: {"name": name, "dtype": "float32", "shape": shape}  # noqa: E731
    manifest = {
        "schema_version": SCHEMA_VERSION, "kind": "trapedge-bundle", "trapedge_version": __version__,
        "demo": "UNTRAINED DEMO MODELS: a saliency heuristic as detector and a random classifier. "
                "Their labels mean nothing; they exist to show the pipeline end to end.",
        "speciesnet": {"source": "trapedge demo", "model_version": DEMO_VERSION, "model_type": "always_crop",
                       "detection_threshold_for_classification": 0.1},
        "models": {
            "detector": {"file": "detector.onnx", "sha256": sha256_file(dest / "detector.onnx"), "format": "onnx",
                         "opset": _OPSET, "inputs": [io("images", ["batch", 3, "height", "width"])],
                         "outputs": [io("predictions", ["batch", "anchors", 8])],
                         "preprocessing": {"layout": "NCHW", "image_size": 1280, "stride": 64, "pad_value": 114}},
            "classifier": {"file": "classifier.onnx", "sha256": sha256_file(dest / "classifier.onnx"),
                           "format": "onnx", "opset": _OPSET, "inputs": [io("crops", ["batch", 480, 480, 3])],
                           "outputs": [io("logits", ["batch", len(labels)]), io("features", ["batch", _FEATURES])],
                           "preprocessing": {"layout": "NHWC", "size": 480}},
        },
        "files": {"labels": {"file": "labels.txt", "sha256": sha256_file(dest / "labels.txt"), "count": len(labels)},
                  "taxonomy": {"file": "taxonomy.txt", "sha256": sha256_file(dest / "taxonomy.txt")},
                  "geofence": {"file": "geofence.json", "sha256": sha256_file(dest / "geofence.json")}},
    }
    (dest / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return dest


def copy_samples(dest: Path) -> Path:
    """Copies the sample photos into a card-like folder (DCIM/100MEDIA)."""
    card = Path(dest) / "DCIM" / "100MEDIA"
    card.mkdir(parents=True, exist_ok=True)
    for photo in sample_photos():
        shutil.copy2(photo, card / photo.name)
    return Path(dest)
