"""Re-classification encoder for a bundle: open_clip vision tower, a torch module, or SpeciesNet's features."""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch

from trapedge.runtime.models.bundle import MANIFEST, SCHEMA_VERSION, sha256_file
from trapedge.runtime.card.ingest import IMAGE_EXTENSIONS

from .onnxio import export_onnx
from .parity import compare_outputs, ort_session

__all__ = [
    "BACKBONES",
    "DEFAULT_BIRD_PROMPTS",
    "DEFAULT_PROMPTS",
    "MIN_COSINE",
    "describe_preprocess",
    "export_encoder",
    "export_torch_encoder",
]

logger = logging.getLogger("trapedge.export")

BACKBONES = ("open_clip", "speciesnet", "torch")
DEFAULT_PROMPTS = (
    "a camera trap photo of a bird.",
    "a camera trap photo of a mammal.",
    "a camera trap photo of a reptile.",
    "an empty camera trap photo.",
    "a camera trap photo of a person.",
    "a camera trap photo of a vehicle.",
)
DEFAULT_BIRD_PROMPTS = (0,)
MIN_COSINE = 0.9999
PARITY_SEED = 20261128
ENCODER_FILE = "encoder.onnx"
PROMPTS_FILE = "prompts.npz"
_NOISE_IMAGES = 2
_PHOTO_LIMIT = 4
_MAX_EXPORT_BATCH = 256

Log = Callable[[str], None]


class _VisionTower(torch.nn.Module):
    """An image tower returning one pooled embedding per image (the first output of a tuple)."""

    def __init__(self, tower: torch.nn.Module) -> None:
        super().__init__()
        self.tower = tower

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out = self.tower(images)
        return out[0] if isinstance(out, (tuple, list)) else out


@contextlib.contextmanager
def _mha_fastpath_disabled() -> Iterator[None]:
    """Traces nn.MultiheadAttention as plain ops: its fused kernel has no ONNX export."""
    previous = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(previous)


def _read_manifest(bundle: Path) -> dict:
    path = bundle / MANIFEST
    if not path.is_file():
        raise ValueError(f"{path}: no manifest.json; export a bundle first (trapedge export speciesnet)")
    manifest = json.loads(path.read_text(encoding="utf-8"))
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(f"{path}: schema_version {manifest.get('schema_version')!r} is not {SCHEMA_VERSION}")
    for key in ("models", "files"):
        if not isinstance(manifest.get(key), dict):
            raise ValueError(f"{path}: missing '{key}' section")
    return manifest


def _write_manifest(bundle: Path, manifest: dict) -> None:
    path = bundle / MANIFEST
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _drop(bundle: Path, manifest: dict, section: str, name: str, log: Log) -> None:
    entry = manifest[section].pop(name, None)
    if entry is not None:
        (bundle / entry["file"]).unlink(missing_ok=True)
        log(f"removed {section}.{name} ({entry['file']}): the new embedding backbone does not use it")


def _io_spec(name: str, shape: list) -> dict:
    return {"name": name, "dtype": "float32", "shape": shape}


def describe_preprocess(transform: Any) -> dict:
    """Manifest preprocessing of an open_clip/torchvision eval transform (resize, crop, normalise)."""
    from torchvision import transforms as T

    steps = list(getattr(transform, "transforms", [transform]))
    spec: dict[str, Any] = {"layout": "NCHW", "color": "RGB"}
    for step in steps:
        if isinstance(step, T.Resize):
            size = [step.size] if isinstance(step.size, int) else list(step.size)
            if len(size) == 1:
                spec.update(resize="shortest_side", size=int(size[0]))
            elif size[0] == size[1]:
                spec.update(resize="squash", size=int(size[0]), crop="none")
            else:
                raise ValueError(f"non-square resize {size} is not supported")
            spec["interpolation"] = step.interpolation.value
            spec["resampler"] = "PIL"
        elif isinstance(step, T.CenterCrop):
            crop = list(step.size)
            if crop[0] != crop[1] or crop[0] != spec.get("size"):
                raise ValueError(f"centre crop {crop} does not match the resize size {spec.get('size')}")
            spec["crop"] = "center"
        elif isinstance(step, T.Normalize):
            spec["mean"] = [float(v) for v in step.mean]
            spec["std"] = [float(v) for v in step.std]
        elif isinstance(step, T.ToTensor) or type(step).__name__ in ("MaybeToTensor",):
            spec["scale"] = "1/255"
        elif type(step).__name__ in ("MaybeConvertMode",) or getattr(step, "__name__", "") == "_convert_to_rgb":
            continue
        else:
            raise ValueError(f"preprocessing step {type(step).__name__} is not supported by the runtime")
    missing = [k for k in ("size", "resize", "crop", "mean", "std", "scale") if k not in spec]
    if missing:
        raise ValueError(f"preprocessing transform lacks {missing}: {transform!r}")
    return {k: spec[k] for k in ("layout", "size", "resize", "interpolation", "crop", "mean", "std",
                                 "scale", "color", "resampler")}


