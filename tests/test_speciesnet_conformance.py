"""SpeciesNet's own pure-logic tests, run unchanged against the port with only their imports rewritten, and
the port's choice of boxes to classify against SpeciesNet's own function."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

LEAN = Path(__file__).parent / "lean"
IMPORTS = {
    "speciesnet.constants": "trapedge.runtime.speciesnet.ensemble.vocabulary",
    "speciesnet.taxonomy_utils": "trapedge.runtime.speciesnet.ensemble.taxonomy",
    "speciesnet.geofence_utils": "trapedge.runtime.speciesnet.ensemble.geofence",
    "speciesnet.ensemble_prediction_combiner": "trapedge.runtime.speciesnet.ensemble.combiner",
}
EXPECTED = {"taxonomy_utils_test.py": 2, "geofence_utils_test.py": 4, "ensemble_prediction_combiner_test.py": 11}


def _speciesnet_dir() -> Path:
    spec = importlib.util.find_spec("speciesnet")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the speciesnet package (export extra) is not installed")
    return Path(list(spec.submodule_search_locations)[0])


def rewrite_imports(source: str) -> str:
    """Points `from speciesnet.X import ...` at the port; fails if any speciesnet import is left."""
    for old, new in IMPORTS.items():
        source = re.sub(rf"\bfrom {re.escape(old)} import\b", f"from {new} import", source)
    leftover = re.findall(r"^\s*(?:from|import) speciesnet\b.*$", source, flags=re.M)
    assert not leftover, f"unmapped speciesnet imports: {leftover}"
    return source


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_speciesnet_test_file_passes_against_port(name: str, tmp_path: Path) -> None:
    original = (_speciesnet_dir() / name).read_text(encoding="utf-8")
    rewritten = rewrite_imports(original)
    changed = [a for a, b in zip(original.splitlines(), rewritten.splitlines()) if a != b]
    assert changed and all(line.startswith("from ") for line in changed)
    (tmp_path / name).write_text(rewritten, encoding="utf-8")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(LEAN), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(tmp_path), str(tmp_path / name)],
        capture_output=True, text=True, env=env, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert f"{EXPECTED[name]} passed" in proc.stdout, proc.stdout[-1000:]


def test_select_for_classification_is_speciesnets_rule() -> None:
    import numpy as np

    utils = pytest.importorskip("speciesnet.utils")
    from trapedge.runtime.speciesnet.classifier import select_for_classification

    rng = np.random.default_rng(0)
    for _ in range(300):
        confs = rng.choice([0.05, 0.1, 0.3, 0.5, 0.9], size=int(rng.integers(0, 9)))  # ties on purpose
        detections = [{"conf": float(c)} for c in confs]
        for threshold in (0.0, 0.1, 0.4):
            for most in (None, -1, 0, 1, 2, 5):
                assert select_for_classification(detections, threshold, most) == \
                    utils.select_detections_for_classification(detections, threshold, most)

