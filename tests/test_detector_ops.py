"""Letterbox and NMS against SpeciesNet's own detector code (which calls yolov5) on the same inputs."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from trapedge.runtime.speciesnet import detector as det_ops

torch = pytest.importorskip("torch")
sn_detector = pytest.importorskip("speciesnet.detector")
sn_utils = pytest.importorskip("speciesnet.utils")


@pytest.mark.parametrize("shape,expected", [((500, 700), (960, 1280)), ((1111, 2000), (768, 1280)),
                                            ((1440, 2048), (960, 1280)), ((1280, 720), (1280, 768)),
                                            ((1280, 1280), (1280, 1280)), ((33, 17), (1280, 704))])
def test_letterbox_matches_speciesnet(shape, expected) -> None:
    rng = np.random.default_rng(sum(shape))
    image = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    ours = det_ops.letterbox(image)
    theirs = sn_detector.SpeciesNetDetector.preprocess(None, Image.fromarray(image))
    assert ours.shape == expected
    np.testing.assert_array_equal(ours.pixels, theirs.arr)
    np.testing.assert_array_equal(det_ops.to_network_input([ours])[0],
                                  torch.from_numpy(theirs.arr / 255).permute(2, 0, 1).float().numpy())


def _fake_rows(rng: np.random.Generator, net_h: int, net_w: int, n: int) -> np.ndarray:
    rows = np.zeros((n, 8), dtype=np.float32)
    rows[:, 0] = rng.uniform(0, net_w, n)
    rows[:, 1] = rng.uniform(0, net_h, n)
    rows[:, 2] = rng.uniform(2, net_w / 3, n)
    rows[:, 3] = rng.uniform(2, net_h / 3, n)
    rows[:, 4] = rng.uniform(0, 1, n) ** 2
    rows[:, 5:] = rng.dirichlet([0.5, 0.5, 0.5], n)
    # Near-duplicates so NMS has work, and low scores on both sides of the 0.01 threshold.
    src, dst = rng.integers(0, n, (2, n // 4))
    rows[dst, :4] = rows[src, :4] + rng.normal(0, 3, (len(dst), 4)).astype(np.float32)
    rows[: n // 10, 4] = rng.uniform(0.005, 0.02, n // 10)
    return rows


class _FakeModel:
    def __init__(self, rows: np.ndarray) -> None:
        self.rows = rows

    def __call__(self, batch, augment=False):
        return (torch.from_numpy(self.rows[None]),)


@pytest.mark.parametrize("seed", range(25))
def test_postprocess_matches_speciesnet(seed: int) -> None:
    rng = np.random.default_rng(seed)
    orig_h, orig_w = [(1440, 2048), (1080, 1920), (500, 700), (3000, 4000)][seed % 4]
    image = np.zeros((orig_h, orig_w, 3), dtype=np.uint8)
    boxed = det_ops.letterbox(image)
    rows = _fake_rows(rng, *boxed.shape, n=int(rng.integers(5, 80)))
    reference = object.__new__(sn_detector.SpeciesNetDetector)
    reference.model, reference.device = _FakeModel(rows), "cpu"
    theirs = reference.predict("x.jpg", sn_utils.PreprocessedImage(boxed.pixels, orig_w, orig_h))["detections"]
    ours = det_ops.postprocess(rows, boxed.shape, boxed)
    assert len(ours) == len(theirs) and len(ours) > 0
    for a, b in zip(ours, theirs):
        assert (a["category"], a["label"]) == (b["category"], b["label"])
        assert a["conf"] == pytest.approx(b["conf"], abs=1e-7)
        np.testing.assert_allclose(a["bbox"], b["bbox"], atol=1e-6)


def test_postprocess_empty_and_below_threshold() -> None:
    boxed = det_ops.letterbox(np.zeros((1440, 2048, 3), dtype=np.uint8))
    assert det_ops.postprocess(np.zeros((0, 8), np.float32), boxed.shape, boxed) == []
    rows = np.zeros((3, 8), np.float32)
    rows[:, 4] = 0.01  # SpeciesNet keeps strictly above 0.01
    rows[:, 5] = 1.0
    assert det_ops.postprocess(rows, boxed.shape, boxed) == []


def test_nms_is_class_aware() -> None:
    boxed = det_ops.letterbox(np.zeros((960, 1280, 3), dtype=np.uint8))
    rows = np.array([[100, 100, 50, 50, 0.9, 1, 0, 0], [101, 100, 50, 50, 0.8, 0, 1, 0],
                     [102, 101, 50, 50, 0.7, 1, 0, 0]], np.float32)
    dets = det_ops.postprocess(rows, boxed.shape, boxed)
    assert [d["label"] for d in dets] == ["animal", "human"]
