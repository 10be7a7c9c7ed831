"""Stages 3 and 4 offline (`trapedge fit`): a triplet-loss head over reference embeddings, its ONNX export,
and the reference centroids in head space, written into a bundle.

Defaults are ours (the paper, arXiv 2510.14594, does not publish them): MLP D -> 512 -> 256 with ReLU and
dropout, L2-normalised output, triplet loss on cosine distance with margin 0.2, batch-hard or semi-hard
online mining over P x K batches, Adam.
"""

from __future__ import annotations

import copy
import csv
import json
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, NamedTuple, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from trapedge.runtime.speciesnet.classifier import crop_region
from trapedge.runtime.models.bundle import MANIFEST, Bundle, sha256_file
from trapedge.runtime.speciesnet.ensemble.taxonomy import load_taxonomy, split_label
from trapedge.runtime.card.ingest import ImageRecord, decode
from trapedge.runtime.reclassify.stages import StageConfig, build_centroids, unit_rows

from .onnxio import export_onnx
from .parity import compare_outputs, ort_session, torch_outputs

__all__ = [
    "HEAD_FILE",
    "CENTROIDS_FILE",
    "MINING",
    "PARITY_TOLERANCE",
    "HeadConfig",
    "PKSampler",
    "ReferenceSet",
    "TripletHead",
    "export_head",
    "fit",
    "project",
    "references_from_csv",
    "train_head",
    "triplet_loss",
]

HEAD_FILE = "head.onnx"
CENTROIDS_FILE = "centroids.npz"
MINING = ("batch_hard", "semi_hard")
PARITY_TOLERANCE = 1e-4
PARITY_SEED = 20261203
_EVAL_CHUNK = 2048


@dataclass(frozen=True)
class HeadConfig:
    """Every setting of the stage-4 triplet head and its training (defaults are trapedge's own).

    Attributes:
        hidden: width of the hidden layer (Linear D -> hidden, ReLU, dropout).
        out_dim: width of the head space (Linear hidden -> out_dim, then L2 normalisation).
        dropout: dropout after the hidden layer, during training only.
        margin: triplet margin on cosine distance (1 - cos, in [0, 2]).
        mining: "batch_hard" (hardest positive and hardest negative per anchor) or "semi_hard" (per
            anchor-positive pair, the closest negative farther than the positive but within the margin,
            else the hardest negative).
        p: labels per batch (labels with at least two references; all of them when there are fewer).
        k: references per label in a batch (drawn without replacement, topped up with replacement).
        extra_negatives: references of one-reference labels added to each batch as negatives only.
        epochs: passes; one pass is ceil(references of labels with >= 2 / (p * k)) batches.
        lr: Adam learning rate.
        weight_decay: Adam weight decay (L2 penalty).
        normalize_input: L2-normalise the input inside the graph, so any embedding scale works.
        seed: seeds weight init, dropout and the sampler; the same seed gives the same weights on CPU.
        threads: torch CPU threads while training (1 is fastest for this small MLP, even on a loaded
            machine, and keeps the weights independent of the core count).
    """

    hidden: int = 512
    out_dim: int = 256
    dropout: float = 0.1
    margin: float = 0.2
    mining: str = "batch_hard"
    p: int = 8
    k: int = 4
    extra_negatives: int = 4
    epochs: int = 40
    lr: float = 1e-3
    weight_decay: float = 1e-4
    normalize_input: bool = True
    seed: int = 0
    threads: int = 1

    def __post_init__(self) -> None:
        if self.mining not in MINING:
            raise ValueError(f"mining must be one of {MINING}, got {self.mining!r}")
        if self.hidden < 1 or self.out_dim < 1:
            raise ValueError(f"hidden and out_dim must be positive, got {self.hidden} and {self.out_dim}")
        if self.p < 1 or self.k < 2:
            raise ValueError(f"need p >= 1 and k >= 2 (a positive needs two references), got p={self.p}, k={self.k}")
        if self.extra_negatives < 0 or self.epochs < 1:
            raise ValueError(f"need extra_negatives >= 0 and epochs >= 1, got {self.extra_negatives}, {self.epochs}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be within [0, 1), got {self.dropout}")
        if self.margin <= 0 or self.lr <= 0 or self.weight_decay < 0:
            raise ValueError("margin and lr must be positive and weight_decay non-negative")
        if self.threads < 1:
            raise ValueError(f"threads must be at least 1, got {self.threads}")

    def to_dict(self) -> dict:
        """Plain dict (for the manifest)."""
        return asdict(self)


