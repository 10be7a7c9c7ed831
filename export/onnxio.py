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
    """Exports with the dynamo exporter, falling back to TorchScript; returns which one succeeded."""
    path = Path(path)
    module = module.eval()
    errors = []
    with torch.no_grad():
        if dynamo_shapes is not None:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    torch.onnx.export(
                        module, (example,), str(path), dynamo=True, external_data=False,
                        input_names=[input_name], output_names=list(output_names),
                        dynamic_shapes=dynamo_shapes(), opset_version=max(opset, 18),
                        optimize=True, verbose=False,
                    )
                finalize_onnx(path, opset)
                return "dynamo"
            except Exception as e:  # the dynamo exporter raises many types; TorchScript is the fallback
                errors.append(f"dynamo: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
                log(f"dynamo exporter failed ({errors[-1]}); falling back to the TorchScript exporter")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module, (example,), str(path), dynamo=False, opset_version=opset,
                input_names=[input_name], output_names=list(output_names),
                dynamic_axes={input_name: dynamic_dims, **{n: {0: "batch"} for n in output_names}},
            )
    finalize_onnx(path, opset)
    return "torchscript"
