"""fp16 and static int8 (QDQ) copies of bundle models, with their agreement to fp32 recorded in the manifest.

int8 is onnxruntime's static quantisation in QDQ format: int8 weights (symmetric, per output channel) and int8
activations (symmetric, per tensor) whose ranges are calibrated on real photos fed to the model exactly as the
runtime feeds it (letterboxed images for the detector; crops of the fp32 detector's detections, or the whole
photo when it has none, for the classifier). Agreement is measured on held-out photos that share no photo with
the calibration set. The QDQ file is also what TensorRT builds an explicit-precision int8 engine from.
"""

from __future__ import annotations

import heapq
import json
import logging
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import numpy as np
import onnx
from onnx import helper

from trapedge.runtime.speciesnet import classifier as cls_ops
from trapedge.runtime.speciesnet import detector as det_ops
from trapedge.runtime.models.bundle import MANIFEST, Bundle, sha256_file
from trapedge.runtime.models.quantized import QUANTIZED
from trapedge.runtime.demo import SAMPLE_DATA
from trapedge.runtime.speciesnet.ensemble.vocabulary import DEFAULT_DETECTION_THRESHOLD_FOR_CLASSIFICATION
from trapedge.runtime.card.ingest import ImageRecord, decode, scan

__all__ = [
    "ACTIVATIONS",
    "BOX_CONF_TOLERANCE",
    "BOX_MIN_CONF",
    "BOX_MIN_IOU",
    "CALIBRATION_METHODS",
    "DEFAULT_FLOOR",
    "DEFAULT_METHOD",
    "MODELS",
    "PRECISIONS",
    "FeedReader",
    "Photo",
    "RuntimeInputs",
    "add_quantized_model",
    "boundary_nodes",
    "box_iou",
    "classifier_agreement",
    "collect_photos",
    "detector_agreement",
    "match_boxes",
    "quantize_bundle",
    "quantize_fp16",
    "quantize_int8_static",
    "runtime_inputs",
    "split_photos",
]

logger = logging.getLogger("trapedge.export")

PRECISIONS = ("fp16", "int8")
MODELS = tuple(QUANTIZED)  # the runtime's table of what this module makes, so the two cannot drift
FP16_MODELS = tuple(m for m, made in QUANTIZED.items() if "fp16" in made)  # float16 converters mistype Detect Casts
MAX_IR_VERSION = 9
DEFAULT_FLOOR = 0.99
# Entropy was chosen by measurement on the random-weight fixture models (benchmarks/int8.py, results/int8.md).
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
DEFAULT_METHOD = "entropy"
ACTIVATIONS = ("int8", "uint8")
# Quantised op types of the int8 (TensorRT) files: the convolutions and matrix products carry the arithmetic;
# everything between them stays float (ORT CPU and TensorRT both fuse DequantizeLinear -> Conv -> QuantizeLinear).
QUANTIZED_OP_TYPES = ("Conv", "MatMul", "Gemm")
# uint8 activations are onnxruntime's x86 CPU format, whose kernels also run the activations between the
# convolutions in uint8 (QLinearSigmoid and QLinearMul for SiLU and squeeze-excite gates, QLinearAdd for residuals,
# QLinearGlobalAveragePool): the real-size classifier takes 105 ms per crop against 289 in fp32 (benchmarks/results/
# throughput.md; convolutions alone about 1.5x faster than fp32, int8.md). Tried first;
# where that misses the agreement floor the convolutions alone are quantised. TensorRT's (int8) files keep Q/DQ
# at the weighted layers only: TensorRT fuses the elementwise layers itself.
CPU_OP_TYPES = QUANTIZED_OP_TYPES + ("Sigmoid", "Mul", "Add", "GlobalAveragePool")
_COMPUTE_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")
# Detector agreement: an fp32 box at or above BOX_MIN_CONF is found when the int8 model has a box of the
# same category with IoU >= BOX_MIN_IOU and confidence within BOX_CONF_TOLERANCE, after the runtime's NMS.
BOX_MIN_CONF = 0.2
BOX_MIN_IOU = 0.9
BOX_CONF_TOLERANCE = 0.02
_EPS = 1e-9
Inputs = Union[np.ndarray, Mapping[str, np.ndarray]]


def _separate_outputs(model: onnx.ModelProto) -> int:
    """Gives every graph output that other nodes also read its own Identity node; returns how many."""
    graph = model.graph
    consumed = {name for node in graph.node for name in node.input}
    shared = [out.name for out in graph.output if out.name in consumed]
    for name in shared:
        inner = f"{name}__inner"
        for node in graph.node:
            node.input[:] = [inner if i == name else i for i in node.input]
            node.output[:] = [inner if o == name else o for o in node.output]
        graph.node.append(helper.make_node("Identity", [inner], [name], name=f"{name}__output"))
    return len(shared)


