"""`trapedge bundle update` and `rollback`: validation, the geofence effect, hashes, history and crash safety."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from fixtures_models import data_bundle
from test_end_to_end import lean_env, run_cli
from trapedge.runtime.models import bundle_update
from trapedge.runtime.models.bundle import Bundle, sha256_file
from trapedge.runtime.models.bundle_update import HISTORY, KEEP_HISTORY, BundleUpdateError, apply_update, rollback
from trapedge.runtime.speciesnet.ensemble import Ensemble, load_geofence, should_geofence_animal_classification

from test_stages import BLANK, CANID, CANIS, CARN, FELID, JACKAL, LEOPARD, LION, MAMMAL, PANTHERA  # noqa: E402
TIGER = "s5;mammalia;carnivora;felidae;panthera;tigris;tiger"
LABELS = [BLANK, LION, LEOPARD, JACKAL]
TAXONOMY = [BLANK, MAMMAL, CARN, FELID, PANTHERA, LION, LEOPARD, CANID, CANIS, JACKAL]
KEY = {label: ";".join(label.split(";")[1:6]) for label in TAXONOMY + [TIGER]}
COUNTRY = "NAM"


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file of the bundle, history and leftovers included, by relative path."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def live(root: Path) -> dict[str, bytes]:
    """The bundle's files outside .history."""
    return {k: v for k, v in snapshot(root).items() if not k.startswith(HISTORY)}


def write_json(path: Path, value: dict) -> Path:
    path.write_text(json.dumps(value, indent=1) + "\n", encoding="utf-8")
    return path


def block_lion(tmp_path: Path) -> Path:
    return write_json(tmp_path / "geofence-new.json", {KEY[LION]: {"block": {COUNTRY: []}}})


def decide_lion(root: Path) -> str:
    """The ensemble's answer for a confident lion crop in COUNTRY with the bundle's current data."""
    loaded = Bundle.load(root)
    ensemble = Ensemble.from_files(loaded.file("taxonomy"), loaded.file("geofence"))
    decision = ensemble.decide([{"classes": [LION, LEOPARD], "scores": [0.95, 0.03]}],
                               [{"label": "animal", "conf": 0.9}], country=COUNTRY)
    return decision[0]["class"]


@pytest.fixture()
def bundle_dir(tmp_path: Path) -> Path:
    return data_bundle(tmp_path / "bundle", LABELS, TAXONOMY)


def test_update_changes_geofence_effect_and_verifies(bundle_dir: Path, tmp_path: Path) -> None:
    assert decide_lion(bundle_dir) == LION
    before = live(bundle_dir)
    modes = {p.suffix: p.stat().st_mode for p in bundle_dir.iterdir()}
    assert apply_update(bundle_dir, geofence=block_lion(tmp_path)) == 1
    assert {p.suffix: p.stat().st_mode for p in bundle_dir.iterdir() if p.is_file()} == modes  # not 0600
    loaded = Bundle.load(bundle_dir, verify_hashes=True)
    assert loaded.data_version == 1
    data = loaded.manifest["data"]
    assert data["version"] == 1 and data["updated"].endswith("Z")
    assert data["geofence_sha256"] == sha256_file(loaded.file("geofence"))
    assert data["taxonomy_sha256"] == sha256_file(loaded.file("taxonomy"))
    assert loaded.file("geofence").read_bytes() == (tmp_path / "geofence-new.json").read_bytes()
    assert loaded.file("taxonomy").name == "taxonomy.txt"  # unchanged files keep their name
    geofence_map = load_geofence(loaded.file("geofence"))
    assert should_geofence_animal_classification(LION, COUNTRY, None, geofence_map, True)
    assert not should_geofence_animal_classification(LION, "KEN", None, geofence_map, True)
    assert decide_lion(bundle_dir) == FELID  # rolled up past the species now blocked in COUNTRY
    # the previous files and manifest are kept, byte for byte, for rollback; the old geofence is gone
    assert snapshot(bundle_dir / HISTORY / "0") == {k: before[k] for k in ("geofence.json", "manifest.json",
                                                                            "taxonomy.txt")}
    assert not (bundle_dir / "geofence.json").exists()


