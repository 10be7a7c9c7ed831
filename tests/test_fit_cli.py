"""`trapedge fit` on a real bundle from a labelled CSV, then `trapedge run` using the shipped centroids."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from test_end_to_end import run_cli
from trapedge.runtime.models.bundle import Bundle
from trapedge.runtime.reclassify.stages import Centroids, label_depth

pytest.importorskip("torch")


def test_fit_from_csv_then_run_with_bundle_centroids(bundle_copy: Path, photos, tmp_path: Path) -> None:
    labels = [lab for lab in Bundle.load(bundle_copy).labels if label_depth(lab) == 5][:3]
    csv_path = tmp_path / "refs.csv"
    with open(csv_path, "w", newline="") as fp:
        writer = csv.writer(fp)
        writer.writerow(["filepath", "label", "xmin", "ymin", "width", "height"])
        for i, photo in enumerate(photos):
            for j, box in enumerate(([0.1, 0.1, 0.4, 0.4], [0.5, 0.5, 0.4, 0.4])):
                writer.writerow([str(photo), labels[(i + j) % 3], *box])
    proc = subprocess.run([sys.executable, "-m", "trapedge.runtime.cli", "fit", "--bundle", str(bundle_copy), "--references",
                           str(csv_path), "--epochs", "3", "--out-dim", "16"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    assert manifest["models"]["head"]["outputs"][0]["shape"][-1] == 16
    assert manifest["stages"]["tau_accept"] == 0.8
    cents = Centroids.load(Bundle.load(bundle_copy).file("centroids"))
    assert set(labels) <= set(cents.labels) and cents.vectors.shape[1] == 16
    assert np.allclose(np.linalg.norm(cents.vectors, axis=1), 1.0, atol=1e-5)
    out = tmp_path / "out"
    run_cli("run", str(photos[0].parent), "--bundle", str(bundle_copy), "--out", str(out), "--centroids", "both",
            "--scoring", "mahalanobis", "--quiet")
    info = json.loads((out / "predictions.json").read_text())["info"]["trapedge"]["reclassification"]
    assert info["centroids"] == "both" and info["stages"]["scoring"] == "mahalanobis"
    missing = run_cli("fit", "--bundle", str(bundle_copy), check=False)
    assert missing.returncode == 2
