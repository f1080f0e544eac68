"""The one way tests find the shared test data, and the line that counts real-data skips."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

TESTS = Path(__file__).resolve().parents[1]

TINY_SUITE = """
import pytest
from support.testdata import TESTDATA, needs_testdata, require_path, shared_testdata_dir

@pytest.fixture(scope="session")
def testdata():
    return require_path(shared_testdata_dir())

def test_through_the_fixture(testdata):
    assert testdata.is_dir()

@needs_testdata
def test_through_the_mark():
    assert TESTDATA.is_dir()

def test_skipped_for_another_reason():
    pytest.skip("not a real-data reason")

def test_without_data():
    pass
"""


@pytest.fixture(autouse=True)
def _own_skip_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """The inner runs must not write into the file of the test command running this module."""
    monkeypatch.delenv("RADGATE_SKIP_LINE_FILE", raising=False)


def _run(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, testdata: Path) -> pytest.RunResult:
    monkeypatch.setenv("RADGATE_TESTDATA", str(testdata))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    pytester.makeconftest("from support.testdata import pytest_terminal_summary, pytest_unconfigure\n")
    pytester.makepyfile(TINY_SUITE)
    return pytester.runpytest_subprocess("-q", "-p", "no:cacheprovider")


def test_missing_data_skips_and_the_run_ends_with_one_line(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = pytester.path / "nowhere"
    result = _run(pytester, monkeypatch, missing)
    result.assert_outcomes(passed=1, skipped=3)
    lines = [line for line in result.outlines if line.strip()]
    assert lines[-1] == f"REAL-DATA TESTS SKIPPED: 2 ({missing} not found, set RADGATE_TESTDATA)"
    assert sum("REAL-DATA" in line for line in result.outlines) == 1


def test_the_line_goes_to_a_file_for_the_test_command(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """scripts/test.sh sets RADGATE_SKIP_LINE_FILE and prints the line after mypy's output."""
    missing = pytester.path / "nowhere"
    target = pytester.path / "skipped.txt"
    monkeypatch.setenv("RADGATE_SKIP_LINE_FILE", str(target))
    result = _run(pytester, monkeypatch, missing)
    assert "REAL-DATA" not in result.stdout.str()
    assert target.read_text() == f"REAL-DATA TESTS SKIPPED: 2 ({missing} not found, set RADGATE_TESTDATA)\n"


def test_present_data_runs_and_no_line(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    data = pytester.mkdir("testdata")
    result = _run(pytester, monkeypatch, data)
    result.assert_outcomes(passed=3, skipped=1)
    assert "REAL-DATA" not in result.stdout.str()
