"""Random-weight models in the real on-disk formats, for tests and benchmarks, since no weights can be downloaded.

``build_speciesnet_folder`` writes a SpeciesNet "always_crop" model folder as a release ships it: ``info.json``,
a pickled onnx2torch ``GraphModule`` classifier taking NHWC float32 input, a half-precision YOLOv5 P6 checkpoint
dict, a 7-field labels file, a taxonomy file and a geofence JSON. Size "tiny" (YOLOv5s6 at width 0.25, a 5-conv
classifier) is what the tests export; size "real" (YOLOv5x6, EfficientNetV2-M with 2,498 labels) is what the
benchmarks time.

Random networks are made to behave like trained ones in two steps: ``calibrate_batchnorm`` gives them batch-norm
statistics from real (or smooth synthetic) inputs, so activations neither vanish nor explode, and then only the
output heads are rescaled (a handful of spread-out boxes per photo; whitened, taxonomy-correlated logits).
``classifier_head`` names the final linear layer of the saved classifier and the fx node holding its input, the
pooled feature vector.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import random
import uuid
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import PIL.Image
import PIL.ImageOps
import torch
import torchvision
import torchvision.transforms.functional as TF
from torch import nn

__all__ = [
    "ANIMAL",
    "BLANK",
    "HUMAN",
    "VEHICLE",
    "SPECIAL_LABELS",
    "build_speciesnet_folder",
    "calibrate_batchnorm",
    "classifier_head",
    "fabricate_labels",
]

BLANK = "f1856211-cfb7-4a5b-9158-c0f72fd09ee6;;;;;;blank"
ANIMAL = "1f689929-883d-4dae-958c-3d57ab5b6c16;;;;;;animal"
HUMAN = "990ae9dd-7a59-4344-afcb-1b7b21368000;mammalia;primates;hominidae;homo;sapiens;human"
VEHICLE = "e2895ed5-780b-48f6-8a11-9e27cb594511;;;;;;vehicle"
SPECIAL_LABELS = (BLANK, ANIMAL, HUMAN, VEHICLE)

DETECTOR_IMG_SIZE = 1280
DETECTOR_STRIDE = 64
CLASSIFIER_IMG_SIZE = 480
REAL_NUM_LABELS = 2498

_CLASSES = (("mammalia", "mammal", 0.5), ("aves", "bird", 0.35), ("reptilia", "reptile", 0.15))
_SYLLABLES = (
    "ka", "ro", "mi", "te", "lu", "sa", "no", "vi", "da", "pe", "zo", "ri", "ga", "lo", "be",
    "tu", "ne", "fa", "si", "mo", "cha", "que", "ly", "phi", "dra", "ster", "tho", "gri", "ven",
    "xan", "pol", "cor", "mus", "ur", "ix", "an", "el", "os", "ar", "is",
)
_GEOFENCE_RULES: tuple[dict[str, dict[str, list[str]]], ...] = (
    {"allow": {"USA": []}},
    {"allow": {"KEN": [], "NAM": []}},
    {"allow": {"USA": ["CA", "NY"]}},
    {"block": {"USA": []}},
    {"allow": {"USA": ["NY"]}, "block": {"GBR": []}},
    {"block": {"USA": ["CA"]}},
    {"block": {"GBR": [], "KEN": []}},
    {"allow": {"USA": [], "KEN": [], "NAM": []}, "block": {"USA": ["NY"]}},
)


@dataclass(frozen=True)
class _SizeSpec:
    """Architecture and calibration settings for one fixture size."""

    n_species: int
    n_labels: int | None
    yolo_config: str
    yolo_width: float | None
    max_calibration_images: int
    batchnorm_images: int
    random_crops: int


_SIZES = {
    "tiny": _SizeSpec(14, None, "yolov5s6.yaml", 0.25, 16, 4, 24),
    "real": _SizeSpec(2065, REAL_NUM_LABELS, "yolov5x6.yaml", None, 2, 2, 8),
}

# Objectness targets per detection level (P3..P6): (mean candidates above 0.01 per
# image and anchor, mean anchors above the high point per image and anchor).
_OBJ_TARGETS = ((1.2, 0.08), (1.2, 0.12), (0.8, 0.12), (0.3, 0.05))
_OBJ_LOW, _OBJ_HIGH = 0.01, 0.9
# Largest L1 norm of an objectness row, which keeps fp16 rounding error near 0.05 logits.
_OBJ_MAX_L1 = 100.0
# Class-row (offset, scale) for animal, human, vehicle, standardised over candidates.
_CLS_ROWS = ((3.0, 1.0), (0.0, 2.5), (-0.5, 2.5))
# Largest box-row logit: boxes stay within (2 * sigmoid(0.6)) ** 2 = 1.7x anchor size.
_BOX_SCALE = 0.6
# Classifier logit spread on whitened calibration features, label biases, and the
# weights of class/order/family/genus/own directions shared along the taxonomy.
_LOGIT_SCALE = 8.0
_SPECIAL_BIAS = {BLANK: 0.5, HUMAN: 0.5, VEHICLE: 0.5, ANIMAL: -2.0}
_RANK_WEIGHTS = (0.2, 0.3, 0.4, 0.5, 0.8)


@dataclass(frozen=True)
class _Taxon:
    """One taxon with its five rank fields and common name."""

    fields: tuple[str, str, str, str, str]
    common: str

    @property
    def key(self) -> str:
        """Return the 5-field ``class;order;family;genus;species`` key."""
        return ";".join(self.fields)

    @property
    def depth(self) -> int:
        """Return the number of non-empty rank fields."""
        return sum(1 for f in self.fields if f)


class _Namer:
    """Deterministic generator of unique pseudo-Latin names."""

    def __init__(self, rng: random.Random, reserved: Sequence[str] = ()) -> None:
        """Create a namer drawing from ``rng`` that never repeats ``reserved``."""
        self._rng = rng
        self._used = set(reserved)

    def __call__(self, suffix: str = "", syllables: int = 3) -> str:
        """Return a new unique lowercase name ending in ``suffix``."""
        attempt = 0
        while True:
            n = self._rng.randint(syllables - 1, syllables) + attempt // 16
            name = "".join(self._rng.choice(_SYLLABLES) for _ in range(n)) + suffix
            if name not in self._used:
                self._used.add(name)
                return name
            attempt += 1


def _uuid(rng: random.Random) -> str:
    """Return a deterministic random version-4 UUID string."""
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _split_counts(total: int, weights: Sequence[float]) -> list[int]:
    """Split ``total`` into at least one per weight, proportionally to ``weights``."""
    counts = [max(1, int(round(total * w))) for w in weights]
    counts[0] += total - sum(counts)
    return counts


def _fabricate_tree(n_species: int, rng: random.Random) -> tuple[list[_Taxon], list[_Taxon]]:
    """Return (species, higher taxa) of a random taxonomy with ``n_species`` species."""
    namer = _Namer(rng, reserved=("primates", "hominidae", "homo", "sapiens"))
    species: list[_Taxon] = []
    higher: list[_Taxon] = []
    counts = _split_counts(n_species, [c[2] for c in _CLASSES])
    for (cls, cls_common, _), count in zip(_CLASSES, counts):
        higher.append(_Taxon((cls, "", "", "", ""), cls_common))
        remaining = count
        first_order = cls == "mammalia"
        while remaining > 0:
            order = "primates" if first_order else namer("iformes" if cls == "aves" else "a")
            higher.append(_Taxon((cls, order, "", "", ""), f"{order} order"))
            for f_idx in range(rng.randint(1, 2)):
                if remaining == 0:
                    break
                if first_order and f_idx == 0:
                    higher.append(_Taxon((cls, order, "hominidae", "", ""), "hominidae family"))
                    higher.append(_Taxon((cls, order, "hominidae", "homo", ""), "homo species"))
                family = namer("idae")
                higher.append(_Taxon((cls, order, family, "", ""), f"{family} family"))
                for _ in range(rng.randint(1, 2)):
                    if remaining == 0:
                        break
                    genus = namer("us")
                    higher.append(_Taxon((cls, order, family, genus, ""), f"{genus} species"))
                    for _ in range(min(remaining, rng.randint(1, 3))):
                        epithet = namer("i")
                        common = f"{namer()} {cls_common}"
                        species.append(_Taxon((cls, order, family, genus, epithet), common))
                        remaining -= 1
            first_order = False
    return species, higher


def _pick_higher_labels(
    higher: list[_Taxon], n_extra: int | None, rng: random.Random
) -> list[_Taxon]:
    """Choose class labels plus genus-, family- and order-level labels."""
    classes = [t for t in higher if t.depth == 1]
    pool = [t for t in higher if t.depth > 1]
    by_depth = {d: [t for t in pool if t.depth == d] for d in (2, 3, 4)}
    chosen = [rng.choice(by_depth[d]) for d in (2, 3, 4) if by_depth[d]]
    rest = [t for t in pool if t not in chosen]
    rng.shuffle(rest)
    if n_extra is None:
        fractions = {2: 0.4, 3: 0.3, 4: 0.2}
        chosen += [t for t in rest if rng.random() < fractions[t.depth]]
    else:
        need = n_extra - len(chosen)
        if need < 0 or need > len(rest):
            raise ValueError(f"cannot pick {n_extra} higher-taxon labels from {len(pool)}")
        chosen += rest[:need]
    return classes + chosen


def _line(uid: str, taxon: _Taxon) -> str:
    """Return the 7-field label line of ``taxon``."""
    return f"{uid};{taxon.key};{taxon.common}"


def fabricate_labels(
    n_species: int, seed: int, *, n_labels: int | None = None
) -> tuple[list[str], list[str], dict]:
    """Returns (classifier_labels, taxonomy_lines, geofence_map)."""
    if n_species < len(_CLASSES):
        raise ValueError(f"need at least {len(_CLASSES)} species, got {n_species}")
    rng = random.Random(f"labels-{seed}")
    species, higher = _fabricate_tree(n_species, rng)
    n_fixed = len(SPECIAL_LABELS) + n_species + len(_CLASSES)
    n_extra = None if n_labels is None else n_labels - n_fixed
    label_taxa = species + _pick_higher_labels(higher, n_extra, rng)
    uids = {t.key: _uuid(rng) for t in species + higher}
    labels = [_line(uids[t.key], t) for t in label_taxa] + list(SPECIAL_LABELS)
    rng.shuffle(labels)

    taxonomy_lines = list(SPECIAL_LABELS) + [_line(uids[t.key], t) for t in species + higher]
    taxonomy_lines.sort(key=lambda line: line.split(";", 1)[1])

    geofence: dict[str, dict[str, dict[str, list[str]]]] = {}
    fenced = [t for t in species if rng.random() < 0.75]
    fenced += [t for t in higher if t.depth in (2, 3, 4) and rng.random() < 0.15]
    rules = list(_GEOFENCE_RULES) * (len(fenced) // len(_GEOFENCE_RULES) + 1)
    rng.shuffle(rules)
    for taxon, rule in zip(fenced, rules):
        geofence[taxon.key] = json.loads(json.dumps(rule))
    geofence["reptilia;;;;"] = {"block": {"GBR": []}}
    return labels, taxonomy_lines, dict(sorted(geofence.items()))


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence yolov5 logging and exporter warnings inside the block."""
    logger = logging.getLogger("yolov5")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _load_rgb(path: Path) -> np.ndarray:
    """Load an image as an RGB uint8 HWC array, EXIF-transposed like SpeciesNet."""
    with PIL.Image.open(path) as img:
        return np.array(PIL.ImageOps.exif_transpose(img.convert("RGB")))


