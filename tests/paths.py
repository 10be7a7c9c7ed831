"""Where the tests find the repository and the shared real photos."""

from pathlib import Path

TESTS = Path(__file__).parent
REPO = TESTS.parent
MEDIA = REPO.parent / "shared" / "data" / "camtrap-dp-1.0.2" / "example" / "media"