def test_update_taxonomy_and_geofence_together(bundle_dir: Path, tmp_path: Path) -> None:
    # SpeciesNet's taxonomy_release.txt carries taxa the classifier has no label for; a new one is accepted
    taxonomy = tmp_path / "taxonomy-new.txt"
    taxonomy.write_text("\n".join(TAXONOMY + [TIGER]) + "\n", encoding="utf-8")
    geofence = write_json(tmp_path / "g.json", {KEY[TIGER]: {"allow": {"IND": []}}, KEY[LION]: {"block": {"NAM": []}}})
    assert apply_update(bundle_dir, geofence=geofence, taxonomy=taxonomy) == 1
    loaded = Bundle.load(bundle_dir)
    assert loaded.file("taxonomy").read_bytes() == taxonomy.read_bytes()
    assert loaded.manifest["files"]["taxonomy"]["sha256"] == sha256_file(taxonomy)
    assert decide_lion(bundle_dir) == FELID


def test_rollback_restores_bytes_and_previous_version(bundle_dir: Path, tmp_path: Path) -> None:
    original = snapshot(bundle_dir)
    assert apply_update(bundle_dir, geofence=block_lion(tmp_path)) == 1
    first = live(bundle_dir)
    allow = write_json(tmp_path / "allow.json", {KEY[LION]: {"allow": {"KEN": []}}})
    assert apply_update(bundle_dir, geofence=allow) == 2
    assert rollback(bundle_dir) == 1
    assert live(bundle_dir) == first and Bundle.load(bundle_dir).data_version == 1
    assert decide_lion(bundle_dir) == FELID
    assert rollback(bundle_dir) == 0
    assert live(bundle_dir) == original  # manifest included: byte-identical
    assert Bundle.load(bundle_dir).data_version == 0 and decide_lion(bundle_dir) == LION
    with pytest.raises(BundleUpdateError, match="no earlier data version"):
        rollback(bundle_dir)
    # a version number is never issued twice, so a run's recorded data version stays unambiguous
    assert apply_update(bundle_dir, geofence=allow) == 3


def test_rollback_keeps_models_added_after_the_update(bundle_dir: Path, tmp_path: Path) -> None:
    apply_update(bundle_dir, geofence=block_lion(tmp_path))
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    (bundle_dir / "head.onnx").write_bytes(b"head")
    manifest["models"]["head"] = {"file": "head.onnx", "sha256": sha256_file(bundle_dir / "head.onnx")}
    write_json(bundle_dir / "manifest.json", manifest)
    assert rollback(bundle_dir) == 0
    loaded = Bundle.load(bundle_dir)
    assert loaded.has_model("head") and loaded.data_version == 0 and "data" not in loaded.manifest
    assert (bundle_dir / "geofence.json").read_text() == "{}\n"


def test_unknown_geofence_taxa_are_refused_and_bundle_untouched(bundle_dir: Path, tmp_path: Path) -> None:
    before = snapshot(bundle_dir)
    bad = {KEY[LION]: {"block": {COUNTRY: []}}, KEY[TIGER]: {"allow": {"IND": []}}}
    bad.update({f"mammalia;carnivora;felidae;panthera;x{i}": {"allow": {"IND": []}} for i in range(6)})
    with pytest.raises(BundleUpdateError) as err:
        apply_update(bundle_dir, geofence=write_json(tmp_path / "bad.json", bad))
    message = str(err.value)
    assert "\n" not in message and "bad.json" in message
    assert KEY[TIGER] in message and "7 geofence taxon key(s)" in message and "(+2 more)" in message
    assert snapshot(bundle_dir) == before  # nothing written, not even history


def test_taxonomy_missing_a_classifier_label_is_refused(bundle_dir: Path, tmp_path: Path) -> None:
    before = snapshot(bundle_dir)
    taxonomy = tmp_path / "short.txt"
    taxonomy.write_text("\n".join(t for t in TAXONOMY if t != JACKAL) + "\n", encoding="utf-8")
    with pytest.raises(BundleUpdateError, match=r"1 classifier label\(s\) missing from the taxonomy: .*jackal"):
        apply_update(bundle_dir, taxonomy=taxonomy)
    # the bundle's geofence must also stay valid against a new taxonomy
    apply_update(bundle_dir, geofence=block_lion(tmp_path))
    before = snapshot(bundle_dir)
    renamed = tmp_path / "renamed.txt"
    renamed.write_text("\n".join(TAXONOMY).replace(";leo;", ";leonis;") + "\n", encoding="utf-8")
    with pytest.raises(BundleUpdateError, match=r"label\(s\) missing"):
        apply_update(bundle_dir, taxonomy=renamed)
    assert snapshot(bundle_dir) == before