def _synthetic_images(seed: int, count: int = 4) -> list[np.ndarray]:
    """Return smooth random 1440x2048 RGB images for calibration without photos."""
    gen = torch.Generator().manual_seed(seed)
    images = []
    for _ in range(count):
        coarse = torch.rand(1, 3, 9, 12, generator=gen)
        fine = torch.rand(1, 3, 90, 128, generator=gen)
        img = 0.7 * nn.functional.interpolate(coarse, (1440, 2048), mode="bicubic")
        img += 0.3 * nn.functional.interpolate(fine, (1440, 2048), mode="bilinear")
        images.append((img[0].clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy())
    return images


_Box = tuple[float, float, float, float, float]


@dataclass
class _Letterboxed:
    """A detector input tensor with its letterbox geometry."""

    tensor: torch.Tensor
    orig_hw: tuple[int, int]
    pad_wh: tuple[float, float]


def _letterbox(image: np.ndarray) -> _Letterboxed:
    """Letterbox an RGB array the way SpeciesNet's detector does."""
    from yolov5.utils.augmentations import letterbox

    arr, _, pad = letterbox(image, new_shape=DETECTOR_IMG_SIZE, stride=DETECTOR_STRIDE, auto=True)
    tensor = torch.from_numpy(arr / 255).permute(2, 0, 1).unsqueeze(0).float()
    return _Letterboxed(tensor, (image.shape[0], image.shape[1]), (float(pad[0]), float(pad[1])))


def calibrate_batchnorm(model: nn.Module, batches: Iterable[torch.Tensor] | torch.Tensor) -> nn.Module:
    """Give a random-weight network batch-norm statistics from ``batches``; return it in eval mode.

    In eval mode a freshly initialised network normalises with running mean 0 and variance 1, so its activations
    shrink towards 0 (or blow up) layer after layer and its outputs are degenerate. Here every batch-norm layer
    forgets its statistics and, alone in train mode (dropout and stochastic depth stay off), accumulates the plain
    average over all of ``batches`` (momentum None). ``batches`` is an iterable of input batches or one batch.
    """
    if isinstance(batches, torch.Tensor):
        batches = (batches,)
    model.eval()
    for bn in (m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)):
        bn.reset_running_stats()
        bn.momentum = None
        bn.train()
    with torch.no_grad():
        for batch in batches:
            model(batch)
    return model.eval()


