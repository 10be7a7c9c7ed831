"""Compares a torch model with its ONNX export on stated inputs; the numbers go into the manifest."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

__all__ = ["ort_session", "compare_outputs", "topk_agreement"]


def ort_session(path: Path):
    """A CPU onnxruntime session for parity checks."""
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def topk_agreement(reference: np.ndarray, candidate: np.ndarray, k: int) -> float:
    """Share of rows whose top-k index lists (in order) agree."""
    ref = np.argsort(-reference, axis=-1, kind="stable")[:, :k]
    cand = np.argsort(-candidate, axis=-1, kind="stable")[:, :k]
    return float(np.mean(np.all(ref == cand, axis=-1)))


def compare_outputs(
    names: Sequence[str], reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray]
) -> dict:
    """Max absolute and relative difference per output."""
    result = {}
    for name, ref, cand in zip(names, reference, candidate):
        diff = np.abs(ref.astype(np.float64) - cand.astype(np.float64))
        scale = max(float(np.abs(ref).max()), 1e-12)
        result[name] = {"max_abs_diff": float(diff.max()), "max_rel_diff": float(diff.max() / scale)}
    return result


def torch_outputs(module: torch.nn.Module, batch: np.ndarray) -> list[np.ndarray]:
    """Runs a module under no_grad and returns its outputs as numpy arrays."""
    with torch.no_grad():
        out = module(torch.from_numpy(batch))
    if isinstance(out, torch.Tensor):
        out = (out,)
    return [o.detach().cpu().numpy() for o in out]