def _fp16_converter(choice: str) -> tuple[str, Callable[..., onnx.ModelProto]]:
    """The float16 converter to use: onnxconverter-common if importable, else onnxruntime's bundled copy."""
    if choice in ("auto", "onnxconverter-common"):
        try:
            import onnxconverter_common
            from onnxconverter_common.float16 import convert_float_to_float16

            return f"onnxconverter-common {onnxconverter_common.__version__}", convert_float_to_float16
        except ImportError:
            if choice != "auto":
                raise
    if choice in ("auto", "onnxruntime"):
        import onnxruntime
        from onnxruntime.transformers.float16 import convert_float_to_float16

        return f"onnxruntime {onnxruntime.__version__} transformers.float16", convert_float_to_float16
    raise ValueError(f"unknown fp16 converter {choice!r}; expected auto, onnxconverter-common or onnxruntime")


def _sort_nodes(graph: onnx.GraphProto) -> None:
    """Orders nodes topologically, stably (onnxruntime's float16 converter appends its input Casts last)."""
    nodes = list(graph.node)
    producer = {name: i for i, node in enumerate(nodes) for name in node.output if name}
    users: dict[int, list[int]] = {}
    waiting = []
    for i, node in enumerate(nodes):
        deps = {producer[name] for name in node.input if name in producer and producer[name] != i}
        waiting.append(len(deps))
        for dep in deps:
            users.setdefault(dep, []).append(i)
    heap = [i for i, count in enumerate(waiting) if count == 0]
    heapq.heapify(heap)
    order: list[int] = []
    while heap:
        i = heapq.heappop(heap)
        order.append(i)
        for user in users.get(i, []):
            waiting[user] -= 1
            if waiting[user] == 0:
                heapq.heappush(heap, user)
    placed = set(order)
    order += [i for i in range(len(nodes)) if i not in placed]
    if order == list(range(len(nodes))):
        return
    copies = [onnx.NodeProto() for _ in order]
    for copy, i in zip(copies, order):
        copy.CopyFrom(nodes[i])
    del graph.node[:]
    graph.node.extend(copies)


def _save(model: onnx.ModelProto, path: Path) -> None:
    _sort_nodes(model.graph)
    model.ir_version = min(model.ir_version, MAX_IR_VERSION)
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))


def quantize_fp16(onnx_in: Path, onnx_out: Path, *, converter: str = "auto") -> dict[str, Any]:
    """Writes an fp16 copy with float32 inputs and outputs; returns the converter used and the sizes."""
    onnx_in, onnx_out = Path(onnx_in), Path(onnx_out)
    name, convert = _fp16_converter(converter)
    model = onnx.load(str(onnx_in))
    separated = _separate_outputs(model)
    converted = convert(model, keep_io_types=True)
    _save(converted, onnx_out)
    logger.info("fp16: %s -> %s with %s", onnx_in.name, onnx_out.name, name)
    return {"method": "fp16", "converter": name, "keep_io_types": True, "separated_outputs": separated,
            "bytes_in": onnx_in.stat().st_size, "bytes_out": onnx_out.stat().st_size}


# --- photos: calibration and held-out sets -------------------------------------------------------------


@dataclass(frozen=True)
class Photo:
    """A photo found for calibration or evaluation, identified by the sha256 of its bytes."""

    record: ImageRecord
    sha256: str


def collect_photos(folders: Sequence[Union[Path, str]]) -> list[Photo]:
    """Photos under the folders (recursively, as `trapedge run` scans), one per distinct content, by digest."""
    found: dict[str, Photo] = {}
    for folder in folders:
        for record in scan(Path(folder)):
            if record.size <= 0:
                continue
            digest = sha256_file(record.path)
            found.setdefault(digest, Photo(record, digest))
    return [found[digest] for digest in sorted(found)]