def _image_cells(lb: _Letterboxed, stride: int, ny: int, nx: int) -> torch.Tensor:
    """Return a [ny, nx] mask of grid cells whose centre lies on the image, not padding."""
    h, w = lb.tensor.shape[2:]
    ys = (torch.arange(ny) + 0.5) * stride
    xs = (torch.arange(nx) + 0.5) * stride
    pw, ph = lb.pad_wh
    in_y = (ys >= ph) & (ys <= h - ph)
    in_x = (xs >= pw) & (xs <= w - pw)
    return in_y[:, None] & in_x[None, :]


def _set_row(
    conv: nn.Conv2d,
    row: int,
    coeffs: torch.Tensor,
    weight0: torch.Tensor,
    bias0: torch.Tensor,
    center: float,
    scale: float,
    offset: float,
) -> None:
    """Make output ``row`` equal scale * (coeffs . original_rows - center) + offset."""
    with torch.no_grad():
        w = torch.einsum("r,r...->...", coeffs.double(), weight0.double())
        conv.weight[row] = (scale * w).float()
        conv.bias[row] = float(scale * (float(coeffs.double() @ bias0.double()) - center) + offset)


def _logit(p: float) -> float:
    """Return the logit of probability ``p``."""
    return math.log(p / (1 - p))