class ReferenceSet(NamedTuple):
    """Labelled reference embeddings: float32 [N, D] and N 7-field SpeciesNet labels."""

    embeddings: np.ndarray
    labels: list[str]


class TripletHead(torch.nn.Module):
    """MLP D -> hidden (ReLU, dropout) -> out_dim with an L2-normalised output."""

    def __init__(self, in_dim: int, config: HeadConfig) -> None:
        super().__init__()
        self.normalize_input = config.normalize_input
        self.mlp = torch.nn.Sequential(
            torch.nn.Linear(in_dim, config.hidden),
            torch.nn.ReLU(),
            torch.nn.Dropout(config.dropout),
            torch.nn.Linear(config.hidden, config.out_dim),
        )

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        if self.normalize_input:
            embedding = F.normalize(embedding, dim=-1)
        return F.normalize(self.mlp(embedding), dim=-1)


def _check_references(embeddings: np.ndarray, labels: Sequence[str]) -> np.ndarray:
    """Validated float32 [N, D] embeddings for N 7-field labels."""
    array = np.asarray(embeddings, dtype=np.float32)
    if array.ndim != 2 or array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"embeddings must be a non-empty [N, D] array, got shape {array.shape}")
    if array.shape[0] != len(labels):
        raise ValueError(f"{array.shape[0]} embeddings but {len(labels)} labels")
    if not np.all(np.isfinite(array)):
        raise ValueError("embeddings contain NaN or infinite values")
    for label in labels:
        split_label(label)
    return array


