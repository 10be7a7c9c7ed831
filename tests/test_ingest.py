"""Scanning a dump and decoding what is on it, including the bad-input corpus."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from badinput import make_bad_corpus
from trapedge.runtime.card.ingest import decode, scan


def test_scan_keys_by_relative_path_and_skips_hidden(tmp_path: Path, photos) -> None:
    for folder in ("100MEDIA", "101MEDIA", ".Trashes", "DCIM/.thumbs"):
        (tmp_path / folder).mkdir(parents=True)
    shutil.copy(photos[0], tmp_path / "100MEDIA" / "IMG_0001.JPG")
    shutil.copy(photos[1], tmp_path / "101MEDIA" / "IMG_0001.JPG")
    shutil.copy(photos[2], tmp_path / "100MEDIA" / "._IMG_0001.JPG")
    shutil.copy(photos[2], tmp_path / "100MEDIA" / ".hidden.jpg")
    shutil.copy(photos[2], tmp_path / ".Trashes" / "IMG_9.JPG")
    shutil.copy(photos[2], tmp_path / "DCIM" / ".thumbs" / "t.jpg")
    (tmp_path / "100MEDIA" / "notes.txt").write_text("not an image")
    shutil.copy(photos[3], tmp_path / "DCIM" / "a.jpeg")
    keys = [r.key for r in scan(tmp_path)]
    assert keys == ["100MEDIA/IMG_0001.JPG", "101MEDIA/IMG_0001.JPG", "DCIM/a.jpeg"]


def test_scan_survives_symlink_loops(tmp_path: Path, photos) -> None:
    (tmp_path / "a").mkdir()
    shutil.copy(photos[0], tmp_path / "a" / "x.jpg")
    (tmp_path / "a" / "loop").symlink_to(tmp_path, target_is_directory=True)
    assert [r.key for r in scan(tmp_path)] == ["a/x.jpg"]


def test_bad_corpus_decodes_or_fails_cleanly(tmp_path: Path, photos) -> None:
    expected = make_bad_corpus(tmp_path, photos[0])
    results = {r.key: decode(r) for r in scan(tmp_path)}
    assert set(results) == set(expected)
    for key, ok in expected.items():
        result = results[key]
        assert result.ok == ok, (key, result.error)
        if ok:
            assert result.pixels.ndim == 3 and result.pixels.shape[2] == 3 and result.pixels.dtype == np.uint8
        else:
            assert result.error and "\n" not in result.error
    assert "too large" in results["huge_20000x20000.png"].error
    assert results["truncated.jpg"].warnings
    assert results["rotated.jpg"].pixels.shape[:2] == (640, 450)
    assert results["rotated.jpg"].captured == "2024-05-06T07:08:09"


def test_decoded_pixels_equal_speciesnet_loader(tmp_path: Path, photos) -> None:
    sn_utils = pytest.importorskip("speciesnet.utils")
    expected = make_bad_corpus(tmp_path, photos[0])
    for record in scan(tmp_path):
        ours = decode(record)
        theirs = sn_utils.load_rgb_image(str(record.path))
        if theirs is None:
            assert not ours.ok, record.key
            continue
        if not expected[record.key]:
            continue
        np.testing.assert_array_equal(ours.pixels, np.asarray(theirs), err_msg=record.key)


def test_capture_time_from_real_exif(photos) -> None:
    record = next(scan(photos[0].parent))
    assert decode(record).captured == "2021-04-11T20:43:09"


def test_file_vanishing_after_the_scan_is_a_recorded_failure(tmp_path: Path, photos) -> None:
    shutil.copy(photos[0], tmp_path / "a.JPG")
    shutil.copy(photos[1], tmp_path / "b.JPG")
    records = list(scan(tmp_path))
    (tmp_path / "a.JPG").unlink()  # the card was pulled, or the file deleted, mid-run
    results = [decode(r) for r in records]
    assert not results[0].ok and "FileNotFoundError" in results[0].error
    assert results[1].ok