def _objectness_mapping(
    values_in: torch.Tensor, values_out: torch.Tensor, n_images: int, targets: tuple[float, float]
) -> tuple[float, float, int]:
    """Return (scale, offset, padding cells above 0.01) mapping image-cell quantiles to logits."""
    n_lo, n_hi = targets
    i_hi = max(0, int(round(n_hi * n_images)) - 1)
    i_lo = min(len(values_in) - 1, max(int(round(n_lo * n_images)), i_hi + 2))
    ranked = torch.topk(values_in, max(i_lo, i_hi) + 1).values
    q_lo, q_hi = float(ranked[i_lo]), float(ranked[i_hi])
    scale = (_logit(_OBJ_HIGH) - _logit(_OBJ_LOW)) / max(q_hi - q_lo, 1e-6)
    offset = _logit(_OBJ_LOW) - scale * q_lo
    return scale, offset, int((values_out > q_lo).sum())


def _tune_detect_head(model: nn.Module, inputs: list[_Letterboxed], seed: int) -> None:
    """Rewrite the Detect head rows to give a handful of spread-out boxes per image."""
    detect = model.model[-1]
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        raw = [model(lb.tensor)[1] for lb in inputs]
    for level, conv in enumerate(detect.m):
        outs = torch.cat([r[level] for r in raw])  # [N, na, ny, nx, no]
        n_img, na, ny, nx, no = outs.shape
        rows = outs.permute(0, 2, 3, 1, 4).reshape(n_img, ny, nx, na * no).double()
        mask = torch.stack([_image_cells(lb, int(detect.stride[level]), ny, nx) for lb in inputs])
        rows_in, rows_out = rows[mask], rows[~mask]
        weight0, bias0 = conv.weight.detach().clone(), conv.bias.detach().clone()
        eye = torch.eye(na * no, dtype=torch.float64)
        for a in range(na):
            base = a * no
            candidates = [eye[base + 4]]
            candidates += [torch.randn(na * no, generator=gen).double() for _ in range(15)]
            best: tuple[int, float, torch.Tensor, float] | None = None
            for coeffs in candidates:
                l1 = float(torch.einsum("r,r...->...", coeffs, weight0.double()).abs().sum())
                for sign in (1.0, -1.0):
                    c = sign * coeffs
                    scale, _, bad = _objectness_mapping(
                        rows_in @ c, rows_out @ c, n_img, _OBJ_TARGETS[level]
                    )
                    if best is None or (bad, scale * l1) < best[:2]:
                        best = (bad, scale * l1, c, l1)
            _, _, c_obj, l1 = best  # type: ignore[misc]
            values = rows_in @ c_obj
            scale, offset, _ = _objectness_mapping(values, values[:0], n_img, _OBJ_TARGETS[level])
            if scale * l1 > _OBJ_MAX_L1:
                q_lo = (_logit(_OBJ_LOW) - offset) / scale
                scale = _OBJ_MAX_L1 / l1
                offset = _logit(_OBJ_LOW) - scale * q_lo
            _set_row(conv, base + 4, c_obj, weight0, bias0, 0.0, scale, offset)
            obj_in = scale * values + offset
            picked = rows_in[obj_in > _logit(_OBJ_LOW)]
            if len(picked) < 8:
                picked = rows_in[torch.argsort(obj_in, descending=True)[:8]]
            for k in range(4):
                v = rows[..., base + k].flatten()
                center = float(v.median())
                spread = max(float((v - center).abs().max()), 1e-6)
                row_scale = _BOX_SCALE / spread
                _set_row(conv, base + k, eye[base + k], weight0, bias0, center, row_scale, 0.0)
            for k, (cls_offset, cls_scale) in enumerate(_CLS_ROWS, start=5):
                v = picked[:, base + k]
                center, std = float(v.mean()), max(float(v.std()), 1e-6)
                row_scale = cls_scale / std
                onehot = eye[base + k]
                _set_row(conv, base + k, onehot, weight0, bias0, center, row_scale, cls_offset)
    detect.grid = [torch.empty(0) for _ in range(detect.nl)]
    detect.anchor_grid = [torch.empty(0) for _ in range(detect.nl)]