def split_photos(photos: Sequence[Photo], *, held_out_share: float = 0.5,
                 max_photos: Optional[int] = None) -> tuple[list[Photo], list[Photo]]:
    """(calibration, held_out): distinct photos in digest order, every 1/share-th one held out; disjoint."""
    if not 0.0 < held_out_share < 1.0:
        raise ValueError(f"held-out share must be in (0, 1); got {held_out_share}")
    unique = {photo.sha256: photo for photo in photos}
    ordered = [unique[digest] for digest in sorted(unique)][:max_photos]
    calibration: list[Photo] = []
    held_out: list[Photo] = []
    for i, photo in enumerate(ordered):
        chosen = math.floor((i + 1) * held_out_share) > math.floor(i * held_out_share)
        (held_out if chosen else calibration).append(photo)
    if not calibration or not held_out:
        raise ValueError(f"need at least 2 distinct photos to calibrate and measure agreement; got {len(ordered)}")
    return calibration, held_out


@dataclass
class RuntimeInputs:
    """What the runtime feeds each model for a set of photos: letterboxed images, the fp32 detections (one list
    per readable photo) and the classifier crops cut from them."""

    photos: list[Photo]
    images: list[det_ops.Letterboxed] = field(default_factory=list)
    detections: list[list[dict]] = field(default_factory=list)
    crops: list[np.ndarray] = field(default_factory=list)
    detection_crops: int = 0
    whole_photo_crops: int = 0
    unreadable: list[str] = field(default_factory=list)  # digests of photos that did not decode

    def describe(self, model: str) -> dict[str, Any]:
        """Counts and photo digests for the manifest."""
        described: dict[str, Any] = {"photos": len(self.photos) - len(self.unreadable)}
        if model == "classifier":
            described.update(crops=len(self.crops), detection_crops=self.detection_crops,
                             whole_photo_crops=self.whole_photo_crops)
        else:
            described["images"] = len(self.images)
        described["sha256"] = [p.sha256 for p in self.photos if p.sha256 not in self.unreadable]
        return described


def _detector_config(bundle: Bundle) -> det_ops.DetectorConfig:
    fields = det_ops.DetectorConfig.__dataclass_fields__
    preprocessing = bundle.model("detector").preprocessing if bundle.has_model("detector") else {}
    return det_ops.DetectorConfig(**{k: v for k, v in preprocessing.items() if k in fields})


def _classification_threshold(bundle: Bundle) -> float:
    value = (bundle.manifest.get("speciesnet") or {}).get("detection_threshold_for_classification")
    return float(value) if isinstance(value, (int, float)) else DEFAULT_DETECTION_THRESHOLD_FOR_CLASSIFICATION


def runtime_inputs(bundle: Bundle, photos: Sequence[Photo]) -> RuntimeInputs:
    """Decodes and letterboxes each photo as `trapedge run` does, runs the fp32 detector, and cuts the crops
    the runtime would classify (detections at or above the bundle's classification threshold); a photo with
    none gives one whole-photo crop. Without a detector in the bundle every photo gives a whole-photo crop."""
    config = _detector_config(bundle)
    threshold = _classification_threshold(bundle)
    session = _session(bundle.model("detector").path) if bundle.has_model("detector") else None
    result = RuntimeInputs(list(photos))
    for photo in photos:
        image = decode(photo.record)
        if not image.ok:
            result.unreadable.append(photo.sha256)
            continue
        boxed = det_ops.letterbox(image.pixels, config)
        result.images.append(boxed)
        detections: list[dict] = []
        if session is not None:
            (raw,) = session.run(None, {session.get_inputs()[0].name: det_ops.to_network_input([boxed])})
            detections = det_ops.postprocess(raw[0], boxed.shape, boxed, config)
        result.detections.append(detections)
        crops = [cls_ops.preprocess_crop(image.pixels, d["bbox"]) for d in detections if d["conf"] >= threshold]
        crops = [c for c in crops if c is not None]
        result.detection_crops += len(crops)
        if not crops:
            crops = [cls_ops.preprocess_crop(image.pixels, [0.0, 0.0, 1.0, 1.0])]
            result.whole_photo_crops += 1
        result.crops += crops
    return result


# --- static int8 -----------------------------------------------------------------------------------------


class FeedReader:
    """onnxruntime CalibrationDataReader over prepared items, converted to network inputs batch by batch.

    `set_range` (in batches) lets the calibrator take one batch per pass (quantize_static's
    CalibStridedMinMax), so histogram methods never hold more than one batch of activations and the
    detector's letterboxed shapes may differ from photo to photo.
    """

    def __init__(self, input_name: str, items: Sequence[Any], to_input: Callable[[list], np.ndarray],
                 batch: int = 1) -> None:
        self.input_name, self.items, self.to_input, self.batch = input_name, list(items), to_input, max(1, batch)
        self._next, self._end = 0, len(self)

    def get_next(self) -> Optional[dict[str, np.ndarray]]:
        if self._next >= self._end:
            return None
        part = self.items[self._next * self.batch : (self._next + 1) * self.batch]
        self._next += 1
        return {self.input_name: np.ascontiguousarray(self.to_input(part), dtype=np.float32)}

    def set_range(self, start_index: int, end_index: int) -> None:
        self._next, self._end = max(0, start_index), min(len(self), end_index)

    def rewind(self) -> None:
        self.set_range(0, len(self))

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        feed = self.get_next()
        if feed is None:
            raise StopIteration
        return feed

    def __len__(self) -> int:
        return math.ceil(len(self.items) / self.batch)