@pytest.mark.parametrize("content, problem", [
    ("not json", "not a SpeciesNet geofence"),
    ("[1, 2]", "not a SpeciesNet geofence"),
    (json.dumps({KEY[LION]: {"block": {"nam": []}}}), "3-letter uppercase"),
    (json.dumps({KEY[LION]: {"block": {"NA": []}}}), "3-letter uppercase"),
    (json.dumps({KEY[LION]: {"deny": {"NAM": []}}}), "'allow' and 'block'"),
    (json.dumps({KEY[LION]: {"block": {"NAM": "CA"}}}), "admin1"),
    (json.dumps({"felidae;panthera": {"block": {"NAM": []}}}), "5-field"),
])
def test_malformed_geofence_is_refused(bundle_dir: Path, tmp_path: Path, content: str, problem: str) -> None:
    before = snapshot(bundle_dir)
    path = tmp_path / "g.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(BundleUpdateError, match=problem) as err:
        apply_update(bundle_dir, geofence=path)
    assert str(err.value).startswith(str(path)) and "\n" not in str(err.value)
    assert snapshot(bundle_dir) == before


def test_malformed_taxonomy_is_refused(bundle_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "t.txt"
    path.write_text("\n".join(TAXONOMY + ["s9;mammalia;carnivora;felidae;lynx"]) + "\n", encoding="utf-8")
    with pytest.raises(BundleUpdateError, match="not a SpeciesNet taxonomy"):
        apply_update(bundle_dir, taxonomy=path)


def test_history_is_bounded(bundle_dir: Path, tmp_path: Path) -> None:
    for i in range(KEEP_HISTORY + 2):
        geofence = write_json(tmp_path / f"g{i}.json", {KEY[LION]: {"allow": {f"K{chr(65 + i)}N": []}}})
        assert apply_update(bundle_dir, geofence=geofence) == i + 1
    entries = sorted(int(p.name) for p in (bundle_dir / HISTORY).iterdir() if p.is_dir())
    assert entries == list(range(2, KEEP_HISTORY + 2))
    assert sorted(p.name for p in bundle_dir.iterdir() if p.name.startswith("geofence")) == ["geofence.v7.json"]
    assert apply_update(bundle_dir, geofence=geofence) == KEEP_HISTORY + 2  # same file: nothing to do
    Bundle.load(bundle_dir)


def test_failure_before_manifest_write_leaves_old_bundle(bundle_dir: Path, tmp_path: Path, monkeypatch) -> None:
    before = live(bundle_dir)
    real = bundle_update.atomic_write_text

    def failing(path: Path, text: str) -> None:
        if Path(path).name == "manifest.json" and Path(path).parent == bundle_dir:
            raise OSError(28, "No space left on device")
        real(path, text)

    monkeypatch.setattr(bundle_update, "atomic_write_text", failing)
    with pytest.raises(OSError):
        apply_update(bundle_dir, geofence=block_lion(tmp_path))
    loaded = Bundle.load(bundle_dir, verify_hashes=True)
    assert loaded.data_version == 0 and decide_lion(bundle_dir) == LION
    assert {k: v for k, v in live(bundle_dir).items() if k in before} == before
    monkeypatch.setattr(bundle_update, "atomic_write_text", real)
    assert apply_update(bundle_dir, geofence=block_lion(tmp_path)) == 2  # works again; the leftover is swept
    assert sorted(p.name for p in bundle_dir.iterdir() if p.name.startswith("geofence")) == ["geofence.v2.json"]


def _killed_at(point: str, *args: str) -> None:
    env = dict(lean_env(), TRAPEDGE_KILL_AT=point)
    proc = subprocess.run([sys.executable, "-m", "trapedge.runtime.cli", "bundle", *args], capture_output=True,
                          text=True, env=env)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]


