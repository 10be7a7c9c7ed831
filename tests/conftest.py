"""Shared fixtures (the real camera-trap photos packaged in runtime/sample_data, paths) and the CI skip policy.

Every fixture comes from inside the repository (see tests/paths.py and tests/data/README.md). Under CI
(environment variable CI=true) a skipped test fails the run unless it is marked `gpu` or `tensorrt`: a
missing package or file must not turn into a silently green run.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from paths import MEDIA  # noqa: E402

CI_EXEMPT_MARKERS = ("gpu", "tensorrt")


def under_ci() -> bool:
    """True when the environment variable CI is `true` (as GitHub Actions, GitLab CI and `.ci/run` set it)."""
    return os.environ.get("CI", "").strip().lower() == "true"


def _exempt(node: pytest.Item | pytest.Collector) -> bool:
    return any(node.get_closest_marker(name) is not None for name in CI_EXEMPT_MARKERS)


def _skip_reason(report: pytest.TestReport | pytest.CollectReport) -> str:
    longrepr = report.longrepr
    reason = str(longrepr[2]) if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
    return reason.removeprefix("Skipped: ")


class CIPolicy:
    """Under CI=true, a skip of a test not marked gpu or tensorrt fails the run.

    A test that skips (skip marker, fixture or body) is reported FAILED with the one-line reason
    "skipped under CI: <reason>". A whole module skipped at collection (e.g. a module-level importorskip) has
    no test to fail: it is listed in a "skipped under CI" section and the run's exit status is set to 1.
    """

    def __init__(self) -> None:
        self.collection_skips: list[tuple[str, str]] = []

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(self, item: pytest.Item, call: pytest.CallInfo):
        report = yield
        if report.skipped and not hasattr(report, "wasxfail") and under_ci() and not _exempt(item):
            report.outcome = "failed"
            report.longrepr = f"skipped under CI: {_skip_reason(report)}"
        return report

    @pytest.hookimpl(wrapper=True)
    def pytest_make_collect_report(self, collector: pytest.Collector):
        report = yield
        if report.skipped and under_ci() and not _exempt(collector):
            self.collection_skips.append((report.nodeid, _skip_reason(report)))
        return report

    def pytest_terminal_summary(self, terminalreporter) -> None:
        if self.collection_skips:
            terminalreporter.section("skipped under CI (mark gpu or tensorrt, or fix the environment)", red=True)
            for nodeid, reason in self.collection_skips:
                terminalreporter.line(f"FAILED {nodeid} - skipped under CI: {reason}", red=True)

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if self.collection_skips and session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_configure(config: pytest.Config) -> None:
    config.pluginmanager.register(CIPolicy(), "trapedge-ci-policy")


@pytest.fixture(scope="session")
def photos() -> list[Path]:
    """The ten real Reconyx photos (2048x1440, EXIF) packaged in runtime/sample_data."""
    found = sorted(MEDIA.glob("*.JPG"))
    if not found:
        pytest.skip(f"camera-trap photos not found at {MEDIA}")
    return found


from fixtures_models import bundle, bundle_copy, model_folder  # noqa: E402,F401  (shared fixtures)


@pytest.fixture(autouse=True)
def _fresh_log_handlers():
    """A run logs to OUT/trapedge.log; an in-process run's handler must not outlive its test."""
    import logging

    logger = logging.getLogger("trapedge")
    before = list(logger.handlers)
    yield
    for handler in logger.handlers[len(before):]:
        handler.close()
    logger.handlers[:] = before
