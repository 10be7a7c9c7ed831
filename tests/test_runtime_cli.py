"""The runtime CLI with torch, open_clip and speciesnet unimportable: lean start, bad input, bad bundles."""

from __future__ import annotations

import ast
import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from badinput import make_bad_corpus
from test_end_to_end import lean_env, run_cli

RUNTIME_MODULES = ["trapedge.runtime", "trapedge.runtime.cli", "trapedge.runtime.pipeline",
                   "trapedge.runtime.speciesnet.ensemble", "trapedge.runtime.outputs", "trapedge.runtime.bench"]


def test_runtime_imports_without_heavy_packages() -> None:
    code = ("import sys, importlib\n"
            f"for m in {RUNTIME_MODULES!r}: importlib.import_module(m)\n"
            "heavy = [m for m in sys.modules if m.split('.')[0] in ('torch', 'open_clip', 'speciesnet')]\n"
            "assert not heavy, heavy\n"
            "try:\n    import torch\nexcept ImportError:\n    print('blocked')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=lean_env())
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "blocked"


def _imports(tree: ast.AST) -> list[tuple[str, bool]]:
    """(module, at module level) for every import in a parsed file."""
    found = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        found += [(n, node in tree.body) for n in names]
    return found


def test_runtime_sources_never_import_heavy_packages() -> None:
    runtime = Path(__file__).parents[1] / "runtime"
    heavy = ("torch", "torchvision", "open_clip", "speciesnet", "yolov5", "ultralytics", "onnx2torch", "ray")
    for path in runtime.rglob("*.py"):
        for module, top_level in _imports(ast.parse(path.read_text())):
            assert module.split(".")[0] not in heavy, f"{path} imports {module}"
            if module.startswith("trapedge.export"):
                # only the CLI may reach export, lazily inside the export command
                assert path.parent.name == "cli" and not top_level, f"{path} imports {module}"


def test_help_and_version_run_lean() -> None:
    assert "run" in run_cli("--help").stdout
    assert run_cli("--version").stdout.startswith("trapedge ")
    assert "speciesnet" in run_cli("export", "--help").stdout


def test_export_without_torch_fails_with_one_line(tmp_path: Path) -> None:
    proc = run_cli("export", "speciesnet", str(tmp_path), "--bundle", str(tmp_path / "b"), check=False)
    assert proc.returncode != 0
    assert proc.stderr.strip().startswith("Error: this command needs the export extra")


def test_bad_input_is_recorded_and_the_run_goes_on(bundle: Path, photos, tmp_path: Path) -> None:
    dump = tmp_path / "card"
    expected = make_bad_corpus(dump / "BAD", photos[0])
    shutil.copy(photos[1], dump / "good.JPG")
    out = tmp_path / "out"
    run_cli("run", str(dump), "--bundle", str(bundle), "--out", str(out), "--device", "cpu", "--quiet")
    predictions = {Path(p["filepath"]).relative_to(dump.resolve()).as_posix(): p
                   for p in json.loads((out / "predictions.json").read_text())["predictions"]}
    with open(out / "images.csv", newline="") as fp:
        rows = {row["key"]: row for row in csv.DictReader(fp)}
    assert set(predictions) == set(rows) == {f"BAD/{k}" for k in expected} | {"good.JPG"}
    for key, ok in expected.items():
        pred, row = predictions[f"BAD/{key}"], rows[f"BAD/{key}"]
        if ok:
            assert "failures" not in pred and "detections" in pred, key
            assert row["status"] in ("ok", "warning")
        else:
            assert pred["failures"] == ["DETECTOR"] and pred["failure_reason"], key
            assert row["status"] == "failed" and row["reason"] == pred["failure_reason"]
    assert "detections" in predictions["good.JPG"]
    assert rows["good.JPG"]["captured"] == "2021-04-11T20:43:10"


def _manifest(bundle: Path) -> dict:
    return json.loads((bundle / "manifest.json").read_text())


def _refused(bundle: Path, tmp_path: Path, photos) -> str:
    dump = tmp_path / "card"
    dump.mkdir(exist_ok=True)
    shutil.copy(photos[0], dump / "a.JPG")
    proc = run_cli("run", str(dump), "--bundle", str(bundle), "--out", str(tmp_path / "out"), check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), proc.stderr
    assert not (tmp_path / "out" / "predictions.json").exists()
    check = run_cli("check-bundle", "--bundle", str(bundle), check=False)
    assert check.returncode == 2 and check.stderr.strip() == lines[0]
    return lines[0]


def test_bundle_with_missing_file_is_refused(bundle_copy: Path, tmp_path: Path, photos) -> None:
    (bundle_copy / "taxonomy.txt").unlink()
    assert "taxonomy.txt: missing from the bundle" in _refused(bundle_copy, tmp_path, photos)


def test_bundle_with_wrong_hash_is_refused(bundle_copy: Path, tmp_path: Path, photos) -> None:
    with open(bundle_copy / "detector.onnx", "ab") as fp:
        fp.write(b"\0")
    assert "detector.onnx: sha256 does not match" in _refused(bundle_copy, tmp_path, photos)


def test_bundle_with_wrong_label_count_is_refused(bundle_copy: Path, tmp_path: Path, photos) -> None:
    from trapedge.runtime.models.bundle import sha256_file

    labels = bundle_copy / "labels.txt"
    labels.write_text(labels.read_text() + "00000000-0000-0000-0000-000000000000;aves;;;;;extra bird\n")
    manifest = _manifest(bundle_copy)
    manifest["files"]["labels"]["sha256"] = sha256_file(labels)
    (bundle_copy / "manifest.json").write_text(json.dumps(manifest))
    assert "labels but the classifier has" in _refused(bundle_copy, tmp_path, photos)


def test_bundle_whose_model_disagrees_with_manifest_is_refused(bundle_copy: Path, tmp_path: Path, photos) -> None:
    from trapedge.runtime.models.bundle import sha256_file

    labels = bundle_copy / "labels.txt"
    lines = labels.read_text().splitlines()
    labels.write_text("\n".join(lines + ["00000000-0000-0000-0000-000000000001;aves;;;;;x"]) + "\n")
    manifest = _manifest(bundle_copy)
    manifest["files"]["labels"]["sha256"] = sha256_file(labels)
    manifest["models"]["classifier"]["outputs"][0]["shape"][-1] = len(lines) + 1
    (bundle_copy / "manifest.json").write_text(json.dumps(manifest))
    proc = run_cli("run", str(tmp_path), "--bundle", str(bundle_copy), "--out", str(tmp_path / "o"), check=False)
    assert proc.returncode == 2 and "classifier has" in proc.stderr and proc.stderr.count("\n") == 1


def test_bad_manifest_json_is_refused(bundle_copy: Path, tmp_path: Path, photos) -> None:
    (bundle_copy / "manifest.json").write_text("{not json")
    assert "manifest.json: not valid JSON" in _refused(bundle_copy, tmp_path, photos)


def test_bad_country_is_one_line(bundle: Path, tmp_path: Path) -> None:
    proc = run_cli("run", str(tmp_path), "--bundle", str(bundle), "--out", str(tmp_path / "o"),
                   "--country", "US", check=False)
    assert proc.returncode == 2 and proc.stderr.startswith("Error: --country")


def test_demo_runs_lean_offline(tmp_path: Path) -> None:
    proc = run_cli("demo", "--out", str(tmp_path / "demo"))
    assert "UNTRAINED" in proc.stderr and "trapedge export speciesnet" in proc.stderr
    predictions = json.loads((tmp_path / "demo" / "results" / "predictions.json").read_text())["predictions"]
    assert len(predictions) == 10 and all(p["model_version"] == "demo-untrained" for p in predictions)
    assert sum(len(p["detections"]) for p in predictions) > 0
    manifest = json.loads((tmp_path / "demo" / "bundle" / "manifest.json").read_text())
    assert "UNTRAINED" in manifest["demo"]


def test_classification_cap_from_the_flag_and_the_station_config(bundle: Path, photos, tmp_path: Path) -> None:
    card = tmp_path / "card"
    card.mkdir()
    for photo in photos[:4]:
        shutil.copy(photo, card / photo.name)
    out = tmp_path / "out"
    run_cli("run", str(card), "--bundle", str(bundle), "--out", str(out), "--device", "cpu", "--quiet",
            "--no-report", "--max-classifications-per-image", "1", "--detection-threshold-for-classification", "0.3")
    counts = []
    for prediction in json.loads((out / "predictions.json").read_text())["predictions"]:
        dets = prediction.get("detections", [])
        counts.append((sum("raw_classifications" in d for d in dets), sum(d["conf"] >= 0.3 for d in dets)))
    assert all(classified == min(1, eligible) for classified, eligible in counts)
    assert any(eligible > 1 for _, eligible in counts)  # the cap had something to cut
    config = tmp_path / "station.toml"
    config.write_text("max_classifications_per_image = 2\n")
    proc = run_cli("run", str(card), "--bundle", str(bundle), "--out", str(out), "--config", str(config),
                   "--detection-threshold-for-classification", "0.3", "--quiet", check=False)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "max_classifications_per_image 1" in proc.stderr and str(out) in proc.stderr
    config.write_text("max_classifications_per_image = 0\n")
    proc = run_cli("run", str(card), "--bundle", str(bundle), "--out", str(tmp_path / "o2"), "--config",
                   str(config), "--quiet", check=False)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "station.toml" in proc.stderr
