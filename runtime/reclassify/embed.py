"""Embeddings for re-classification: encoder preprocessing, the encoder, and the triplet head (stage 4)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from PIL import Image

from ..models.bundle import Bundle
from ..models.metered import Metered
from ..models.select import Backend, open_model
from ..speciesnet.classifier import crop_region
from .stages import unit_rows

__all__ = ["HEAD_BATCH", "Embedder", "EncoderPreprocess", "apply_head", "crop_embedder", "embedding_section",
           "head_backend"]

HEAD_BATCH = 4096  # embeddings per head call; also the head's TensorRT profile
CROP_BATCH = 32  # crops per classifier call when embedding for `trapedge fit`; within every TensorRT profile


def embedding_section(bundle: Bundle) -> dict:
    """The bundle's embedding choice; SpeciesNet's pooled classifier features when none is recorded."""
    return bundle.manifest.get("embedding") or {
        "backbone": "speciesnet", "model": "classifier", "output": "features",
        "dim": bundle.model("classifier").output_dim("features"),
    }


class EncoderPreprocess:
    """Crop, resize (shortest side, Pillow, as open_clip's torchvision transform), centre crop, normalise: NCHW."""

    def __init__(self, spec: dict) -> None:
        self.size = int(spec["size"])
        self.mean = np.asarray(spec.get("mean", [0.0, 0.0, 0.0]), dtype=np.float32)
        self.std = np.asarray(spec.get("std", [1.0, 1.0, 1.0]), dtype=np.float32)
        self.interpolation = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}[
            spec.get("interpolation", "bicubic")]
        self.squash = spec.get("resize") == "squash"

    def __call__(self, image: np.ndarray, bbox: Sequence[float]) -> Optional[np.ndarray]:
        """One CHW float32 input for a detection box, or None for an empty crop."""
        region = crop_region(image, bbox)
        if region is None:
            return None
        crop = Image.fromarray(region)
        width, height = crop.size
        if self.squash:
            crop = crop.resize((self.size, self.size), self.interpolation)
        else:
            short, long = min(width, height), max(width, height)
            new_long = int(self.size * long / short)  # torchvision truncates the long side
            new = (self.size, new_long) if width <= height else (new_long, self.size)
            crop = crop.resize(new, self.interpolation)
            x0 = int(round((new[0] - self.size) / 2.0))
            y0 = int(round((new[1] - self.size) / 2.0))
            crop = crop.crop((x0, y0, x0 + self.size, y0 + self.size))
        arr = np.asarray(crop, dtype=np.float32) / np.float32(255)
        return ((arr - self.mean) / self.std).transpose(2, 0, 1)


class Embedder:
    """Runs the bundle's image encoder on detection crops (only when the backbone is not SpeciesNet's own)."""

    def __init__(self, bundle: Bundle, device: str = "auto", threads: Optional[int] = None,
                 batch: int = 16, *, precision: str = "fp32") -> None:
        self.section = embedding_section(bundle)
        self.uses_classifier = self.section["model"] == "classifier"
        self.batch = batch
        self.backend: Optional[Metered] = None
        if not self.uses_classifier:
            spec = bundle.model(self.section["model"])
            self.preprocess = EncoderPreprocess(spec.preprocessing)
            self.input_name = spec.inputs[0]["name"]
            self.backend = Metered(open_model(bundle, spec.name, device=device, precision=precision,
                                              threads=threads, batch=batch))

    def embed(self, image: np.ndarray, bboxes: Sequence[Sequence[float]]) -> list[Optional[np.ndarray]]:
        """Encoder embeddings for the boxes of one image (None where the crop is empty)."""
        inputs = [self.preprocess(image, b) for b in bboxes]
        rows = [i for i, x in enumerate(inputs) if x is not None]
        out: list[Optional[np.ndarray]] = [None] * len(inputs)
        for start in range(0, len(rows), self.batch):
            part = rows[start : start + self.batch]
            (vectors,) = self.backend.run({self.input_name: np.stack([inputs[i] for i in part])},
                                          [self.section["output"]])
            for i, v in zip(part, vectors):
                out[i] = v
        return out


def crop_embedder(bundle: Bundle, device: str = "cpu", precision: str = "fp32"):
    """A function embedding whole crops (HWC uint8) with the bundle's backbone, for `trapedge fit`."""
    from ..speciesnet.classifier import preprocess_crop, to_network_input

    embedder = Embedder(bundle, device, precision=precision)
    if not embedder.uses_classifier:
        return lambda crops: np.stack([embedder.embed(c, [(0.0, 0.0, 1.0, 1.0)])[0] for c in crops])
    classifier = open_model(bundle, "classifier", device=device, precision=precision, batch=CROP_BATCH)

    def embed(crops: list[np.ndarray]) -> np.ndarray:
        parts = []
        for start in range(0, len(crops), CROP_BATCH):
            batch = to_network_input([preprocess_crop(c, (0.0, 0.0, 1.0, 1.0))
                                      for c in crops[start : start + CROP_BATCH]])
            parts.append(classifier.run({"crops": batch}, [embedder.section["output"]])[0])
        return np.concatenate(parts)

    return embed


def apply_head(vectors: np.ndarray, head: Optional[Backend], batch: int = HEAD_BATCH) -> np.ndarray:
    """Stage 4 at run time: the triplet head (if the bundle has one), then L2 normalisation."""
    vectors = np.asarray(vectors, dtype=np.float32)
    if head is not None and len(vectors):
        name = head.input_names()[0]
        vectors = np.concatenate([head.run({name: vectors[i : i + batch]})[0]
                                  for i in range(0, len(vectors), batch)])
    return unit_rows(vectors)


def head_backend(bundle: Bundle, device: str = "cpu", precision: str = "fp32") -> Optional[Backend]:
    """The bundle's triplet head on a device at a precision, if it has one."""
    if not bundle.has_model("head"):
        return None
    return open_model(bundle, "head", device=device, precision=precision, batch=HEAD_BATCH)


def load_prompts(bundle: Bundle) -> tuple[Optional[np.ndarray], list[int]]:
    """Bird-override prompt embeddings stored in the bundle (no text encoder ships)."""
    if "prompts" not in bundle.manifest["files"]:
        return None, []
    with np.load(Path(bundle.file("prompts")), allow_pickle=False) as data:
        return data["embeddings"].astype(np.float32), [int(i) for i in data["bird_rows"]]
