"""Floating-point operations of an ONNX graph at given input shapes, counted from the graph itself.

Written by hand because no well-kept library counts FLOPs of an arbitrary ONNX graph (onnx-tool and the like are
unmaintained or pull in torch): convolutions, matrix products and Gemm, the layers that hold nearly all the work
of a detector, a convnet classifier or a ViT, at 2 operations per multiply-add. Elementwise layers are left out,
so the figure is a slight undercount and GFLOP/s derived from it a lower bound.
"""

from __future__ import annotations

from pathlib import Path
from typing import Union

__all__ = ["graph_flops"]


def _product(values) -> int:
    total = 1
    for v in values:
        total *= int(v)
    return total


def graph_flops(path: Union[str, Path], shapes: dict[str, tuple[int, ...]]) -> float:
    """Operations of one call of the model at these input shapes (a dict of input name to shape)."""
    import onnx
    from onnx import shape_inference

    model = onnx.load(str(path))
    for graph_input in model.graph.input:
        if graph_input.name in shapes:
            dims = graph_input.type.tensor_type.shape.dim
            for dim, size in zip(dims, shapes[graph_input.name]):
                dim.ClearField("dim_param")
                dim.dim_value = int(size)
    inferred = shape_inference.infer_shapes(model, data_prop=True)
    known: dict[str, list[int]] = {}
    for info in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
        dims = [d.dim_value if d.HasField("dim_value") else 0 for d in info.type.tensor_type.shape.dim]
        known[info.name] = dims
    for init in inferred.graph.initializer:
        known[init.name] = list(init.dims)
    total = 0.0
    for node in inferred.graph.node:
        out = known.get(node.output[0]) if node.output else None
        if not out or 0 in out:
            continue
        if node.op_type == "Conv" and len(node.input) > 1 and known.get(node.input[1]):
            weight = known[node.input[1]]
            total += 2.0 * _product(out) * _product(weight[1:])
        elif node.op_type == "MatMul" and known.get(node.input[0]):
            total += 2.0 * _product(out) * known[node.input[0]][-1]
        elif node.op_type == "Gemm" and known.get(node.input[0]):
            trans_a = next((a.i for a in node.attribute if a.name == "transA"), 0)
            a = known[node.input[0]]
            total += 2.0 * _product(out) * (a[0] if trans_a else a[-1])
    return total
