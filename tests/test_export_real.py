"""Export of the real architectures (random weights): EfficientNetV2-M at 480 with 2,498 classes, YOLOv5x6."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")
pytest.importorskip("yolov5")

from fixtures_models import check_edge_onnx  # noqa: E402
from trapedge.export.random_models import calibrate_batchnorm  # noqa: E402
from trapedge.export.speciesnet import _classifier_inputs, export_classifier, export_detector  # noqa: E402

pytestmark = pytest.mark.slow

# Stated tolerances: fp32 ONNX Runtime vs fp32 torch on the same inputs.
LOGIT_REL = 1e-4
FEATURE_REL = 1e-4
DETECTOR_REL = 1e-5


def _photos(photos: list[Path]) -> list[np.ndarray]:
    from PIL import Image

    return [np.asarray(Image.open(p).convert("RGB")) for p in photos[:2]]


def test_efficientnet_v2_m_2498_exports_with_parity(tmp_path: Path, photos) -> None:
    torch.manual_seed(0)
    net = torchvision.models.efficientnet_v2_m(weights=None, num_classes=2498).eval()
    classifier = torch.nn.Sequential(torchvision.ops.misc.Permute([0, 3, 1, 2]), net)
    # Calibrated on the parity inputs themselves: a random net calibrated on one kind of input is
    # chaotic on another (logits of 1e4 whose float32 noise is of the same order), measuring nothing.
    calibrate_batchnorm(classifier, torch.from_numpy(_classifier_inputs(_photos(photos))))
    with torch.no_grad():
        spread = classifier(torch.rand(2, 480, 480, 3)).std().item()
    assert spread > 1e-3  # activations no longer vanish, so parity is measured on meaningful logits
    labels = [f"{i:08d}-0000-0000-0000-000000000000;mammalia;o;f;g;s{i};c{i}" for i in range(2498)]
    entry = export_classifier(classifier, labels, tmp_path, 17, _photos(photos), print)
    check_edge_onnx(tmp_path / entry["file"])  # dynamic batch among the rest
    assert entry["outputs"][0]["shape"] == ["batch", 2498] and entry["outputs"][1]["shape"] == ["batch", 1280]
    parity = entry["parity"]
    print("EfficientNetV2-M parity", parity)
    assert parity["logits"]["max_rel_diff"] < LOGIT_REL
    assert parity["features"]["max_rel_diff"] < FEATURE_REL
    assert parity["top1_agreement"] == 1.0 and parity["top5_agreement"] == 1.0


def test_yolov5x6_exports_with_dynamic_shapes_and_parity(tmp_path: Path, photos) -> None:
    import yaml
    from yolov5.models.yolo import Model

    cfg_path = Path(__import__("yolov5").__file__).parent / "models" / "hub" / "yolov5x6.yaml"
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["nc"] = 3
    torch.manual_seed(0)
    model = Model(cfg).eval()
    entry = export_detector(model, tmp_path, 17, _photos(photos), print)
    onnx_model = check_edge_onnx(tmp_path / entry["file"])
    dims = onnx_model.graph.input[0].type.tensor_type.shape.dim
    assert all(d.dim_param for i, d in enumerate(dims) if i in (0, 2, 3))
    print("YOLOv5x6 parity", entry["parity"])
    assert entry["parity"]["max_rel_diff"] < DETECTOR_REL
    assert entry["outputs"][0]["shape"][-1] == 8
