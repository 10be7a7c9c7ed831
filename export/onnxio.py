"""torch to ONNX with the settings edge targets need: opset 17, IR <= 9, dynamic batch, one file."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Callable, Optional, Sequence

import onnx
import torch
from onnx import version_converter

__all__ = ["MAX_IR_VERSION", "export_onnx", "finalize_onnx"]

logger = logging.getLogger("trapedge.export")

MAX_IR_VERSION = 9  # onnxruntime <= 1.17 and TensorRT 8.6/10.3 (JetPack 6) read nothing newer


def finalize_onnx(path: Path, opset: int) -> onnx.ModelProto:
    """Converts a saved model to the target opset, caps its IR version, checks and rewrites it."""
    model = onnx.load(str(path))
    current = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), opset)
    if current != opset:
        model = version_converter.convert_version(model, opset)
    model.ir_version = min(model.ir_version, MAX_IR_VERSION)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return model


def _dynamo(module, example, path, input_name, output_names, opset, dynamo_shapes) -> None:
    torch.onnx.export(
        module, (example,), str(path), dynamo=True, external_data=False,
        input_names=[input_name], output_names=list(output_names),
        dynamic_shapes=dynamo_shapes(), opset_version=max(opset, 18), optimize=True, verbose=False,
    )


def _torchscript(module, example, path, input_name, output_names, opset, dynamic_dims) -> None:
    torch.onnx.export(
        module, (example,), str(path), dynamo=False, opset_version=opset,
        input_names=[input_name], output_names=list(output_names),
        dynamic_axes={input_name: dynamic_dims, **{n: {0: "batch"} for n in output_names}},
    )


def export_onnx(
    module: torch.nn.Module,
    example: torch.Tensor,
    path: Path,
    *,
    input_name: str,
    output_names: Sequence[str],
    dynamic_dims: dict[int, str],
    opset: int = 17,
    dynamo_shapes: Optional[Callable[[], dict]] = None,
    log: Callable[[str], None] = logger.info,
) -> str:
    """Exports and finalizes a model; returns the exporter that succeeded.

    Below opset 18 the TorchScript exporter goes first: the dynamo exporter emits opset 18 and ONNX's
    version converter has no 18 -> 17 adapter for ops these models use (Split, ReduceMean with
    noop_with_empty_axes). From opset 18 on, the dynamo exporter goes first.
    """
    path = Path(path)
    module = module.eval()
    attempts = [("torchscript", lambda: _torchscript(module, example, path, input_name, output_names,
                                                     opset, dynamic_dims))]
    if dynamo_shapes is not None:
        dynamo = ("dynamo", lambda: _dynamo(module, example, path, input_name, output_names, opset,
                                            dynamo_shapes))
        attempts = [dynamo] + attempts if opset >= 18 else attempts + [dynamo]
    errors = []
    for name, attempt in attempts:
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                attempt()
            finalize_onnx(path, opset)
            return name
        except Exception as e:  # exporters raise many types; the next exporter is the answer
            errors.append(f"{name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            log(f"{name} exporter failed ({errors[-1]})")
    raise RuntimeError(f"{path}: no exporter could write this model: {'; '.join(errors)}")