class PKSampler:
    """P x K batches: P labels with >= 2 references, K references each, plus one-reference labels as negatives."""

    def __init__(self, labels: Sequence[str], config: HeadConfig) -> None:
        groups: dict[str, list[int]] = {}
        for i, label in enumerate(labels):
            groups.setdefault(label, []).append(i)
        self.groups = {lab: np.array(rows) for lab, rows in sorted(groups.items()) if len(rows) >= 2}
        self.singles = np.array(sorted(rows[0] for rows in groups.values() if len(rows) == 1), dtype=np.int64)
        if not self.groups:
            raise ValueError("no label has two or more references, so no positive pair exists")
        if len(self.groups) < 2 and self.singles.size == 0:
            raise ValueError("need at least two labels: one label alone has no negatives")
        self.p = min(config.p, len(self.groups))
        self.k = config.k
        self.extra = min(config.extra_negatives, int(self.singles.size))
        self.batches_per_epoch = max(1, math.ceil(sum(len(r) for r in self.groups.values()) / (self.p * self.k)))
        self.rng = np.random.default_rng(config.seed)
        self._names = list(self.groups)

    def batch(self) -> tuple[np.ndarray, np.ndarray]:
        """One batch: (reference indices, mask of the rows that may be anchors)."""
        rows = []
        for j in self.rng.choice(len(self._names), size=self.p, replace=False):
            members = self.groups[self._names[j]]
            take = self.rng.choice(members, size=min(self.k, members.size), replace=False)
            if take.size < self.k:
                take = np.concatenate([take, self.rng.choice(members, size=self.k - take.size, replace=True)])
            rows.append(take)
        anchors = np.ones(self.p * self.k, dtype=bool)
        if self.extra:
            rows.append(self.rng.choice(self.singles, size=self.extra, replace=False))
            anchors = np.concatenate([anchors, np.zeros(self.extra, dtype=bool)])
        return np.concatenate(rows).astype(np.int64), anchors

    def epoch(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """The batches of one epoch."""
        for _ in range(self.batches_per_epoch):
            yield self.batch()


def triplet_loss(projected: torch.Tensor, label_ids: torch.Tensor, sample_ids: torch.Tensor,
                 anchors: torch.Tensor, margin: float, mining: str) -> tuple[torch.Tensor, float]:
    """Triplet loss on cosine distance of L2-normalised rows; returns (mean loss, share of active triplets)."""
    dist = (1.0 - projected @ projected.T).clamp(0.0, 2.0)
    same = label_ids[:, None] == label_ids[None, :]
    positive = same & (sample_ids[:, None] != sample_ids[None, :]) & anchors[:, None]
    negative = ~same & anchors[:, None]
    inf = torch.tensor(float("inf"), dtype=dist.dtype)
    if mining == "batch_hard":
        valid = positive.any(dim=1) & negative.any(dim=1)
        hardest_pos = torch.where(positive, dist, -inf).max(dim=1).values
        hardest_neg = torch.where(negative, dist, inf).min(dim=1).values
        losses = F.relu(hardest_pos[valid] - hardest_neg[valid] + margin)
    elif mining == "semi_hard":
        neg_sorted = torch.where(negative, dist, inf).sort(dim=1).values
        pairs = positive & negative.any(dim=1, keepdim=True)
        first_farther = torch.searchsorted(neg_sorted, dist.contiguous(), right=True)
        candidate = neg_sorted.gather(1, first_farther.clamp(max=dist.shape[1] - 1))
        semi = (first_farther < dist.shape[1]) & (candidate < dist + margin)
        chosen = torch.where(semi, candidate, neg_sorted[:, :1].expand_as(dist))
        losses = F.relu(dist - chosen + margin)[pairs]
    else:
        raise ValueError(f"mining must be one of {MINING}, got {mining!r}")
    if losses.numel() == 0:
        return dist.sum() * 0.0, 0.0
    return losses.mean(), float((losses > 0).float().mean())


def project(module: torch.nn.Module, embeddings: np.ndarray, batch: int = 4096) -> np.ndarray:
    """Runs the head in eval mode over [N, D] embeddings; returns float32 [N, d]."""
    was_training = module.training
    module.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(embeddings), batch):
            out.append(module(torch.from_numpy(np.ascontiguousarray(embeddings[start:start + batch]))).numpy())
    module.train(was_training)
    return np.concatenate(out).astype(np.float32)


def _evaluate(vectors: np.ndarray, label_ids: np.ndarray, margin: float) -> tuple[float, float]:
    """Batch-hard triplet loss over the whole set and leave-one-out recall@1 (cosine), anchors with a positive."""
    v = unit_rows(vectors.astype(np.float64))
    losses, hits, total = 0.0, 0, 0
    for start in range(0, len(v), _EVAL_CHUNK):
        rows = np.arange(start, min(start + _EVAL_CHUNK, len(v)))
        dist = 1.0 - v[rows] @ v.T
        same = label_ids[rows, None] == label_ids[None, :]
        dist[np.arange(len(rows)), rows] = np.nan
        positive = same.copy()
        positive[np.arange(len(rows)), rows] = False
        ok = positive.any(axis=1) & (~same).any(axis=1)
        if not ok.any():
            continue
        d = dist[ok]
        hardest_pos = np.where(positive[ok], d, -np.inf).max(axis=1)
        hardest_neg = np.where(~same[ok], d, np.inf).min(axis=1)
        losses += float(np.maximum(hardest_pos - hardest_neg + margin, 0.0).sum())
        nearest = np.nanargmin(d, axis=1)
        hits += int((label_ids[nearest] == label_ids[rows[ok]]).sum())
        total += int(ok.sum())
    return (losses / total, hits / total) if total else (float("nan"), float("nan"))