def _parity_batch(transform: Callable, folder: Optional[Path]) -> tuple[np.ndarray, str]:
    from PIL import Image, ImageOps

    paths = []
    if folder is not None:
        paths = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        paths = paths[:_PHOTO_LIMIT]
    images = [ImageOps.exif_transpose(Image.open(p)).convert("RGB") for p in paths]
    rng = np.random.default_rng(PARITY_SEED)
    images += [Image.fromarray(rng.integers(0, 256, (360, 480, 3), dtype=np.uint8)) for _ in range(_NOISE_IMAGES)]
    batch = torch.stack([transform(im) for im in images]).numpy().astype(np.float32)
    described = (f"{len(images)} images ({len(paths)} photos, {_NOISE_IMAGES} uniform noise, seed {PARITY_SEED}) "
                 "through the preprocessing above, at batch sizes "
                 f"{len(images)} and 1")
    return batch, described


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    return (a * b).sum(-1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-30)


def _export_tower(tower: torch.nn.Module, reference_fn: Callable[[torch.Tensor], torch.Tensor],
                  bundle: Path, size: int, batch: np.ndarray, inputs: str, opset: int, log: Log) -> dict:
    """Exports an image tower to encoder.onnx, measures parity against reference_fn, returns the entry."""
    with torch.no_grad():
        reference = reference_fn(torch.from_numpy(batch)).float().numpy()
    if reference.ndim != 2:
        raise ValueError(f"the encoder returns shape {list(reference.shape)}; expected [batch, dim]")
    path = bundle / ENCODER_FILE
    example = torch.from_numpy(batch[:2]) if len(batch) >= 2 else torch.rand(2, 3, size, size)
    with _mha_fastpath_disabled():
        exporter = export_onnx(
            copy.deepcopy(tower).eval(), example, path, input_name="images", output_names=["embedding"],
            dynamic_dims={0: "batch"}, opset=opset,
            dynamo_shapes=lambda: {"images": {0: torch.export.Dim("batch", min=1, max=_MAX_EXPORT_BATCH)}},
            log=log,
        )
    session = ort_session(path)
    candidate = session.run(["embedding"], {"images": batch})[0]
    single = session.run(["embedding"], {"images": batch[:1]})[0]
    both_ref = np.concatenate([reference, reference[:1]])
    both_cand = np.concatenate([candidate, single])
    cosine = float(_cosine(both_ref, both_cand).min())
    parity = compare_outputs(["embedding"], [both_ref], [both_cand])
    parity.update(min_cosine=cosine, inputs=inputs)
    log(f"encoder parity: min cosine {cosine:.7f}, max abs diff {parity['embedding']['max_abs_diff']:.3g}")
    if not cosine >= MIN_COSINE:
        raise RuntimeError(f"{path}: ONNX Runtime and torch disagree (min cosine {cosine:.6f} < {MIN_COSINE})")
    dim = int(reference.shape[-1])
    return {
        "file": path.name, "sha256": sha256_file(path), "format": "onnx", "opset": opset,
        "exporter": exporter,
        "inputs": [_io_spec("images", ["batch", 3, size, size])],
        "outputs": [_io_spec("embedding", ["batch", dim])],
        "parity": parity,
    }


def _embedding_section(backbone: str, model: str, output: str, dim: int) -> dict:
    return {"backbone": backbone, "model": model, "output": output, "dim": dim}


def _write_prompts(bundle: Path, embeddings: np.ndarray, prompts: Sequence[str],
                   bird_rows: Sequence[int]) -> dict:
    path = bundle / PROMPTS_FILE
    np.savez(path, embeddings=embeddings.astype(np.float32), prompts=np.asarray(list(prompts), dtype=np.str_),
             bird_rows=np.asarray(list(bird_rows), dtype=np.int64))
    return {"file": path.name, "sha256": sha256_file(path), "count": len(prompts)}


def _check_prompts(prompts: Sequence[str], bird_prompts: Sequence[int]) -> None:
    if not prompts or any(not isinstance(p, str) or not p.strip() for p in prompts):
        raise ValueError("prompts must be a non-empty list of non-empty strings")
    if len(set(prompts)) != len(prompts):
        raise ValueError("prompts must be unique")
    if not bird_prompts or any(not 0 <= int(i) < len(prompts) for i in bird_prompts):
        raise ValueError(f"bird_prompts must index prompts (0..{len(prompts) - 1}); got {list(bird_prompts)}")