def model_reader(model: str, input_name: str, inputs: RuntimeInputs) -> FeedReader:
    """The calibration reader for a bundle model: crops for the classifier, letterboxed photos for the detector."""
    if model == "detector":
        return FeedReader(input_name, inputs.images, det_ops.to_network_input)
    return FeedReader(input_name, inputs.crops, cls_ops.to_network_input)


def boundary_nodes(model: onnx.ModelProto) -> dict[str, list[str]]:
    """Names of the first compute nodes (reached from a graph input through no other Conv/MatMul/Gemm), the last
    ones (reaching a graph output through no other), and the float tail between the last ones and the outputs
    (the detector's box decoding)."""
    graph = model.graph
    nodes = list(graph.node)
    initializers = {t.name for t in graph.initializer}
    consumers: dict[str, list[int]] = {}
    producer: dict[str, int] = {}
    for i, node in enumerate(nodes):
        for name in node.input:
            consumers.setdefault(name, []).append(i)
        for name in node.output:
            producer[name] = i

    def walk(start: list[int], step) -> tuple[list[int], list[int]]:
        """From `start`, follow `step` until a compute node: (compute nodes reached, nodes passed on the way)."""
        found: list[int] = []
        passed: list[int] = []
        seen: set[int] = set()
        stack = list(start)
        while stack:
            i = stack.pop()
            if i in seen:
                continue
            seen.add(i)
            if nodes[i].op_type in _COMPUTE_OPS:
                found.append(i)
                continue
            passed.append(i)
            stack += step(i)
        return found, passed

    first, _ = walk([i for inp in graph.input if inp.name not in initializers for i in consumers.get(inp.name, [])],
                    lambda i: [j for name in nodes[i].output for j in consumers.get(name, [])])
    last, tail = walk([producer[out.name] for out in graph.output if out.name in producer],
                      lambda i: [producer[name] for name in nodes[i].input if name in producer])
    name = lambda i: nodes[i].name  # noqa: E731
    return {"first": sorted(map(name, first)), "last": sorted(map(name, last)), "tail": sorted(map(name, tail))}


def _named(model: onnx.ModelProto) -> onnx.ModelProto:
    """Gives every unnamed node a unique name (nodes_to_exclude addresses nodes by name)."""
    used = {node.name for node in model.graph.node if node.name}
    for i, node in enumerate(model.graph.node):
        if not node.name:
            candidate = f"{node.op_type}_{i}"
            while candidate in used:
                candidate += "_"
            node.name = candidate
            used.add(candidate)
    return model


def _qdq_counts(model: onnx.ModelProto) -> dict[str, Any]:
    """QuantizeLinear/DequantizeLinear counts and the Conv weights stored as int8 per output channel."""
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    initializers = {t.name: t for t in model.graph.initializer}
    dequantized = {node.output[0]: node for node in model.graph.node if node.op_type == "DequantizeLinear"}
    per_channel = float_convs = 0
    for node in model.graph.node:
        if node.op_type != "Conv":
            continue
        source = dequantized.get(node.input[1])
        weight = initializers.get(source.input[0]) if source is not None else None
        scale = initializers.get(source.input[1]) if source is not None else None
        if weight is not None and weight.data_type == onnx.TensorProto.INT8 and scale is not None \
                and len(scale.dims) == 1 and scale.dims[0] == weight.dims[0]:
            per_channel += 1
        else:
            float_convs += 1
    return {"QuantizeLinear": counts.get("QuantizeLinear", 0), "DequantizeLinear": counts.get("DequantizeLinear", 0),
            "int8_per_channel_convs": per_channel, "float_convs": float_convs}