def train_head(embeddings: np.ndarray, labels: Sequence[str],
               config: HeadConfig = HeadConfig()) -> tuple[torch.nn.Module, dict]:
    """Trains the triplet head (seeded, deterministic on CPU); returns the module (L2-normalised output) and stats."""
    data = _check_references(embeddings, labels)
    sampler = PKSampler(labels, config)
    names = sorted(set(labels))
    label_ids = np.searchsorted(np.array(names), np.array(labels)).astype(np.int64)
    inputs = torch.from_numpy(data)
    ids = torch.from_numpy(label_ids)
    started = time.perf_counter()
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    was_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    was_threads = torch.get_num_threads()
    try:
        torch.use_deterministic_algorithms(True)
        torch.set_num_threads(config.threads)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            module = TripletHead(data.shape[1], config)
            raw_loss, raw_recall = _evaluate(data, label_ids, config.margin)
            before_loss, before_recall = _evaluate(project(module, data), label_ids, config.margin)
            optimiser = torch.optim.Adam(module.parameters(), lr=config.lr, weight_decay=config.weight_decay)
            history, active = [], []
            module.train()
            for _ in range(config.epochs):
                epoch_loss, epoch_active = 0.0, 0.0
                for rows, anchor_mask in sampler.epoch():
                    index = torch.from_numpy(rows)
                    out = module(inputs[index])
                    loss, share = triplet_loss(out, ids[index], index, torch.from_numpy(anchor_mask),
                                               config.margin, config.mining)
                    optimiser.zero_grad(set_to_none=True)
                    loss.backward()
                    optimiser.step()
                    epoch_loss += float(loss.detach())
                    epoch_active += share
                history.append(epoch_loss / sampler.batches_per_epoch)
                active.append(epoch_active / sampler.batches_per_epoch)
            module.eval()
    finally:
        torch.use_deterministic_algorithms(was_deterministic, warn_only=was_warn_only)
        torch.set_num_threads(was_threads)
    after_loss, after_recall = _evaluate(project(module, data), label_ids, config.margin)
    stats = {
        "config": config.to_dict(),
        "in_dim": int(data.shape[1]),
        "references": int(data.shape[0]),
        "labels": len(names),
        "anchor_labels": len(sampler.groups),
        "negative_only_labels": int(sampler.singles.size),
        "batch": {"p": sampler.p, "k": sampler.k, "extra_negatives": sampler.extra,
                  "batches_per_epoch": sampler.batches_per_epoch},
        "train_loss": history,
        "train_active_share": active,
        "eval": {
            "metric": "batch-hard triplet loss (cosine, margin) over all references; leave-one-out recall@1",
            "loss_raw": raw_loss, "loss_before": before_loss, "loss_after": after_loss,
            "recall_at_1_raw": raw_recall, "recall_at_1_before": before_recall, "recall_at_1_after": after_recall,
        },
        "seconds": round(time.perf_counter() - started, 3),
    }
    return module, stats


def _io_spec(name: str, shape: list) -> dict:
    return {"name": name, "dtype": "float32", "shape": shape}