def _open_clip_encoder(bundle: Path, manifest: dict, model_name: str, pretrained: Optional[str],
                       prompts: Sequence[str], bird_prompts: Sequence[int], parity_images: Optional[Path],
                       opset: int, log: Log) -> None:
    import open_clip
    from open_clip.pretrained import get_pretrained_cfg

    log(f"loading open_clip {model_name} (pretrained={pretrained})")
    model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=pretrained)
    model = model.float().cpu().eval()
    model.requires_grad_(False)
    preprocessing = describe_preprocess(preprocess)
    size = preprocessing["size"]
    batch, inputs = _parity_batch(preprocess, parity_images)
    tokenizer = open_clip.get_tokenizer(model_name)
    with torch.no_grad():
        text = model.encode_text(tokenizer(list(prompts)), normalize=False).float()
    text = torch.nn.functional.normalize(text, dim=-1).numpy()

    log(f"exporting the {model_name} vision tower")
    entry = _export_tower(_VisionTower(model.visual), lambda x: model.encode_image(x, normalize=False),
                          bundle, size, batch, inputs, opset, log)
    dim = entry["outputs"][0]["shape"][1]
    if text.shape[-1] != dim:
        raise ValueError(f"{model_name}: text embeddings are {text.shape[-1]}-d but image embeddings {dim}-d")

    provenance: dict[str, Any] = {"backbone": "open_clip", "model": model_name, "pretrained": pretrained}
    if pretrained and not get_pretrained_cfg(model_name, pretrained) and os.path.isfile(pretrained):
        provenance.update(pretrained=Path(pretrained).name, pretrained_sha256=sha256_file(Path(pretrained)))
    provenance["open_clip_version"] = open_clip.__version__
    manifest["models"]["encoder"] = {**entry, **provenance, "preprocessing": preprocessing}
    manifest["files"]["prompts"] = _write_prompts(bundle, text, prompts, bird_prompts)
    manifest["embedding"] = _embedding_section("open_clip", "encoder", "embedding", dim)


def _speciesnet_features(bundle: Path, manifest: dict, log: Log) -> None:
    import onnx

    entry = manifest["models"].get("classifier")
    if entry is None:
        raise ValueError(f"{bundle / MANIFEST}: no classifier; the speciesnet backbone uses its features")
    declared = next((o for o in entry.get("outputs", []) if o.get("name") == "features"), None)
    if declared is None or not isinstance(declared["shape"][-1], int):
        raise ValueError(f"{bundle / MANIFEST}: the classifier has no fixed-width 'features' output; re-export it")
    graph = onnx.load(str(bundle / entry["file"]), load_external_data=False).graph
    actual = next((o for o in graph.output if o.name == "features"), None)
    if actual is None or actual.type.tensor_type.shape.dim[-1].dim_value != declared["shape"][-1]:
        raise ValueError(f"{bundle / entry['file']}: its 'features' output does not match the manifest")
    _drop(bundle, manifest, "models", "encoder", log)
    _drop(bundle, manifest, "files", "prompts", log)
    manifest["embedding"] = _embedding_section("speciesnet", "classifier", "features", int(declared["shape"][-1]))


def export_encoder(
    bundle: Path,
    *,
    model: str = "ViT-L-14",
    pretrained: Optional[str] = "openai",
    backbone: str = "open_clip",
    prompts: Sequence[str] = DEFAULT_PROMPTS,
    bird_prompts: Sequence[int] = DEFAULT_BIRD_PROMPTS,
    parity_images: Optional[Path] = None,
    opset: int = 17,
    log: Log = logger.info,
) -> dict:
    """Adds an image encoder (and bird-override prompt embeddings) to an existing bundle; returns the manifest."""
    bundle = Path(bundle)
    if backbone not in BACKBONES:
        raise ValueError(f"unknown backbone {backbone!r}; expected one of: {', '.join(BACKBONES)}")
    manifest = _read_manifest(bundle)
    if backbone == "open_clip":
        _check_prompts(prompts, bird_prompts)
        _open_clip_encoder(bundle, manifest, model, pretrained, prompts, bird_prompts, parity_images, opset, log)
    elif backbone == "speciesnet":
        _speciesnet_features(bundle, manifest, log)
    else:
        raise ValueError("the torch backbone takes a module object: call export_torch_encoder(bundle, module, ...)")
    _write_manifest(bundle, manifest)
    return manifest


def export_torch_encoder(
    bundle: Path,
    module: torch.nn.Module,
    *,
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    name: str,
    parity_images: Optional[Path] = None,
    opset: int = 17,
    log: Log = logger.info,
) -> dict:
    """Adds a torch image module (NCHW float in, [batch, dim] out) as the bundle's encoder; returns the manifest."""
    from open_clip import image_transform

    bundle = Path(bundle)
    manifest = _read_manifest(bundle)
    transform = image_transform(size, is_train=False, mean=tuple(mean), std=tuple(std),
                                resize_mode="shortest", interpolation="bicubic")
    preprocessing = describe_preprocess(transform)
    module = module.float().cpu().eval()
    batch, inputs = _parity_batch(transform, parity_images)
    log(f"exporting torch encoder {name}")
    tower = _VisionTower(module)
    entry = _export_tower(tower, tower, bundle, size, batch, inputs, opset, log)
    dim = entry["outputs"][0]["shape"][1]
    _drop(bundle, manifest, "files", "prompts", log)
    manifest["models"]["encoder"] = {**entry, "backbone": "torch", "model": name, "preprocessing": preprocessing}
    manifest["embedding"] = _embedding_section("torch", "encoder", "embedding", dim)
    _write_manifest(bundle, manifest)
    return manifest