def quantize_int8_static(
    onnx_in: Path,
    onnx_out: Path,
    reader: Any,
    *,
    method: str = DEFAULT_METHOD,
    exclude: Union[str, Sequence[str]] = "boundary",
    op_types: Optional[Sequence[str]] = None,
    preprocess: bool = True,
    activations: str = "int8",
) -> dict[str, Any]:
    """Writes a static int8 QDQ copy: int8 symmetric per-channel weights, per-tensor activations calibrated
    with `method` on the reader's batches.

    `activations="int8"` (symmetric, zero point 0) is what TensorRT accepts; `"uint8"` (asymmetric) is
    onnxruntime's x86 CPU format, which fuses every convolution into QLinearConv (with int8 activations it
    leaves most of them as float Conv behind DequantizeLinear) but which TensorRT refuses. `op_types` defaults
    to the weighted layers for int8 and to those plus the elementwise layers (CPU_OP_TYPES) for uint8.

    `exclude="boundary"` keeps the first and last Conv/MatMul/Gemm and the float tail after them (the
    detector's Detect convolutions and box decoding, the classifier's head) in float; a list names nodes
    (after pre-processing) instead. `preprocess` runs onnxruntime's quant_pre_process (shape inference and
    graph optimisation) first.
    """
    import onnxruntime
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    if method not in methods:
        raise ValueError(f"unknown calibration method {method!r}; expected one of {', '.join(methods)}")
    if activations not in ACTIVATIONS:
        raise ValueError(f"unknown activation type {activations!r}; expected one of {', '.join(ACTIVATIONS)}")
    symmetric = activations == "int8"
    op_types = tuple(op_types) if op_types is not None else (QUANTIZED_OP_TYPES if symmetric else CPU_OP_TYPES)
    onnx_in, onnx_out = Path(onnx_in), Path(onnx_out)
    onnx_out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="trapedge-int8-") as tmp:
        source = Path(tmp) / "named.onnx"
        onnx.save(_named(onnx.load(str(onnx_in))), str(source))
        if preprocess:
            # ONNX shape inference and graph optimisation; symbolic shape inference (for transformers) is
            # skipped: it gives up on the detector's dynamic height and width, leaving files in the CWD.
            prepared = Path(tmp) / "prepared.onnx"
            quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
            source = prepared
        boundary = boundary_nodes(onnx.load(str(source), load_external_data=False))
        if exclude == "boundary":
            excluded = sorted(set(boundary["first"] + boundary["last"] + boundary["tail"]))
        elif isinstance(exclude, str):
            raise ValueError(f"exclude must be 'boundary' or a list of node names; got {exclude!r}")
        else:
            excluded = list(exclude)
        out_tmp = Path(tmp) / "int8.onnx"
        quantize_static(
            str(source), str(out_tmp), reader, quant_format=QuantFormat.QDQ, op_types_to_quantize=list(op_types),
            per_channel=True, reduce_range=False, weight_type=QuantType.QInt8,
            activation_type=QuantType.QInt8 if symmetric else QuantType.QUInt8,
            nodes_to_exclude=excluded, calibrate_method=methods[method],
            extra_options={"ActivationSymmetric": symmetric, "WeightSymmetric": True, "CalibStridedMinMax": 1},
        )
        model = onnx.load(str(out_tmp))
    _save(model, onnx_out)
    return {"method": "int8-static", "tool": f"onnxruntime {onnxruntime.__version__} quantize_static",
            "format": "QDQ", "calibration_method": method, "weights": "int8 symmetric per output channel",
            "activations": "int8 symmetric per tensor" if symmetric else "uint8 asymmetric per tensor",
            "tensorrt": symmetric, "op_types": list(op_types), "pre_processed": preprocess,
            "excluded_nodes": excluded, "quantized_nodes": _qdq_counts(model),
            "bytes_in": onnx_in.stat().st_size, "bytes_out": onnx_out.stat().st_size}


# --- agreement -------------------------------------------------------------------------------------------


def _session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def _run_batched(session, inputs: Mapping[str, np.ndarray], batch: int) -> dict[str, np.ndarray]:
    names = [o.name for o in session.get_outputs()]
    count = len(next(iter(inputs.values())))
    parts: list[list[np.ndarray]] = []
    for start in range(0, count, batch):
        parts.append(session.run(names, {k: v[start : start + batch] for k, v in inputs.items()}))
    return {name: np.concatenate([p[i] for p in parts]) for i, name in enumerate(names)}


def _topk(values: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-values, axis=-1, kind="stable")[:, :k]


