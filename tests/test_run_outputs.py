"""A real `trapedge run` writes every format from its store, and the ecosystem's own readers accept them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from test_end_to_end import run_cli
from test_formats import _validate


def test_run_writes_all_formats_and_they_validate(bundle: Path, photos, tmp_path: Path) -> None:
    out = tmp_path / "out"
    run_cli("run", str(photos[0].parent), "--bundle", str(bundle), "--out", str(out), "--quiet",
            "--timezone", "Africa/Windhoek", "--lat", "-19.5", "--lon", "13.2")
    errors, _ = _validate(out / "camtrap-dp" / "datapackage.json")
    assert not errors, errors
    media = (out / "camtrap-dp" / "media.csv").read_text()
    assert "+02:00" in media and "2021-04-11T20:43:09+02:00" in media
    validate = pytest.importorskip("megadetector.postprocessing.validate_batch_results")
    options = validate.ValidateBatchResultsOptions()
    options.raise_errors = True
    validate.validate_batch_results(str(out / "megadetector.json"), options)
    md = json.loads((out / "megadetector.json").read_text())
    assert md["info"]["format_version"] == "1.6" and len(md["images"]) == 10
    rows = (out / "results.csv").read_text().splitlines()
    assert len(rows) > 10
    before = (out / "megadetector.json").read_text()
    (out / "megadetector.json").unlink()
    run_cli("export-results", str(out), "--format", "megadetector")
    assert (out / "megadetector.json").read_text() == before
    bad = run_cli("export-results", str(out), "--format", "shapefile", check=False)
    assert bad.returncode == 2 and "'shapefile' is not one of" in bad.stderr and "Traceback" not in bad.stderr