def _build_detector(spec: _SizeSpec, inputs: list[_Letterboxed], seed: int) -> nn.Module:
    """Build, calibrate and head-tune a 3-class YOLOv5 P6 detector."""
    import yaml
    import yolov5
    from yolov5.models.yolo import Model

    cfg_path = Path(yolov5.__file__).parent / "models" / "hub" / spec.yolo_config
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["nc"] = 3
    if spec.yolo_width is not None:
        cfg["width_multiple"] = spec.yolo_width
    torch.manual_seed(seed)
    with _quiet():
        model = Model(cfg, ch=3)
    model.names = ["animal", "person", "vehicle"]
    step = max(1, len(inputs) // spec.batchnorm_images)
    calibrate_batchnorm(model, (lb.tensor for lb in inputs[::step][: spec.batchnorm_images]))
    model.half().float()
    _tune_detect_head(model, inputs, seed)
    model.half().float()
    return model


def _detections(model: nn.Module, lb: _Letterboxed) -> list[_Box]:
    """Return (x0, y0, x1, y1, conf) boxes in original pixels, as SpeciesNet computes them."""
    from yolov5.utils.general import non_max_suppression, scale_boxes

    with torch.no_grad(), _quiet():
        pred = non_max_suppression(model(lb.tensor)[0], conf_thres=0.01)[0]
    pred[:, :4] = scale_boxes(lb.tensor.shape[2:], pred[:, :4], lb.orig_hw).round()
    return [tuple(float(v) for v in row[:5]) for row in pred]  # type: ignore[misc]


def _crop(image: torch.Tensor, box: tuple[float, float, float, float]) -> torch.Tensor | None:
    """Crop and resize an image like SpeciesNet's classifier; None if the crop is empty."""
    x0, y0, x1, y1 = box
    top, left, height, width = int(y0), int(x0), int(y1 - y0), int(x1 - x0)
    if height <= 0 or width <= 0:
        return None
    crop = TF.crop(image, top, left, height, width)
    crop = TF.resize(crop, [CLASSIFIER_IMG_SIZE, CLASSIFIER_IMG_SIZE], antialias=False)
    crop = TF.convert_image_dtype(crop, torch.uint8).permute(1, 2, 0)
    return crop.float() / 255.0


def _classifier_crops(
    images: list[np.ndarray],
    boxes: list[list[_Box]],
    n_random: int,
    seed: int,
) -> torch.Tensor:
    """Return NHWC crops of detections (conf >= 0.1) plus random crops."""
    rng = random.Random(f"crops-{seed}")
    crops = []
    chw = [torch.from_numpy(img).permute(2, 0, 1) for img in images]
    tensors = [TF.convert_image_dtype(t, torch.float32) for t in chw]
    for tensor, dets in zip(tensors, boxes):
        for det in dets:
            if det[4] >= 0.1 and (crop := _crop(tensor, det[:4])) is not None:
                crops.append(crop)
    for i in range(n_random):
        tensor = tensors[i % len(tensors)]
        h, w = tensor.shape[1:]
        bw, bh = rng.uniform(0.08, 0.6) * w, rng.uniform(0.08, 0.6) * h
        x0, y0 = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
        if (crop := _crop(tensor, (x0, y0, x0 + bw, y0 + bh))) is not None:
            crops.append(crop)
    return torch.stack(crops)


class _GlobalMean(nn.Module):
    """Global average pooling over the spatial axes of an NCHW tensor."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the [N, C] spatial mean."""
        return x.mean(dim=(2, 3))


class _TinyClassifier(nn.Module):
    """Small strided conv net: conv+BN+SiLU blocks, global mean, one linear head."""

    def __init__(self, num_classes: int, widths: Sequence[int] = (16, 32, 64, 96, 128)) -> None:
        """Create the network for ``num_classes`` outputs."""
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for c_out in widths:
            conv = nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False)
            layers += [conv, nn.BatchNorm2d(c_out), nn.SiLU()]
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.pool = _GlobalMean()
        self.head = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits for an NCHW batch."""
        return self.head(self.pool(self.features(x)))


class _NHWC(nn.Module):
    """Adapter feeding an NHWC batch to an NCHW network, like the TF-origin graph."""

    def __init__(self, net: nn.Module) -> None:
        """Wrap ``net``."""
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the wrapped network's output for NHWC input."""
        return self.net(x.permute(0, 3, 1, 2))