def classifier_agreement(
    original: Path,
    quantized: Path,
    inputs: Inputs,
    *,
    logits: str = "logits",
    features: str = "features",
    batch: int = 8,
) -> dict[str, Any]:
    """Top-1/top-5 agreement, largest logit difference and the pooled features' cosine (mean and minimum over
    inputs), both models on onnxruntime CPU."""
    reference_session, candidate_session = _session(Path(original)), _session(Path(quantized))
    if isinstance(inputs, np.ndarray):
        inputs = {reference_session.get_inputs()[0].name: inputs}
    inputs = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in inputs.items()}
    reference = _run_batched(reference_session, inputs, batch)
    candidate = _run_batched(candidate_session, inputs, batch)
    logits_name = logits if logits in reference else next(iter(reference))
    ref = reference[logits_name].reshape(len(reference[logits_name]), -1)
    cand = candidate[logits_name].reshape(len(ref), -1)
    k = min(5, ref.shape[-1])
    ref_top, cand_top = _topk(ref, k), _topk(cand, k)
    result: dict[str, Any] = {
        "count": int(len(ref)),
        "logits": logits_name,
        "top1_agreement": float(np.mean(ref_top[:, 0] == cand_top[:, 0])),
        "top5_agreement": float(np.mean(np.all(ref_top == cand_top, axis=-1))),
        "top1_in_top5": float(np.mean([r in c for r, c in zip(ref_top[:, 0], cand_top)])),
        "max_logit_diff": float(np.abs(ref.astype(np.float64) - cand).max()),
        "feature_cosine": None,
        "min_feature_cosine": None,
        "max_feature_diff": None,
    }
    if features in reference and features != logits_name:
        a = reference[features].reshape(len(ref), -1).astype(np.float64)
        b = candidate[features].reshape(len(ref), -1).astype(np.float64)
        norms = np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-30)
        cosine = (a * b).sum(-1) / norms
        result["feature_cosine"] = float(cosine.mean())
        result["min_feature_cosine"] = float(cosine.min())
        result["max_feature_diff"] = float(np.abs(a - b).max())
    return result


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of two normalised [xmin, ymin, w, h] boxes (invariant to the image's size)."""
    ax0, ay0, aw, ah = a
    bx0, by0, bw, bh = b
    w = min(ax0 + aw, bx0 + bw) - max(ax0, bx0)
    h = min(ay0 + ah, by0 + bh) - max(ay0, by0)
    inter = max(w, 0.0) * max(h, 0.0)
    union = aw * ah + bw * bh - inter
    return inter / union if union > 0 else 0.0


def match_boxes(
    reference: Sequence[Mapping[str, Any]],
    candidate: Sequence[Mapping[str, Any]],
    *,
    min_conf: float = BOX_MIN_CONF,
    min_iou: float = BOX_MIN_IOU,
    conf_tolerance: float = BOX_CONF_TOLERANCE,
) -> list[tuple[int, Optional[int], float, Optional[float]]]:
    """For each reference detection with conf >= min_conf, highest first: (reference index, the candidate it is
    found as or None, IoU, conf difference). Found means same category, IoU >= min_iou and |conf difference|
    <= conf_tolerance; each candidate is used once, the best-overlapping eligible one."""
    used: set[int] = set()
    order = sorted((i for i, d in enumerate(reference) if d["conf"] >= min_conf), key=lambda i: -reference[i]["conf"])
    matches: list[tuple[int, Optional[int], float, Optional[float]]] = []
    for i in order:
        ref = reference[i]
        best: Optional[int] = None
        best_iou = 0.0
        for j, cand in enumerate(candidate):
            if j in used or cand["category"] != ref["category"]:
                continue
            iou = box_iou(ref["bbox"], cand["bbox"])
            if iou >= min_iou - _EPS and abs(cand["conf"] - ref["conf"]) <= conf_tolerance + _EPS and iou > best_iou:
                best, best_iou = j, iou
        if best is None:
            matches.append((i, None, 0.0, None))
        else:
            used.add(best)
            matches.append((i, best, best_iou, float(candidate[best]["conf"] - ref["conf"])))
    return matches


def detector_agreement(
    original: Path,
    quantized: Path,
    images: Sequence[det_ops.Letterboxed],
    config: det_ops.DetectorConfig = det_ops.DetectorConfig(),
) -> dict[str, Any]:
    """Share of the fp32 model's boxes (conf >= BOX_MIN_CONF) the quantised model finds, after the runtime's
    own NMS and box scaling on each letterboxed image; both models on onnxruntime CPU."""
    reference_session, candidate_session = _session(Path(original)), _session(Path(quantized))
    name = reference_session.get_inputs()[0].name
    boxes = found = candidates = 0
    ious: list[float] = []
    deltas: list[float] = []
    for boxed in images:
        x = det_ops.to_network_input([boxed])
        (ref_raw,) = reference_session.run(None, {name: x})
        (cand_raw,) = candidate_session.run(None, {name: x})
        reference = det_ops.postprocess(ref_raw[0], boxed.shape, boxed, config)
        candidate = det_ops.postprocess(cand_raw[0], boxed.shape, boxed, config)
        candidates += sum(d["conf"] >= BOX_MIN_CONF for d in candidate)
        for _, j, iou, delta in match_boxes(reference, candidate):
            boxes += 1
            if j is not None:
                found += 1
                ious.append(iou)
                deltas.append(abs(delta))
    return {
        "count": len(images),
        "boxes": boxes,
        "found": found,
        "boxes_found": found / boxes if boxes else None,
        "quantized_boxes": candidates,
        "min_conf": BOX_MIN_CONF,
        "min_iou": BOX_MIN_IOU,
        "conf_tolerance": BOX_CONF_TOLERANCE,
        "min_iou_found": min(ious) if ious else None,
        "max_conf_diff_found": max(deltas) if deltas else None,
    }


# --- bundle ----------------------------------------------------------------------------------------------


def _opset(path: Path) -> Optional[int]:
    model = onnx.load(str(path), load_external_data=False)
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)


