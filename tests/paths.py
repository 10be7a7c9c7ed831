"""Where the tests find the repository and its fixtures (all inside the repository)."""

from pathlib import Path

TESTS = Path(__file__).parent
REPO = TESTS.parent
# The ten real Reconyx photos of the Camtrap DP 1.0.2 example, packaged with the runtime for `trapedge demo`.
MEDIA = REPO / "runtime" / "sample_data"
# The Camtrap DP 1.0.2 profile, table schemas and example package (no photos): see tests/data/README.md.
CAMTRAP = TESTS / "data" / "camtrap-dp-1.0.2"