def export_head(module: torch.nn.Module, in_dim: int, path: Path,
                log: Callable[[str], None] = print) -> dict:
    """head.onnx (input "embedding" [batch,D] -> output "projected" [batch,d]), opset 17, parity vs torch recorded."""
    path = Path(path)
    module = copy.deepcopy(module).float().cpu().eval()
    rng = np.random.default_rng(PARITY_SEED)
    scales = np.exp(rng.uniform(np.log(1e-2), np.log(1e2), (63, 1)))
    batches = [(rng.standard_normal((63, in_dim)) * scales).astype(np.float32),
               rng.standard_normal((1, in_dim)).astype(np.float32)]
    references = [torch_outputs(module, b)[0] for b in batches]
    exporter = export_onnx(
        copy.deepcopy(module), torch.randn(2, in_dim), path, input_name="embedding", output_names=["projected"],
        dynamic_dims={0: "batch"}, opset=17,
        dynamo_shapes=lambda: {"embedding": {0: torch.export.Dim("batch", min=1, max=65536)}}, log=log,
    )
    session = ort_session(path)
    candidates = [session.run(["projected"], {"embedding": b})[0] for b in batches]
    diffs = [compare_outputs(["projected"], [r], [c])["projected"] for r, c in zip(references, candidates, strict=True)]
    norm_error = max(float(np.abs(np.linalg.norm(c.astype(np.float64), axis=1) - 1).max()) for c in candidates)
    parity = {
        "projected": {"max_abs_diff": max(d["max_abs_diff"] for d in diffs),
                      "max_rel_diff": max(d["max_rel_diff"] for d in diffs)},
        "max_norm_error": norm_error,
        "inputs": f"batches of 63 and 1 standard-normal rows, row scales 1e-2..1e2 (seed {PARITY_SEED})",
    }
    worst = parity["projected"]["max_abs_diff"]
    log(f"head exported with {exporter}: max abs diff {worst:.2e}, max norm error {norm_error:.2e}")
    if worst > PARITY_TOLERANCE or norm_error > PARITY_TOLERANCE:
        raise RuntimeError(f"{path}: ONNX head differs from torch (max abs diff {worst:.2e}, norm error "
                           f"{norm_error:.2e}; tolerance {PARITY_TOLERANCE:.0e})")
    out_dim = int(references[0].shape[-1])
    return {
        "file": path.name, "sha256": sha256_file(path), "format": "onnx", "opset": 17, "exporter": exporter,
        "inputs": [_io_spec("embedding", ["batch", int(in_dim)])],
        "outputs": [_io_spec("projected", ["batch", out_dim])],
        "preprocessing": {"input": "embedding as the encoder writes it; the graph L2-normalises it"
                          if getattr(module, "normalize_input", False) else "L2-normalised embedding",
                          "output": "L2-normalised; compare with cosine distance"},
        "parity": parity,
    }


def fit(bundle: Path, references: ReferenceSet, *, head: HeadConfig = HeadConfig(),
        stages: StageConfig = StageConfig(), log: Callable[[str], None] = print) -> dict:
    """Trains the head, writes head.onnx and head-space centroids.npz into the bundle; returns the updated manifest."""
    root = Path(bundle)
    loaded = Bundle.load(root)
    embeddings, labels = references
    labels = list(labels)
    data = _check_references(embeddings, labels)
    section = loaded.manifest.get("embedding") or {}
    if section.get("dim") is not None and int(section["dim"]) != data.shape[1]:
        source = f"{section.get('backbone')} {section.get('model')}.{section.get('output')}"
        raise ValueError(f"{root}: references are {data.shape[1]}-d but the bundle's embedding "
                         f"({source}) is {section['dim']}-d")
    taxonomy_map = load_taxonomy(loaded.file("taxonomy"))
    known = set(taxonomy_map.values())
    unknown = sorted(set(labels) - known)
    if unknown:
        log(f"{len(unknown)} reference labels are not in the bundle taxonomy (kept, without ancestors "
            f"beyond what the taxonomy knows): {', '.join(unknown[:3])}{' ...' if len(unknown) > 3 else ''}")
    log(f"training the head on {len(labels)} references of {len(set(labels))} labels")
    module, stats = train_head(data, labels, head)
    ev = stats["eval"]
    log(f"trained in {stats['seconds']:.1f} s: loss {ev['loss_before']:.4f} -> {ev['loss_after']:.4f}, "
        f"recall@1 raw {ev['recall_at_1_raw']:.3f} -> head {ev['recall_at_1_after']:.3f}")
    with tempfile.TemporaryDirectory(dir=root, prefix=".fit-") as scratch:
        staging = Path(scratch)
        entry = export_head(module, data.shape[1], staging / HEAD_FILE, log=log)
        session = ort_session(staging / HEAD_FILE)
        projected = np.concatenate([session.run(["projected"], {"embedding": data[s:s + 4096]})[0]
                                    for s in range(0, len(data), 4096)])
        cents = build_centroids(projected, labels, taxonomy_map, stages)
        cents.save(staging / CENTROIDS_FILE)
        os.replace(staging / HEAD_FILE, root / HEAD_FILE)
        os.replace(staging / CENTROIDS_FILE, root / CENTROIDS_FILE)
    levels: dict[str, int] = {}
    for level in cents.levels:
        levels[level] = levels.get(level, 0) + 1
    log(f"{len(cents)} centroids in head space: {', '.join(f'{n} {lvl}' for lvl, n in levels.items())}")
    manifest = dict(loaded.manifest)
    if section:
        entry["embedding"] = dict(section)
    entry["training"] = stats
    manifest["models"] = {**manifest["models"], "head": entry}
    manifest["files"] = {**manifest["files"], "centroids": {
        "file": CENTROIDS_FILE, "sha256": sha256_file(root / CENTROIDS_FILE), "count": len(cents),
        "space": "head", "dim": int(projected.shape[1]), "references": len(labels), "levels": levels,
    }}
    manifest["stages"] = stages.to_dict()
    staged_manifest = root / f".{MANIFEST}.tmp"
    staged_manifest.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    os.replace(staged_manifest, root / MANIFEST)
    Bundle.load(root)
    return manifest


