"""Validates and applies geofence and taxonomy updates to a bundle, keeping history for rollback.

SpeciesNet releases new geofence and taxonomy files without new weights. An update here is crash-safe:
the new files are written under new names (`geofence.v3.json`), the previous files and manifest are
copied to `B/.history/<previous version>/`, and only then is `manifest.json` replaced atomically, so a
power cut at any point leaves a bundle whose manifest names files that exist with the hashes it states.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional, Union

from .bundle import MANIFEST, Bundle, BundleError, sha256_file
from ..speciesnet.ensemble import load_geofence, load_taxonomy
from ..speciesnet.ensemble.taxonomy import get_full_class_string
from ..faults import checkpoint
from ..atomic import atomic_write_text

__all__ = [
    "DATA_FILES",
    "HISTORY",
    "KEEP_HISTORY",
    "BundleUpdateError",
    "apply_update",
    "data_version",
    "rollback",
    "validate_geofence",
    "validate_taxonomy",
]

DATA_FILES = ("taxonomy", "geofence")
HISTORY = ".history"
KEEP_HISTORY = 5
LAST_VERSION = "last_version"  # in .history: the highest version ever issued, so rollback never reuses one
_SHOWN = 5
_RULES = ("allow", "block")
_VERSIONED = re.compile(r"\.v\d+$")

PathLike = Union[str, Path]


class BundleUpdateError(BundleError):
    """An update or rollback refused; the message is one line naming the file and the problem."""


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _listing(items: list[str]) -> str:
    shown = ", ".join(repr(item) for item in items[:_SHOWN])
    more = f" (+{len(items) - _SHOWN} more)" if len(items) > _SHOWN else ""
    return f"{shown}{more}"


def data_version(manifest: dict) -> int:
    """The data (geofence and taxonomy) version a manifest records; 0 when it was never updated."""
    data = manifest.get("data")
    return int(data.get("version", 0)) if isinstance(data, dict) else 0


def validate_taxonomy(path: PathLike, labels: list[str]) -> dict[str, str]:
    """Parses a SpeciesNet taxonomy and checks it holds every classifier label; returns its map."""
    path = Path(path)
    try:
        taxonomy_map = load_taxonomy(path)
    except OSError as e:
        raise BundleUpdateError(f"{path}: cannot read the taxonomy ({_one_line(e.strerror or e)})") from e
    except ValueError as e:  # a line that is not 7 fields, or not UTF-8
        raise BundleUpdateError(f"{path}: not a SpeciesNet taxonomy ({_one_line(e)})") from e
    # SpeciesNet's taxonomy_release.txt is the classifier's labels plus their parent taxa, so extra
    # entries are expected; a label the taxonomy lacks would silently lose its roll-up and geofence.
    missing = [label for label in labels if get_full_class_string(label) not in taxonomy_map]
    if missing:
        raise BundleUpdateError(
            f"{path}: {len(missing)} classifier label(s) missing from the taxonomy: {_listing(missing)}"
        )
    return taxonomy_map


def validate_geofence(path: PathLike, taxonomy_map: dict[str, str],
                      taxonomy_path: Optional[PathLike] = None) -> dict:
    """Parses a SpeciesNet geofence and checks its rules and that every taxon is in the taxonomy."""
    path = Path(path)
    try:
        geofence = load_geofence(path)
    except OSError as e:
        raise BundleUpdateError(f"{path}: cannot read the geofence ({_one_line(e.strerror or e)})") from e
    except ValueError as e:  # not JSON, not UTF-8, or not an object
        raise BundleUpdateError(f"{path}: not a SpeciesNet geofence ({_one_line(e)})") from e
    for taxon, rules in geofence.items():
        where = f"{path}: taxon {taxon!r}"
        if taxon.count(";") != 4:
            raise BundleUpdateError(f"{where} is not a 5-field class;order;family;genus;species key")
        if not isinstance(rules, dict) or not set(rules) <= set(_RULES):
            raise BundleUpdateError(f"{where} must map to an object with only 'allow' and 'block' rules")
        for kind, countries in rules.items():
            if not isinstance(countries, dict):
                raise BundleUpdateError(f"{where}: '{kind}' must map ISO3 country codes to admin1 lists")
            for country, regions in countries.items():
                if len(country) != 3 or not country.isalpha() or not country.isupper():
                    raise BundleUpdateError(
                        f"{where}: '{kind}' country {country!r} is not a 3-letter uppercase ISO3 code"
                    )
                if not isinstance(regions, list) or not all(isinstance(r, str) for r in regions):
                    raise BundleUpdateError(f"{where}: '{kind}' {country} must list admin1 codes as strings")
    unknown = [taxon for taxon in geofence if taxon not in taxonomy_map]
    if unknown:
        against = f" {taxonomy_path}" if taxonomy_path else ""
        raise BundleUpdateError(
            f"{path}: {len(unknown)} geofence taxon key(s) not in the taxonomy{against}: {_listing(unknown)}"
        )
    return geofence


def _read_manifest(path: Path) -> dict:
    try:
        manifest = json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise BundleUpdateError(f"{path}: not valid JSON ({_one_line(e)})") from e
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not all(isinstance(files.get(n), dict) and "file" in files[n]
                                              and "sha256" in files[n] for n in DATA_FILES):
        raise BundleUpdateError(f"{path}: files.taxonomy and files.geofence need 'file' and 'sha256'")
    return manifest


def _read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except OSError as e:
        raise BundleUpdateError(f"{path}: cannot read ({_one_line(e.strerror or e)})") from e
    except UnicodeDecodeError as e:
        raise BundleUpdateError(f"{path}: not UTF-8 text ({_one_line(e)})") from e


def _write(path: Path, text: str, like: Optional[Path] = None) -> None:
    """atomic_write_text, then the permissions of `like` (its temp files are created 0600)."""
    mode = (like if like is not None and like.exists() else path.parent).stat().st_mode & 0o666
    atomic_write_text(path, text)
    os.chmod(path, mode)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _history_versions(root: Path) -> list[int]:
    folder = root / HISTORY
    if not folder.is_dir():
        return []
    return sorted(int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit())


def _last_issued(root: Path) -> int:
    try:
        return int((root / HISTORY / LAST_VERSION).read_text(encoding="utf-8").strip())
    except (OSError, ValueError):
        return 0


def _versioned_name(name: str, version: int) -> str:
    path = Path(name)
    stem = _VERSIONED.sub("", path.stem)
    return str(path.with_name(f"{stem}.v{version}{path.suffix}"))


def _referenced(manifest: dict) -> set[str]:
    return {entry["file"] for section in ("files", "models") for entry in manifest.get(section, {}).values()
            if isinstance(entry, dict) and "file" in entry}


def _sweep(root: Path, manifest: dict) -> None:
    """Deletes data files of other versions the manifest no longer names (left by a crash or an update)."""
    keep = _referenced(manifest)
    for name in DATA_FILES:
        current = Path(manifest["files"][name]["file"])
        stem, suffix = _VERSIONED.sub("", current.stem), current.suffix
        # versioned copies, and temp files atomic_write_text left behind if killed mid-write
        pattern = re.compile(rf"^\.?{re.escape(stem)}(\.v\d+)?{re.escape(suffix)}(\..+\.tmp)?$")
        folder = root / current.parent
        for path in folder.iterdir():
            rel = str(path.relative_to(root))
            if path.is_file() and pattern.match(path.name) and rel not in keep:
                path.unlink()


def _prune_history(root: Path, below: int) -> None:
    """Drops history entries at or above the current version (left by a crash) and all but the last few."""
    versions = _history_versions(root)
    stale = [v for v in versions if v >= below]
    kept = [v for v in versions if v < below]
    for version in stale + kept[:-KEEP_HISTORY]:
        shutil.rmtree(root / HISTORY / str(version), ignore_errors=True)


def _save_history(root: Path, manifest_text: str, manifest: dict, version: int) -> None:
    """Copies the current data files and manifest to .history/<version>/, made visible by one rename."""
    history = root / HISTORY
    history.mkdir(exist_ok=True)
    staging = history / f".tmp-{version}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    for name in DATA_FILES:
        rel = manifest["files"][name]["file"]
        target = staging / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        _write(target, _read_text(root / rel), like=root / rel)
    _write(staging / MANIFEST, manifest_text, like=root / MANIFEST)
    final = history / str(version)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(staging, final)
    _fsync_dir(history)


def apply_update(root: PathLike, geofence: Optional[PathLike] = None,
                 taxonomy: Optional[PathLike] = None) -> int:
    """Validates new geofence and/or taxonomy files and installs them; returns the new data version."""
    if geofence is None and taxonomy is None:
        raise BundleUpdateError("bundle update: give --geofence FILE, --taxonomy FILE or both")
    bundle = Bundle.load(Path(root))
    root = bundle.root
    manifest_path = root / MANIFEST
    old_text = _read_text(manifest_path)
    manifest = json.loads(old_text)
    taxonomy_path = Path(taxonomy) if taxonomy is not None else bundle.file("taxonomy")
    geofence_path = Path(geofence) if geofence is not None else bundle.file("geofence")
    taxonomy_map = validate_taxonomy(taxonomy_path, bundle.labels)
    validate_geofence(geofence_path, taxonomy_map, taxonomy_path)
    new_texts = {name: _read_text(path) for name, path in (("taxonomy", taxonomy_path), ("geofence", geofence_path))}
    changed = {name: text for name, text in new_texts.items()
               if text.encode("utf-8") != (root / manifest["files"][name]["file"]).read_bytes()}
    current = data_version(manifest)
    if not changed:
        return current
    version = max([current, _last_issued(root)] + _history_versions(root)) + 1

    _prune_history(root, below=current)
    _save_history(root, old_text, manifest, current)
    _write(root / HISTORY / LAST_VERSION, f"{version}\n", like=manifest_path)
    checkpoint("bundle-update")  # 1: history saved, bundle untouched
    for name, text in changed.items():
        rel = _versioned_name(manifest["files"][name]["file"], version)
        _write(root / rel, text, like=root / manifest["files"][name]["file"])
        manifest["files"][name] = dict(manifest["files"][name], file=rel, sha256=sha256_file(root / rel))
    checkpoint("bundle-update")  # 2: new files written, old manifest still names the old ones
    manifest["data"] = {
        "version": version,
        "updated": datetime.now(timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z"),
        **{f"{name}_sha256": manifest["files"][name]["sha256"] for name in DATA_FILES},
    }
    _write(manifest_path, json.dumps(manifest, indent=2) + "\n", like=manifest_path)
    checkpoint("bundle-update")  # 3: new manifest in place, previous files not yet swept
    _sweep(root, manifest)
    _prune_history(root, below=version)
    return version


def rollback(root: PathLike) -> int:
    """Restores the previous data files and manifest from .history; returns the restored version."""
    root = Path(root)
    manifest_path = root / MANIFEST
    manifest = _read_manifest(manifest_path)
    current = data_version(manifest)
    earlier = [v for v in _history_versions(root) if v < current]
    if not earlier:
        raise BundleUpdateError(f"{root / HISTORY}: no earlier data version to roll back to")
    entry = root / HISTORY / str(earlier[-1])
    old_text = _read_text(entry / MANIFEST)
    old = _read_manifest(entry / MANIFEST)
    texts = {}
    for name in DATA_FILES:
        entry_file = entry / old["files"][name]["file"]
        texts[name] = _read_text(entry_file)
        if sha256_file(entry_file) != old["files"][name]["sha256"]:
            raise BundleUpdateError(f"{entry_file}: sha256 does not match {entry / MANIFEST}; history damaged")
    # Only the data entries go back: models added since (fit, quantize) stay in the manifest.
    restored = json.loads(json.dumps(manifest))
    for name in DATA_FILES:
        restored["files"][name] = old["files"][name]
    restored.pop("data", None)
    if "data" in old:
        restored["data"] = old["data"]
    for name in DATA_FILES:
        target = root / old["files"][name]["file"]
        if not target.is_file() or sha256_file(target) != old["files"][name]["sha256"]:
            _write(target, texts[name], like=entry / old["files"][name]["file"])
    checkpoint("bundle-rollback")  # 1: old files back, the newer manifest still names the newer ones
    _write(manifest_path, old_text if restored == old else json.dumps(restored, indent=2) + "\n",
           like=manifest_path)
    checkpoint("bundle-rollback")  # 2: old manifest back, newer files and the history entry not yet removed
    _sweep(root, restored)
    shutil.rmtree(entry)
    _prune_history(root, below=earlier[-1])
    return earlier[-1]
