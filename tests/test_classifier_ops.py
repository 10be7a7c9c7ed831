"""Crop preprocessing and top-k against SpeciesNet's own classifier code (torchvision) on real photos."""

from __future__ import annotations

import types

import numpy as np
import pytest
from PIL import Image

from trapedge.runtime.speciesnet import classifier as cls_ops

torch = pytest.importorskip("torch")
sn_classifier = pytest.importorskip("speciesnet.classifier")
sn_utils = pytest.importorskip("speciesnet.utils")


def _reference() -> object:
    ref = object.__new__(sn_classifier.SpeciesNetClassifier)
    ref.model_info = types.SimpleNamespace(type_="always_crop")
    return ref


def _boxes(rng: np.random.Generator, n: int) -> list[list[float]]:
    boxes = []
    for _ in range(n):
        x, y = rng.uniform(0, 0.9, 2)
        w, h = rng.uniform(0.002, 1 - x), rng.uniform(0.002, 1 - y)
        boxes.append([float(x), float(y), float(w), float(h)])
    return boxes + [[0.0, 0.0, 1.0, 1.0], [0.5, 0.5, 0.5, 0.5]]


def test_crops_match_speciesnet_on_real_photos(photos) -> None:
    rng = np.random.default_rng(7)
    ref = _reference()
    differing = total = 0
    for path in photos[:3]:
        img = Image.open(path).convert("RGB")
        pixels = np.asarray(img)
        boxes = _boxes(rng, 12)
        theirs = ref.preprocess(img, bboxes=[sn_utils.BBox(*b) for b in boxes])
        for box, expected in zip(boxes, theirs):
            ours = cls_ops.preprocess_crop(pixels, box)
            assert ours.shape == expected.arr.shape == (480, 480, 3)
            diff = np.abs(ours.astype(int) - expected.arr.astype(int))
            assert diff.max() <= 1
            differing += int(np.count_nonzero(diff))
            total += diff.size
    # float32 rounding order (torch may fuse multiply-adds) flips a truncation in a handful of pixels
    assert differing / total < 1e-4, differing / total


def test_empty_integer_crop_is_skipped_not_raised(photos) -> None:
    pixels = np.asarray(Image.open(photos[0]).convert("RGB"))
    assert cls_ops.preprocess_crop(pixels, [0.5, 0.5, 0.0001, 0.3]) is None
    assert cls_ops.preprocess_crop(pixels, [0.5, 0.5, 0.3, 0.0]) is None
    with pytest.raises(Exception, match="greater than 0"):
        _reference().preprocess(Image.fromarray(pixels), bboxes=[sn_utils.BBox(0.5, 0.5, 0.0001, 0.3)])


def test_crop_box_truncates_like_speciesnet() -> None:
    assert cls_ops.crop_box(1440, 2048, [0.1234, 0.5678, 0.25, 0.3333]) == (
        int(0.5678 * 1440), int(0.1234 * 2048), int(0.3333 * 1440), int(0.25 * 2048))


def test_network_input_matches_speciesnet_batch() -> None:
    rng = np.random.default_rng(3)
    crops = [rng.integers(0, 256, (480, 480, 3), dtype=np.uint8) for _ in range(3)]
    expected = np.stack([c / 255.0 for c in crops], axis=0, dtype=np.float32)
    np.testing.assert_array_equal(cls_ops.to_network_input(crops), expected)


def test_softmax_topk_match_torch() -> None:
    rng = np.random.default_rng(11)
    logits = (rng.normal(0, 4, (16, 2498))).astype(np.float32)
    scores = cls_ops.softmax(logits)
    t_scores, t_idx = torch.topk(torch.softmax(torch.from_numpy(logits), dim=-1), k=5, dim=-1)
    idx, vals = cls_ops.top_k(scores, 5)
    np.testing.assert_array_equal(idx, t_idx.numpy())
    np.testing.assert_allclose(vals, t_scores.numpy(), atol=1e-6)
