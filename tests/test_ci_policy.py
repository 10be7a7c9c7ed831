"""The CI skip policy of tests/conftest.py: under CI=true a skip fails the run unless marked gpu or tensorrt."""

from __future__ import annotations

import pytest

from conftest import CIPolicy

pytest_plugins = ["pytester"]

TESTS = """
import pytest

def test_runs():
    pass

def test_needs_a_missing_package():
    pytest.importorskip("no_such_package_for_trapedge")

@pytest.mark.gpu
def test_needs_a_gpu():
    pytest.skip("no CUDA GPU visible")

@pytest.mark.tensorrt
def test_needs_tensorrt():
    pytest.skip("TensorRT is not installed")

@pytest.mark.skip(reason="not on this machine")
def test_skip_marker():
    pass

@pytest.mark.xfail(reason="known bug")
def test_known_bug():
    assert False
"""

MARKERS = "[pytest]\nmarkers =\n    gpu: needs a CUDA GPU\n    tensorrt: needs TensorRT\n"


@pytest.fixture()
def project(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makeini(MARKERS)
    pytester.makepyfile(test_policy=TESTS)
    return pytester


def test_unmarked_skips_fail_the_run_under_ci(project: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    result = project.runpytest("-ra", plugins=[CIPolicy()])
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.assert_outcomes(passed=1, failed=1, errors=1, skipped=2, xfailed=1)
    # A skip in the test body is a failure, one from a skip marker (evaluated at setup) an error.
    result.stdout.fnmatch_lines(
        ["FAILED test_policy.py::test_needs_a_missing_package - skipped under CI: could not import *no_such_package*"])
    result.stdout.fnmatch_lines(["ERROR test_policy.py::test_skip_marker - skipped under CI: not on this machine"])
    failed = {r.nodeid.split("::")[-1] for r in result.reprec.getreports("pytest_runtest_logreport") if r.failed}
    assert failed == {"test_needs_a_missing_package", "test_skip_marker"}


def test_gpu_and_tensorrt_marked_skips_stay_skips_under_ci(pytester: pytest.Pytester,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    pytester.makeini(MARKERS)
    pytester.makepyfile(test_hardware="""
import pytest

@pytest.mark.gpu
def test_needs_a_gpu():
    pytest.skip("no CUDA GPU visible")

@pytest.mark.tensorrt
def test_needs_tensorrt():
    pytest.importorskip("no_such_tensorrt_for_trapedge")

def test_runs():
    pass
""")
    result = pytester.runpytest(plugins=[CIPolicy()])
    assert result.ret == pytest.ExitCode.OK
    result.assert_outcomes(passed=1, skipped=2)


def test_without_ci_an_unmarked_skip_stays_a_skip(project: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    result = project.runpytest(plugins=[CIPolicy()])
    assert result.ret == pytest.ExitCode.OK
    result.assert_outcomes(passed=1, skipped=4, xfailed=1)
    monkeypatch.setenv("CI", "false")
    result = project.runpytest(plugins=[CIPolicy()])
    assert result.ret == pytest.ExitCode.OK
    result.assert_outcomes(passed=1, skipped=4, xfailed=1)


def test_a_module_skipped_at_collection_fails_the_run_under_ci(pytester: pytest.Pytester,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    pytester.makepyfile(test_module_skip="""
import pytest

pytest.importorskip("no_such_package_for_trapedge")

def test_never_collected():
    pass
""")
    pytester.makepyfile(test_other="def test_runs():\n    pass\n")
    monkeypatch.setenv("CI", "true")
    result = pytester.runpytest(plugins=[CIPolicy()])
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.assert_outcomes(passed=1, skipped=1)
    result.stdout.fnmatch_lines(["*skipped under CI*",
                                 "FAILED test_module_skip.py - skipped under CI: could not import *no_such_package*"])
    monkeypatch.delenv("CI")
    assert pytester.runpytest(plugins=[CIPolicy()]).ret == pytest.ExitCode.OK