@pytest.mark.parametrize("nth", [1, 2, 3])
def test_sigkill_during_update_leaves_a_loadable_bundle(bundle_dir: Path, tmp_path: Path, nth: int) -> None:
    original = live(bundle_dir)
    geofence = block_lion(tmp_path)
    # 1: after the history copy, 2: after the new files, 3: after the manifest, before the sweep
    _killed_at(f"bundle-update:{nth}", "update", "--bundle", str(bundle_dir), "--geofence", str(geofence))
    loaded = Bundle.load(bundle_dir, verify_hashes=True)
    assert loaded.data_version == (1 if nth == 3 else 0)
    assert decide_lion(bundle_dir) == (FELID if nth == 3 else LION)
    if nth < 3:
        assert apply_update(bundle_dir, geofence=geofence) == 2  # a retry completes it, under a fresh version
        assert decide_lion(bundle_dir) == FELID
    assert rollback(bundle_dir) == 0
    assert live(bundle_dir) == original  # leftovers of the killed run swept


@pytest.mark.parametrize("nth", [1, 2])
def test_sigkill_during_rollback_leaves_a_loadable_bundle(bundle_dir: Path, tmp_path: Path, nth: int) -> None:
    original = live(bundle_dir)
    apply_update(bundle_dir, geofence=block_lion(tmp_path))
    # 1: after the old files are back, 2: after the old manifest, before the sweep
    _killed_at(f"bundle-rollback:{nth}", "rollback", "--bundle", str(bundle_dir))
    loaded = Bundle.load(bundle_dir, verify_hashes=True)
    assert loaded.data_version == (1 if nth == 1 else 0)
    assert decide_lion(bundle_dir) == (FELID if nth == 1 else LION)
    if nth == 1:
        assert rollback(bundle_dir) == 0
    else:
        with pytest.raises(BundleUpdateError, match="no earlier"):
            rollback(bundle_dir)
    apply_update(bundle_dir, geofence=block_lion(tmp_path))
    rollback(bundle_dir)
    assert live(bundle_dir) == original


def test_cli_update_and_rollback(bundle_dir: Path, tmp_path: Path) -> None:
    ok = run_cli("bundle", "update", "--bundle", str(bundle_dir), "--geofence", str(block_lion(tmp_path)))
    assert "data version 1" in ok.stderr
    assert "rolled back to data version 0" in run_cli("bundle", "rollback", "--bundle", str(bundle_dir)).stderr
    before = snapshot(bundle_dir)
    unknown = write_json(tmp_path / "unknown.json", {KEY[TIGER]: {"allow": {"IND": []}}})
    bad_country = write_json(tmp_path / "country.json", {KEY[LION]: {"allow": {"in": []}}})
    short = tmp_path / "short.txt"
    short.write_text("\n".join(TAXONOMY[:-1]) + "\n", encoding="utf-8")
    cases = [
        (["update", "--bundle", str(bundle_dir), "--geofence", str(unknown)], [str(unknown), KEY[TIGER]]),
        (["update", "--bundle", str(bundle_dir), "--geofence", str(bad_country)], [str(bad_country), "'in'"]),
        (["update", "--bundle", str(bundle_dir), "--taxonomy", str(short)], [str(short), "jackal"]),
        (["update", "--bundle", str(bundle_dir), "--geofence", str(tmp_path / "absent.json")], ["absent.json"]),
        (["update", "--bundle", str(bundle_dir)], ["--geofence"]),
        (["update", "--bundle", str(tmp_path / "nobundle"), "--geofence", str(unknown)], ["nobundle"]),
        (["rollback", "--bundle", str(bundle_dir)], [HISTORY, "no earlier data version"]),
    ]
    for args, expected in cases:
        proc = run_cli("bundle", *args, check=False)
        assert proc.returncode == 2, (args, proc.stderr)
        assert "Traceback" not in proc.stderr + proc.stdout, args
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: "), (args, proc.stderr)
        for text in expected:
            assert text in lines[0], (args, lines[0])
    assert snapshot(bundle_dir) == before


def test_run_info_records_data_version(bundle_dir: Path, tmp_path: Path) -> None:
    from trapedge.runtime.station import run_info as _info

    assert _info(Bundle.load(bundle_dir), None)["trapedge"]["bundle_data_version"] == 0
    apply_update(bundle_dir, geofence=block_lion(tmp_path))
    assert _info(Bundle.load(bundle_dir), None)["trapedge"]["bundle_data_version"] == 1
