"""fp16 and dynamic int8 copies of bundle models, with their agreement to the fp32 model recorded in the manifest."""

from __future__ import annotations

import heapq
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import numpy as np
import onnx
from onnx import helper

from trapedge.runtime.bundle import MANIFEST, Bundle, sha256_file

__all__ = ["CONV_OP_TYPES", "DEFAULT_OP_TYPES", "PRECISIONS", "add_quantized_model", "agreement", "quantize_fp16", "quantize_int8_dynamic"]

logger = logging.getLogger("trapedge.export")

PRECISIONS = ("fp16", "int8")
MAX_IR_VERSION = 9
DEFAULT_OP_TYPES = ("MatMul", "Gemm")
CONV_OP_TYPES = ("Conv", "MatMul", "Gemm")
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


def quantize_int8_dynamic(
    onnx_in: Path,
    onnx_out: Path,
    *,
    weight_type: str = "qint8",
    per_channel: bool = False,
    op_types: Sequence[str] = DEFAULT_OP_TYPES,
) -> dict[str, Any]:
    """Writes a dynamically quantised copy (int8 weights, activations quantised per call); ORT CPU only.

    The default quantises MatMul/Gemm only (transformer encoders, heads). CONV_OP_TYPES adds Conv, which
    ORT runs as ConvInteger: smaller files, but on EfficientNetV2-M slower than fp32 and far less faithful.
    """
    import onnxruntime
    from onnxruntime.quantization import QuantType, quantize_dynamic

    types = {"qint8": QuantType.QInt8, "quint8": QuantType.QUInt8}
    if weight_type not in types:
        raise ValueError(f"unknown weight type {weight_type!r}; expected qint8 or quint8")
    onnx_in, onnx_out = Path(onnx_in), Path(onnx_out)
    onnx_out.parent.mkdir(parents=True, exist_ok=True)
    quantize_dynamic(onnx_in, onnx_out, op_types_to_quantize=list(op_types), per_channel=per_channel,
                     weight_type=types[weight_type])
    model = onnx.load(str(onnx_out))
    _save(model, onnx_out)
    counts: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type in ("ConvInteger", "MatMulInteger", "DynamicQuantizeLinear", "QLinearMatMul"):
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return {"method": "int8-dynamic", "tool": f"onnxruntime {onnxruntime.__version__} quantize_dynamic",
            "weight_type": weight_type, "per_channel": per_channel, "op_types": list(op_types),
            "quantized_nodes": counts, "bytes_in": onnx_in.stat().st_size,
            "bytes_out": onnx_out.stat().st_size}


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


def agreement(
    original: Path,
    quantized: Path,
    inputs: Inputs,
    *,
    logits: str = "logits",
    features: str = "features",
    batch: int = 8,
) -> dict[str, Any]:
    """Top-1/top-5 agreement and largest logit and feature differences, both models on onnxruntime CPU."""
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
        "max_feature_diff": None,
        "min_feature_cosine": None,
    }
    if features in reference and features != logits_name:
        a = reference[features].reshape(len(ref), -1).astype(np.float64)
        b = candidate[features].reshape(len(ref), -1).astype(np.float64)
        norms = np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-30)
        result["max_feature_diff"] = float(np.abs(a - b).max())
        result["min_feature_cosine"] = float(((a * b).sum(-1) / norms).min())
    return result


def _opset(path: Path) -> Optional[int]:
    model = onnx.load(str(path), load_external_data=False)
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)


def _bundle_root(bundle: Union[Bundle, Path, str]) -> Path:
    return bundle.root if isinstance(bundle, Bundle) else Path(bundle)


def add_quantized_model(
    bundle: Union[Bundle, Path, str],
    model_name: str,
    precision: str,
    inputs: Inputs,
    floor: Optional[float],
    *,
    inputs_description: Optional[str] = None,
    options: Optional[Mapping[str, Any]] = None,
    log: Callable[[str], None] = logger.info,
) -> dict[str, Any]:
    """Quantises a bundle model, records models[f"{name}_{precision}"] with its agreement, rewrites manifest.json."""
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
    source = root / base["file"]
    target = source.with_name(f"{source.stem}_{precision}.onnx")
    quantize = quantize_fp16 if precision == "fp16" else quantize_int8_dynamic
    method = quantize(source, target, **dict(options or {}))
    measured = agreement(source, target, inputs)
    if inputs_description:
        measured["inputs"] = inputs_description
    entry = {k: v for k, v in base.items() if k not in ("parity", "sha256", "file")}
    entry.update(
        file=target.name, sha256=sha256_file(target), opset=_opset(target), precision=precision,
        base_model=model_name,
        quantization=method, agreement=measured, agreement_floor=floor,
    )
    manifest["models"][f"{model_name}_{precision}"] = entry
    tmp = manifest_path.with_name(f".{MANIFEST}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, manifest_path)
    verdict = "" if floor is None or measured["top1_agreement"] >= floor else "; below the floor, so it will be refused"
    log(f"{target.name}: {precision} top-1 agreement {measured['top1_agreement']:.3f} "
        f"on {measured['count']} inputs{verdict}")
    return entry