def _bundle_root(bundle: Union[Bundle, Path, str]) -> Path:
    return bundle.root if isinstance(bundle, Bundle) else Path(bundle)


def _floors(model_name: str, floor: Optional[float]) -> Optional[dict[str, float]]:
    if floor is None:
        return None
    metrics = ("boxes_found",) if model_name == "detector" else ("top1_agreement", "feature_cosine")
    return {metric: float(floor) for metric in metrics}


def _figure(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _verdict(measured: Mapping[str, Any], floors: Optional[Mapping[str, float]]) -> str:
    if not floors:
        return ""
    below = [f"{m} {_figure(measured.get(m))} < {f}" for m, f in floors.items()
             if not isinstance(measured.get(m), (int, float)) or measured[m] < f]
    return f"; below the floor ({', '.join(below)}), so it will be refused" if below else ""


def _agreement(model_name: str, base: Mapping[str, Any], source: Path, target: Path,
               held_out: RuntimeInputs) -> tuple[dict[str, Any], str]:
    """The quantised model's agreement with fp32 on the held-out inputs, and a phrase saying it."""
    if model_name == "detector":
        config = det_ops.DetectorConfig(**{k: v for k, v in base.get("preprocessing", {}).items()
                                           if k in det_ops.DetectorConfig.__dataclass_fields__})
        measured = detector_agreement(source, target, held_out.images, config)
        return measured, f"{measured['found']}/{measured['boxes']} fp32 boxes (conf >= {BOX_MIN_CONF}) found"
    measured = classifier_agreement(source, target,
                                    {base["inputs"][0]["name"]: cls_ops.to_network_input(held_out.crops)})
    return measured, (f"top-1 agreement {_figure(measured['top1_agreement'])}, "
                      f"mean feature cosine {_figure(measured['feature_cosine'])}")


def add_quantized_model(
    bundle: Union[Bundle, Path, str],
    model_name: str,
    precision: str,
    held_out: RuntimeInputs,
    floor: Optional[float],
    *,
    calibration: Optional[RuntimeInputs] = None,
    method: str = DEFAULT_METHOD,
    options: Optional[Mapping[str, Any]] = None,
    log: Callable[[str], None] = logger.info,
) -> dict[str, Any]:
    """Quantises a bundle model, measures its agreement with fp32 on the held-out inputs, records
    models[f"{name}_{precision}"] and rewrites manifest.json. int8 needs `calibration`, sharing no photo
    with `held_out`."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
    if floor is not None and not 0.0 <= floor <= 1.0:
        raise ValueError(f"agreement floor must be in [0, 1]; got {floor}")
    root = _bundle_root(bundle)
    manifest_path = root / MANIFEST
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    base = manifest["models"].get(model_name)
    if base is None:
        raise ValueError(f"{manifest_path}: no model {model_name!r} to quantise")
    if base.get("base_model"):
        raise ValueError(f"{manifest_path}: {model_name!r} is already derived from {base['base_model']!r}")
    if model_name not in MODELS:
        raise ValueError(f"{model_name!r}: only {' and '.join(MODELS)} are quantised (their agreement is defined)")
    if precision == "fp16" and model_name not in FP16_MODELS:
        raise ValueError(f"fp16 covers the {' and '.join(FP16_MODELS)} only (the float16 converters break the "
                         f"{model_name}'s output decoding); use int8 for the {model_name}")
    source = root / base["file"]
    target = source.with_name(f"{source.stem}_{precision}.onnx")
    input_name = base["inputs"][0]["name"]
    calibrated: Optional[dict[str, Any]] = None
    floors = _floors(model_name, floor)
    if model_name == "classifier" and not held_out.crops:
        raise ValueError("no readable held-out photos to measure agreement on")
    if precision == "fp16":
        method_info = quantize_fp16(source, target, **dict(options or {}))
        measured, on = _agreement(model_name, base, source, target, held_out)
    else:
        if calibration is None:
            raise ValueError("int8 needs calibration photos")
        shared = {p.sha256 for p in calibration.photos} & {p.sha256 for p in held_out.photos}
        if shared:
            raise ValueError(f"{len(shared)} photos are in both the calibration and the held-out set")
        reader = model_reader(model_name, input_name, calibration)
        if not len(reader):
            raise ValueError("no readable calibration photos")
        options = dict(options or {})
        attempts = [options]
        if options.get("activations") == "uint8" and "op_types" not in options:
            attempts = [{**options, "op_types": CPU_OP_TYPES}, {**options, "op_types": QUANTIZED_OP_TYPES}]
        tried: list[dict[str, Any]] = []
        for attempt in attempts:
            reader.rewind()
            method_info = quantize_int8_static(source, target, reader, method=method, **attempt)
            measured, on = _agreement(model_name, base, source, target, held_out)
            verdict = _verdict(measured, floors)
            if not verdict or attempt is attempts[-1]:
                break
            log(f"{target.name}: int8 {', '.join(attempt['op_types'])}: {on}{verdict}; quantising the "
                "convolutions only")
            tried.append({"op_types": list(attempt["op_types"]),
                          "agreement": {k: v for k, v in measured.items() if isinstance(v, (int, float))}})
        if tried:
            method_info["tried_first"] = tried
        calibrated = calibration.describe(model_name)
    measured["held_out"] = held_out.describe(model_name)
    entry = {k: v for k, v in base.items() if k not in ("parity", "sha256", "file")}
    entry.update(file=target.name, sha256=sha256_file(target), opset=_opset(target), precision=precision,
                 base_model=model_name, quantization=method_info, agreement=measured, agreement_floor=floors)
    if calibrated is not None:
        entry["calibration"] = calibrated
    manifest["models"][f"{model_name}_{precision}"] = entry
    tmp = manifest_path.with_name(f".{MANIFEST}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, manifest_path)
    log(f"{target.name}: {precision}, {on} on {measured['count']} held-out inputs{_verdict(measured, floors)}")
    return entry


def quantize_bundle(
    bundle: Union[Bundle, Path, str],
    precision: str,
    *,
    models: Optional[Sequence[str]] = None,
    images: Sequence[Union[Path, str]] = (),
    floor: Optional[float] = DEFAULT_FLOOR,
    method: str = DEFAULT_METHOD,
    activations: str = "int8",
    max_photos: Optional[int] = 64,
    log: Callable[[str], None] = logger.info,
) -> dict[str, dict[str, Any]]:
    """`trapedge quantize`: the packaged sample photos plus `images`, split into calibration and held-out
    photos, then each model (default: every one of MODELS the bundle has; fp16: FP16_MODELS) quantised and
    recorded."""
    loaded = bundle if isinstance(bundle, Bundle) else Bundle.load(Path(bundle))
    names = list(models) if models is not None else \
        [m for m in (FP16_MODELS if precision == "fp16" else MODELS) if loaded.has_model(m)]
    for name in names:
        if name not in MODELS:
            raise ValueError(f"unknown model {name!r}; expected one of {', '.join(MODELS)}")
        if precision == "fp16" and name not in FP16_MODELS:
            raise ValueError(f"fp16 covers the {' and '.join(FP16_MODELS)} only; use int8 for the {name}")
        if not loaded.has_model(name):
            raise ValueError(f"{loaded.root / MANIFEST}: no model {name!r} to quantise")
    calibration_photos, held_out_photos = split_photos(collect_photos([SAMPLE_DATA, *images]),
                                                       max_photos=max_photos)
    log(f"{len(calibration_photos)} calibration and {len(held_out_photos)} held-out photos")
    held_out = runtime_inputs(loaded, held_out_photos)
    calibration = runtime_inputs(loaded, calibration_photos) if precision == "int8" else None
    options = {"activations": activations} if precision == "int8" else None
    return {name: add_quantized_model(loaded, name, precision, held_out, floor, calibration=calibration,
                                      method=method, options=options, log=log)
            for name in names}