def _last_linear(module: nn.Module) -> nn.Linear:
    """Return the last nn.Linear submodule."""
    return [m for m in module.modules() if isinstance(m, nn.Linear)][-1]


def _label_weights(labels: list[str], dim: int, seed: int) -> torch.Tensor:
    """Return [C, dim] head directions that share components along taxonomic ancestry."""
    gen = torch.Generator().manual_seed(seed)
    components: dict[str, torch.Tensor] = {}

    def component(key: str) -> torch.Tensor:
        """Return the random direction of one taxon key."""
        if key not in components:
            components[key] = torch.randn(dim, generator=gen)
        return components[key]

    rows = []
    for label in labels:
        fields = label.split(";")[1:6]
        depth = sum(1 for f in fields if f)
        vec = torch.zeros(dim)
        for d in range(1, depth + 1):
            vec += _RANK_WEIGHTS[d - 1] * component(";".join(fields[:d] + [""] * (5 - d)))
        vec += _RANK_WEIGHTS[-1] * component(label)
        rows.append(vec / vec.norm())
    return torch.stack(rows)


def _tune_classifier_head(
    net: nn.Module, crops: torch.Tensor, labels: list[str], seed: int
) -> None:
    """Set the final linear layer to whitened, taxonomy-correlated random logits."""
    head = _last_linear(net)
    feats: list[torch.Tensor] = []
    hook = head.register_forward_hook(lambda _m, args, _out: feats.append(args[0].detach()))
    with torch.no_grad():
        for batch in crops.split(8):
            net(batch)
    hook.remove()
    f = torch.cat(feats).double()
    mean = f.mean(0)
    _, s, vh = torch.linalg.svd(f - mean, full_matrices=False)
    rank = max(1, int((s > s[0] * 1e-3).sum()))
    rank = min(rank, len(f) - 1) if len(f) > 1 else 1
    s, vh = s[:rank], vh[:rank]
    reg = (s**2 + (0.05 * s[0]) ** 2).sqrt()
    whiten = vh.T * (math.sqrt(len(f)) / reg)  # [D, rank]
    directions = _label_weights(labels, rank, seed).double()
    weight = _LOGIT_SCALE * directions @ whiten.T  # [C, D]
    bias = torch.tensor([_SPECIAL_BIAS.get(label, 0.0) for label in labels], dtype=torch.float64)
    bias -= weight @ mean
    with torch.no_grad():
        head.weight.copy_(weight.float())
        head.bias.copy_(bias.float())