def _crop(pixels: np.ndarray, bbox: Optional[Sequence[float]]) -> Optional[np.ndarray]:
    """The whole image, or SpeciesNet's integer crop of a normalised box (None if empty)."""
    return pixels if bbox is None else crop_region(pixels, bbox)


def references_from_csv(csv_path: Path, embed: Callable[[list[np.ndarray]], np.ndarray], *,
                        batch_size: int = 32) -> ReferenceSet:
    """CSV of labelled crops: filepath,label[,xmin,ymin,width,height] (normalised box; whole image if absent)."""
    csv_path = Path(csv_path)
    box_columns = ("xmin", "ymin", "width", "height")
    with open(csv_path, newline="", encoding="utf-8") as fp:
        reader = csv.DictReader(fp)
        columns = set(reader.fieldnames or ())
        if not {"filepath", "label"} <= columns:
            raise ValueError(f"{csv_path}: needs columns filepath,label[,xmin,ymin,width,height]; got "
                             f"{','.join(reader.fieldnames or ())}")
        has_box = set(box_columns) <= columns
        if not has_box and columns & set(box_columns):
            raise ValueError(f"{csv_path}: a box needs all of {','.join(box_columns)}")
        rows = list(reader)
    if not rows:
        raise ValueError(f"{csv_path}: no references")
    labels: list[str] = []
    chunks: list[np.ndarray] = []
    pending: list[np.ndarray] = []
    cached: tuple[Optional[Path], Optional[np.ndarray]] = (None, None)

    def flush() -> None:
        if not pending:
            return
        out = np.asarray(embed(pending), dtype=np.float32)
        if out.ndim != 2 or out.shape[0] != len(pending):
            raise ValueError(f"embed returned shape {out.shape} for {len(pending)} crops; expected [n, D]")
        chunks.append(out)
        pending.clear()

    for line, row in enumerate(rows, start=2):
        label = (row["label"] or "").strip()
        try:
            split_label(label)
        except ValueError as e:
            raise ValueError(f"{csv_path}:{line}: {e}") from None
        path = Path(row["filepath"])
        path = path if path.is_absolute() else csv_path.parent / path
        if cached[0] != path:
            if not path.is_file():
                raise ValueError(f"{csv_path}:{line}: no such image {path}")
            stat = path.stat()
            decoded = decode(ImageRecord(path.name, path, stat.st_size, stat.st_mtime_ns))
            if not decoded.ok:
                raise ValueError(f"{csv_path}:{line}: {path}: {decoded.error}")
            cached = (path, decoded.pixels)
        bbox = None
        if has_box and any((row[c] or "").strip() for c in box_columns):
            try:
                bbox = [float(row[c]) for c in box_columns]
            except (TypeError, ValueError):
                raise ValueError(f"{csv_path}:{line}: box must be four numbers {','.join(box_columns)}") from None
        crop = _crop(cached[1], bbox)
        if crop is None:
            raise ValueError(f"{csv_path}:{line}: box {bbox} is empty at {cached[1].shape[1]}x{cached[1].shape[0]}")
        pending.append(crop)
        labels.append(label)
        if len(pending) >= batch_size:
            flush()
    flush()
    return ReferenceSet(np.concatenate(chunks), labels)
