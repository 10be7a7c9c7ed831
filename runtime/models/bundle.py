"""Reads and validates an artifact bundle: manifest, file hashes, shapes and labels; refuses any mismatch."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

__all__ = ["Bundle", "BundleError", "ModelSpec", "SCHEMA_VERSION", "sha256_file"]

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
_REQUIRED_FILES = ("labels", "taxonomy", "geofence")


class BundleError(ValueError):
    """A bundle that cannot be trusted; the message is one line naming the file and the problem."""


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fp:
        while block := fp.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class ModelSpec:
    """One model of the bundle as the manifest describes it."""

    name: str
    path: Path
    inputs: list[dict]
    outputs: list[dict]
    preprocessing: dict
    raw: dict

    def output_dim(self, output: str) -> Optional[int]:
        """Declared last dimension of a named output, if fixed."""
        for spec in self.outputs:
            if spec["name"] == output:
                last = spec["shape"][-1]
                return last if isinstance(last, int) else None
        return None


class Bundle:
    """A validated trapedge artifact bundle (see artifacts/README.md for the format)."""

    def __init__(self, root: Path, manifest: dict, labels: list[str]) -> None:
        self.root = root
        self.manifest = manifest
        self.labels = labels

    @classmethod
    def load(cls, root: Path, verify_hashes: bool = True) -> Bundle:
        """Loads a bundle folder, checking every file the manifest names against its sha256."""
        root = Path(root)
        manifest_path = root / MANIFEST
        if not manifest_path.is_file():
            raise BundleError(f"{manifest_path}: no manifest.json, so {root} is not a trapedge bundle")
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BundleError(f"{manifest_path}: not valid JSON ({e})") from e
        version = manifest.get("schema_version")
        if version != SCHEMA_VERSION:
            raise BundleError(
                f"{manifest_path}: schema_version {version!r} is not supported (expected {SCHEMA_VERSION})"
            )
        for key in ("models", "files"):
            if not isinstance(manifest.get(key), dict):
                raise BundleError(f"{manifest_path}: missing '{key}' section")
        for name in _REQUIRED_FILES:
            if name not in manifest["files"]:
                raise BundleError(f"{manifest_path}: files.{name} is missing")
        entries = [(f"files.{k}", v) for k, v in manifest["files"].items()]
        entries += [(f"models.{k}", v) for k, v in manifest["models"].items()]
        for where, entry in entries:
            cls._check_file(root, where, entry, verify_hashes)
        labels_path = root / manifest["files"]["labels"]["file"]
        labels = [line.strip() for line in labels_path.read_text(encoding="utf-8").splitlines()]
        labels = [label for label in labels if label]
        bad = next((label for label in labels if label.count(";") != 6), None)
        if bad is not None:
            raise BundleError(f"{labels_path}: label is not a 7-field SpeciesNet label: {bad!r}")
        bundle = cls(root, manifest, labels)
        if "classifier" in manifest["models"]:
            declared = bundle.model("classifier").output_dim("logits")
            if declared != len(labels):
                raise BundleError(
                    f"{labels_path}: {len(labels)} labels but the classifier has {declared} outputs"
                )
        return bundle

    @staticmethod
    def _check_file(root: Path, where: str, entry: Any, verify_hashes: bool) -> None:
        if not isinstance(entry, dict) or "file" not in entry or "sha256" not in entry:
            raise BundleError(f"{root / MANIFEST}: {where} needs 'file' and 'sha256'")
        path = root / entry["file"]
        if not path.is_file():
            raise BundleError(f"{path}: missing from the bundle ({where})")
        if verify_hashes and sha256_file(path) != entry["sha256"]:
            raise BundleError(f"{path}: sha256 does not match the manifest ({where}); the file changed")

    def has_model(self, name: str) -> bool:
        """True when the manifest lists a model of this name."""
        return name in self.manifest["models"]

    def model(self, name: str) -> ModelSpec:
        """The manifest entry of a model, with its absolute path."""
        try:
            raw = self.manifest["models"][name]
        except KeyError:
            raise BundleError(f"{self.root / MANIFEST}: no model '{name}' in this bundle") from None
        return ModelSpec(
            name=name,
            path=self.root / raw["file"],
            inputs=raw.get("inputs", []),
            outputs=raw.get("outputs", []),
            preprocessing=raw.get("preprocessing", {}),
            raw=raw,
        )

    def file(self, name: str) -> Path:
        """Absolute path of a named data file (labels, taxonomy, geofence, ...)."""
        return self.root / self.manifest["files"][name]["file"]

    @property
    def model_version(self) -> str:
        """SpeciesNet model version the bundle was exported from."""
        return str(self.manifest.get("speciesnet", {}).get("model_version", "unknown"))

    @property
    def data_version(self) -> int:
        """Version of the geofence and taxonomy data (`trapedge bundle update`); 0 if never updated."""
        data = self.manifest.get("data")
        return int(data.get("version", 0)) if isinstance(data, dict) else 0
