"""`trapedge batch` on this machine: per-card outputs identical to `trapedge run`, the season's merged files, a
driver killed mid-season resuming only unfinished chunks, an unreadable card failing alone, and the CLI lean of Ray."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import pytest

from test_formats import _validate
from trapedge.runtime.demo import build_demo_bundle, sample_photos
from trapedge.runtime.season.shards import runs

DEPLOYMENT = ("--timezone", "+02:00", "--lat", "-19.6", "--lon", "13.9")
CARDS = {"etosha-01": 7, "etosha-02": 5, "etosha-03": 3}
CHUNK = 1  # one image per chunk: every chunk after the first needs the card's sampler state to match run


def make_cards(root: Path, sizes: dict[str, int]) -> Path:
    """Card folders of the packaged photos copied under new names (each card its own mix)."""
    photos = sample_photos()
    for n, (name, count) in enumerate(sizes.items()):
        folder = root / name / "DCIM" / "100MEDIA"
        folder.mkdir(parents=True)
        for i in range(count):
            shutil.copy2(photos[(i + 3 * n) % len(photos)], folder / f"IMG_{i:04d}.JPG")
    return root


def cli(*args: str, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """The trapedge CLI in a subprocess."""
    proc = subprocess.run([sys.executable, "-m", "trapedge.runtime.cli", *args], capture_output=True, text=True,
                          env=env or dict(os.environ))
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def card_outputs(out: Path) -> dict:
    """What must match between `run` and `batch`: predictions, images.csv, MegaDetector images, results.csv."""
    return {"predictions": json.loads((out / "predictions.json").read_text())["predictions"],
            "images.csv": (out / "images.csv").read_text(),
            "megadetector": json.loads((out / "megadetector.json").read_text())["images"],
            "results.csv": (out / "results.csv").read_text()}


def assert_same_as_run(season: Path, reference: Path, names) -> None:
    """Every card of the season equals its `trapedge run` output, file by file, and no image is lost or doubled."""
    for name in names:
        got, want = card_outputs(season / name), card_outputs(reference / name)
        for key in want:
            assert got[key] == want[key], f"{name}: {key} differs from trapedge run"
        keys = [p["filepath"] for p in got["predictions"]]
        assert len(keys) == len(set(keys)) == CARDS.get(name, len(keys))


ROW = r'<tr data-label="([^"]+)">.*?<td class="n detections">(\d+)</td>'


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return build_demo_bundle(tmp_path_factory.mktemp("bundle") / "demo")


@pytest.fixture(scope="module")
def cards(tmp_path_factory) -> Path:
    return make_cards(tmp_path_factory.mktemp("cards"), CARDS)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, bundle: Path, cards: Path) -> Path:
    """`trapedge run` on each card, the outputs batch must reproduce."""
    root = tmp_path_factory.mktemp("reference")
    for name in CARDS:
        cli("run", str(cards / name), "--bundle", str(bundle), "--out", str(root / name), "--deployment-id", name,
            *DEPLOYMENT, "-q")
    return root


def test_batch_equals_run_per_card_and_merges_the_season(tmp_path: Path, bundle: Path, cards: Path,
                                                        reference: Path) -> None:
    season = tmp_path / "season"
    cli("batch", str(cards), "--bundle", str(bundle), "--out", str(season), "--chunk", str(CHUNK), "--parallel", "1",
        *DEPLOYMENT, "-q")
    assert_same_as_run(season, reference, CARDS)
    assert [r[0] for r in runs(season / "etosha-01")] == list(range(CARDS["etosha-01"]))
    assert not list((season / "etosha-01" / ".shards").glob("chunk-*.sqlite")), "shards left after the card"
    with open(season / "summary.csv", newline="") as fp:
        rows = {r["deployment_id"]: r for r in csv.DictReader(fp)}
    assert set(rows) == set(CARDS) and {r["status"] for r in rows.values()} == {"done"}
    for name, count in CARDS.items():
        predictions = card_outputs(reference / name)["predictions"]
        assert int(rows[name]["images"]) == count
        assert int(rows[name]["detections"]) == sum(len(p.get("detections") or []) for p in predictions)
        assert rows[name]["labels"]
    page = (season / "report.html").read_text()
    assert f'<b id="media-count">{sum(CARDS.values())}</b>' in page and "trapedge season report" in page
    species: Counter = Counter()
    for name in CARDS:
        own = (reference / name / "report.html").read_text()
        species.update({k: int(v) for k, v in re.findall(ROW, own)})
    assert {k: int(v) for k, v in re.findall(ROW, page)} == dict(species) and species
    folders = re.findall(r'<table id="folders-table">.*?</table>', page, re.S)[0]
    assert all(f"<td>{name}/" in folders for name in CARDS)
    assert page.count('<img src="data:image/jpeg;base64,') >= 3
    md = json.loads((season / "megadetector.json").read_text())
    assert len(md["images"]) == sum(CARDS.values())
    assert {i["file"].split("/")[0] for i in md["images"]} == set(CARDS)
    cats = md["classification_category_descriptions"]
    for name in CARDS:
        own = json.loads((reference / name / "megadetector.json").read_text())
        labels = [own["classification_category_descriptions"][c[0]] for i in own["images"]
                  for d in i["detections"] or [] for c in d.get("classifications", [])]
        merged = [cats[c[0]] for i in md["images"] if i["file"].startswith(name + "/")
                  for d in i["detections"] or [] for c in d.get("classifications", [])]
        assert merged == labels
    errors, _ = _validate(season / "camtrap-dp" / "datapackage.json")
    assert errors == []
    with open(season / "camtrap-dp" / "deployments.csv", newline="") as fp:
        assert [r["deploymentID"] for r in csv.DictReader(fp)] == list(CARDS)
    with open(season / "camtrap-dp" / "media.csv", newline="") as fp:
        assert len(list(csv.DictReader(fp))) == sum(CARDS.values())


def test_batch_in_parallel_processes_equals_run(tmp_path: Path, bundle: Path, cards: Path, reference: Path) -> None:
    season = tmp_path / "season"
    cli("batch", str(cards), "--bundle", str(bundle), "--out", str(season), "--chunk", "2", "--parallel", "2",
        *DEPLOYMENT, "-q")
    assert_same_as_run(season, reference, CARDS)
    pids = {pid for name in CARDS for _, _, pid in runs(season / name)}
    assert len(pids) == 2, "both worker processes ran chunks"


def test_driver_killed_mid_season_resumes_only_unfinished_chunks(tmp_path: Path, bundle: Path, cards: Path,
                                                                 reference: Path) -> None:
    season, size = tmp_path / "season", 3
    args = ("batch", str(cards), "--bundle", str(bundle), "--out", str(season), "--chunk", str(size),
            "--parallel", "1", *DEPLOYMENT, "-q")
    killed = cli(*args, env=dict(os.environ, TRAPEDGE_KILL_AT="merge:2"), check=False)
    assert killed.returncode == -9, killed.stderr[-2000:]
    before = runs(season / "etosha-01")
    assert [r[0] for r in before] == [0, 1]
    assert not (season / "summary.csv").exists()
    cli(*args)
    assert [r[0] for r in runs(season / "etosha-01")] == [0, 1, 2], "a finished chunk was redone"
    for name in CARDS:
        chunks = -(-CARDS[name] // size)
        assert sorted(r[0] for r in runs(season / name)) == list(range(chunks))
    assert_same_as_run(season, reference, CARDS)
    again = cli(*args[:-1])
    assert "0 chunks run" in again.stderr, again.stderr


def test_an_unreadable_card_fails_alone_with_its_reason(tmp_path: Path, bundle: Path, cards: Path,
                                                        reference: Path) -> None:
    (tmp_path / "not-a-card.txt").write_text("x")
    listing = tmp_path / "season.csv"
    listing.write_text("card,deployment_id,timezone,lat,lon\n"
                       f"{cards / 'etosha-02'},etosha-02,+02:00,-19.6,13.9\n"
                       "missing-card,gone,+02:00,-19.6,13.9\n"
                       "not-a-card.txt,file,,,\n")
    season = tmp_path / "season"
    proc = cli("batch", str(listing), "--bundle", str(bundle), "--out", str(season), "--chunk", str(CHUNK),
               "--parallel", "1")
    assert "failed: gone:" in proc.stderr and "failed: file:" in proc.stderr
    with open(season / "summary.csv", newline="") as fp:
        rows = {r["deployment_id"]: r for r in csv.DictReader(fp)}
    assert rows["etosha-02"]["status"] == "done"
    assert rows["gone"]["status"] == "failed" and "missing-card: not a folder" in rows["gone"]["reason"]
    assert rows["file"]["status"] == "failed" and "not-a-card.txt: not a folder" in rows["file"]["reason"]
    assert_same_as_run(season, reference, ["etosha-02"])
    everything_missing = tmp_path / "none.csv"
    everything_missing.write_text("card\nnowhere\n")
    proc = cli("batch", str(everything_missing), "--bundle", str(bundle), "--out", str(tmp_path / "s2"),
               check=False)
    assert proc.returncode == 2 and proc.stderr.splitlines()[-1].startswith("Error: no card finished"), proc.stderr


def test_cards_csv_is_checked(tmp_path: Path, bundle: Path) -> None:
    listing = tmp_path / "season.csv"
    listing.write_text("card,deployment_id,camera\na,x,1\n")
    proc = cli("batch", str(listing), "--bundle", str(bundle), "--out", str(tmp_path / "s"), check=False)
    assert proc.returncode == 2 and "unknown: camera" in proc.stderr and proc.stderr.count("\n") == 1
    listing.write_text("card,deployment_id\na,x\nb,x\n")
    proc = cli("batch", str(listing), "--bundle", str(bundle), "--out", str(tmp_path / "s"), check=False)
    assert proc.returncode == 2 and "'x' appears twice" in proc.stderr


def no_ray_env(tmp_path: Path) -> dict:
    """An environment in which `import ray` fails, as on a field station without the cluster extra."""
    lean = tmp_path / "noray"
    lean.mkdir()
    (lean / "sitecustomize.py").write_text(textwrap.dedent("""
        import sys

        class _Blocker:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "ray":
                    raise ImportError(f"{name} is blocked in this test")
                return None

        sys.meta_path.insert(0, _Blocker())
        """))
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(lean), os.environ.get("PYTHONPATH", "")]))


def test_cli_imports_without_ray_and_cluster_says_how_to_install(tmp_path: Path, bundle: Path,
                                                                 cards: Path) -> None:
    env = no_ray_env(tmp_path)
    probe = subprocess.run([sys.executable, "-c", "import sys, trapedge.runtime.cli, trapedge.runtime.season.driver\n"
                            "assert not [m for m in sys.modules if m.split('.')[0] == 'ray']\n"
                            "try:\n    import ray\nexcept ImportError:\n    print('blocked')\n"],
                           capture_output=True, text=True, env=env)
    assert probe.returncode == 0 and probe.stdout.strip() == "blocked", probe.stderr
    proc = cli("batch", str(cards), "--bundle", str(bundle), "--out", str(tmp_path / "s"), "--cluster", "auto",
               env=env, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "Error: --cluster needs Ray: pip install 'trapedge[cluster]'"