def _inline_identity_initializers(model: onnx.ModelProto) -> None:
    """Replace Identity nodes over initializers (deduplicated weights) with copies."""
    inits = {t.name: t for t in model.graph.initializer}
    for node in list(model.graph.node):
        if node.op_type == "Identity" and node.input[0] in inits:
            tensor = onnx.TensorProto()
            tensor.CopyFrom(inits[node.input[0]])
            tensor.name = node.output[0]
            model.graph.initializer.append(tensor)
            model.graph.node.remove(node)


def _export_graph_module(net: nn.Module) -> torch.fx.GraphModule:
    """Export an NHWC network to ONNX and convert it back with onnx2torch."""
    import onnx2torch  # a SpeciesNet dependency, needed only here (calibrate_batchnorm runs without it)

    wrapped = _NHWC(net).eval()
    buf = io.BytesIO()
    with _quiet():
        torch.onnx.export(
            wrapped,
            (torch.zeros(1, CLASSIFIER_IMG_SIZE, CLASSIFIER_IMG_SIZE, 3),),
            buf,
            dynamo=False,
            opset_version=13,
            input_names=["input_1"],
            output_names=["logits"],
            dynamic_axes={"input_1": {0: "batch"}, "logits": {0: "batch"}},
        )
    model = onnx.load_from_string(buf.getvalue())
    _inline_identity_initializers(model)
    return onnx2torch.convert(model)


