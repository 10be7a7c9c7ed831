"""Kill -9 at several points and resume: the final outputs equal an uninterrupted run's; re-dumped cards."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fixtures_models import copy_photos
from test_end_to_end import lean_env


def _run(dump: Path, bundle: Path, out: Path, kill_at: str | None = None) -> subprocess.CompletedProcess:
    env = lean_env()
    env.pop("TRAPEDGE_KILL_AT", None)
    if kill_at:
        env["TRAPEDGE_KILL_AT"] = kill_at
    return subprocess.run([sys.executable, "-m", "trapedge.runtime.cli", "run", str(dump), "--bundle", str(bundle),
                           "--out", str(out), "--device", "cpu", "--country", "USA"],
                          capture_output=True, text=True, env=env)


def _outputs(out: Path) -> tuple[list, list]:
    predictions = json.loads((out / "predictions.json").read_text())["predictions"]
    with open(out / "images.csv", newline="") as fp:
        rows = list(csv.DictReader(fp))
    return predictions, rows


@pytest.fixture(scope="module")
def card(tmp_path_factory, photos) -> Path:
    root = tmp_path_factory.mktemp("card")
    copy_photos(photos, root / "100MEDIA")
    copy_photos(photos, root / "101MEDIA")
    return root


@pytest.fixture(scope="module")
def reference(card: Path, bundle: Path, tmp_path_factory) -> tuple[list, list]:
    out = tmp_path_factory.mktemp("reference")
    proc = _run(card, bundle, out)
    assert proc.returncode == 0, proc.stderr
    return _outputs(out)


@pytest.mark.parametrize("kill_at", ["detect:6", "commit:4", "commit:15", "export:1", "export:2"])
def test_killed_run_resumes_to_the_same_result(kill_at: str, card: Path, bundle: Path, reference, tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = _run(card, bundle, out, kill_at)
    assert first.returncode == -9, first.stderr[-2000:]
    if kill_at.startswith("export"):
        assert not (out / "predictions.json").exists() or json.loads((out / "predictions.json").read_text())
    second = _run(card, bundle, out)
    assert second.returncode == 0, second.stderr[-2000:]
    predictions, rows = _outputs(out)
    assert predictions == reference[0]
    assert rows == reference[1]
    assert len({p["filepath"] for p in predictions}) == 20
    assert not list(out.glob(".*.tmp"))
    if not kill_at.startswith("detect"):
        assert "already done" in second.stderr


def test_redumped_card_adds_only_new_files(card: Path, bundle: Path, photos, tmp_path: Path) -> None:
    dump = tmp_path / "card"
    shutil.copytree(card, dump)
    out = tmp_path / "out"
    assert _run(dump, bundle, out).returncode == 0
    copy_photos(photos[:4], dump / "102MEDIA")
    changed = dump / "100MEDIA" / photos[0].name
    os.utime(changed, ns=(changed.stat().st_atime_ns, changed.stat().st_mtime_ns + 10**9))
    (dump / "101MEDIA" / photos[1].name).unlink()
    second = _run(dump, bundle, out)
    assert second.returncode == 0
    assert "18 of 23 images already done, 1 changed, 1 vanished" in " ".join(second.stderr.split())
    predictions, rows = _outputs(out)
    status = {r["key"]: r["status"] for r in rows}
    assert status[f"101MEDIA/{photos[1].name}"] == "vanished"  # reported, not dropped
    assert len(predictions) == 24 and sum(s == "vanished" for s in status.values()) == 1
    fresh = tmp_path / "fresh"
    assert _run(dump, bundle, fresh).returncode == 0
    fresh_predictions, _ = _outputs(fresh)
    kept = [p for p in predictions if not p["filepath"].endswith(f"101MEDIA/{photos[1].name}")]
    assert kept == fresh_predictions


@pytest.fixture()
def small_disk(tmp_path: Path):
    """A 400 KiB tmpfs for OUTDIR (skips where mounting is not allowed)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here to fill a disk")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_full_disk_is_a_clear_error_and_resumable(card: Path, bundle: Path, reference, small_disk: Path) -> None:
    out = small_disk / "out"
    first = _run(card, bundle, out)
    assert first.returncode == 2, first.stderr[-2000:]
    message = first.stderr.strip().splitlines()[-1]
    assert message.startswith(f"Error: {out}: cannot write results") and ("No space left" in message or "disk is full" in message)
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    second = _run(card, bundle, out)
    assert second.returncode == 0, second.stderr[-2000:]
    predictions, rows = _outputs(out)
    assert predictions == reference[0] and rows == reference[1]


def test_read_only_dump_is_fine(card: Path, bundle: Path, reference, tmp_path: Path) -> None:
    dump = tmp_path / "ro"
    shutil.copytree(card, dump)
    subprocess.run(["chmod", "-R", "a-w", str(dump)], check=True)
    try:
        proc = _run(dump, bundle, tmp_path / "out")
    finally:
        subprocess.run(["chmod", "-R", "u+w", str(dump)], check=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    predictions, _ = _outputs(tmp_path / "out")
    assert [p["detections"] for p in predictions] == [p["detections"] for p in reference[0]]