def _build_classifier(
    size: str, labels: list[str], crops: torch.Tensor, n_batchnorm: int, seed: int
) -> torch.fx.GraphModule:
    """Build, calibrate, head-tune and convert the crop classifier."""
    torch.manual_seed(seed)
    if size == "real":
        net: nn.Module = torchvision.models.efficientnet_v2_m(weights=None, num_classes=len(labels))
    else:
        net = _TinyClassifier(len(labels))
    nchw = crops.permute(0, 3, 1, 2).contiguous()
    calibrate_batchnorm(net, nchw[-n_batchnorm:].split(8))
    _tune_classifier_head(net, nchw, labels, seed)
    gm = _export_graph_module(net)
    gm.eval()
    return gm


def classifier_head(module: nn.Module) -> tuple[str, str]:
    """Return (final nn.Linear target, fx node name of its pooled-feature input)."""
    if isinstance(module, torch.fx.GraphModule):
        graph_module = module
    else:
        graph_module = torch.fx.symbolic_trace(module)
    linear_nodes = [
        n
        for n in graph_module.graph.nodes
        if n.op == "call_module" and isinstance(graph_module.get_submodule(n.target), nn.Linear)
    ]
    node = linear_nodes[-1]
    return str(node.target), node.args[0].name


def _write_lines(path: Path, lines: Sequence[str]) -> None:
    """Write one UTF-8 line per entry."""
    path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")


def build_speciesnet_folder(
    dest: Path,
    *,
    size: str = "tiny",
    seed: int = 0,
    calibration_images: Sequence[Path] = (),
    version: str = "4.0.3a",
) -> Path:
    """Write a random-weight SpeciesNet always_crop model folder to ``dest`` and return it."""
    if size not in _SIZES:
        raise ValueError(f"unknown size {size!r}; expected one of {sorted(_SIZES)}")
    spec = _SIZES[size]
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)

    labels, taxonomy, geofence = fabricate_labels(spec.n_species, seed, n_labels=spec.n_labels)
    paths = sorted(Path(p) for p in calibration_images)[: spec.max_calibration_images]
    images = [_load_rgb(p) for p in paths] or _synthetic_images(seed)
    inputs = [_letterbox(img) for img in images]

    with torch.random.fork_rng(devices=[]):
        detector = _build_detector(spec, inputs, seed)
        boxes = [_detections(detector, lb) for lb in inputs]
        crops = _classifier_crops(images, boxes, spec.random_crops, seed)
        classifier = _build_classifier(size, labels, crops, spec.random_crops, seed)

    stem = f"always_crop_{99710272 + seed:08d}_22x8_v12_epoch_00148"
    files = {
        "classifier": f"{stem}.pt",
        "classifier_labels": f"{stem}.labels.txt",
        "detector": "md_v5a.0.0.pt",
        "taxonomy": "taxonomy_release.txt",
        "geofence": "geofence_release.json",
    }
    torch.save(classifier, dest / files["classifier"])
    checkpoint = {
        "epoch": -1,
        "best_fitness": None,
        "model": detector.half(),
        "ema": None,
        "updates": None,
        "optimizer": None,
        "wandb_id": None,
        "date": "2022-06-15T00:00:00",
    }
    torch.save(checkpoint, dest / files["detector"])
    _write_lines(dest / files["classifier_labels"], labels)
    _write_lines(dest / files["taxonomy"], taxonomy)
    (dest / files["geofence"]).write_text(json.dumps(geofence, indent=1) + "\n", encoding="utf-8")
    info = {"version": version, "type": "always_crop", **files}
    (dest / "info.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return dest
