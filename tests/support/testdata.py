"""Where the tests find the shared test data and tools: the one way, used by every test module.

The shared folder sits beside the repository clone (`<clone>/../shared/testdata`, `../shared/tools`);
RADGATE_TESTDATA overrides the test data folder, and the tools are then looked for beside it;
RADGATE_SHARED_TOOLS overrides the tools folder alone. A test that needs them takes the
`testdata` fixture (tests/conftest.py) or, where a path is needed at import time, uses `TESTDATA`
with the `needs_testdata` mark. Missing data skips the test with a reason that starts with
`SKIP_PREFIX`; the two pytest hooks below (imported by conftest) count those skips in one loud
line at the very end of the run, printed only when there are some (scripts/test.sh prints it after mypy).
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[2]
SKIP_PREFIX = "real data:"


def shared_testdata_dir() -> Path:
    """The shared test data folder: RADGATE_TESTDATA, else shared/testdata beside the clone."""
    return Path(os.environ.get("RADGATE_TESTDATA") or REPOSITORY.parent / "shared" / "testdata")


def shared_tools_dir() -> Path:
    """The shared tools folder (viewercheck): RADGATE_SHARED_TOOLS, else `tools` beside the test data."""
    return Path(os.environ.get("RADGATE_SHARED_TOOLS") or shared_testdata_dir().parent / "tools")


def missing_reason(path: Path, variable: str = "RADGATE_TESTDATA") -> str:
    """The skip reason for a real-data test whose folder is missing (counted by conftest)."""
    return f"{SKIP_PREFIX} {path} not found, set {variable}"


def require_path(path: Path, variable: str = "RADGATE_TESTDATA") -> Path:
    """`path` when it exists; otherwise skip the calling test as a real-data test."""
    if not path.exists():
        pytest.skip(missing_reason(path, variable))
    return path


TESTDATA = shared_testdata_dir()
needs_testdata = pytest.mark.skipif(not TESTDATA.is_dir(), reason=missing_reason(TESTDATA))
"""Mark for a test that reads TESTDATA directly (without the `testdata` fixture)."""


_REAL_DATA_SKIPS = pytest.StashKey[Counter[str]]()


def _skip_reason(report: pytest.TestReport) -> str:
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
    return reason.removeprefix("Skipped: ")


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    """Count the real-data tests skipped for want of the shared data, by reason."""
    reasons = Counter(
        reason.removeprefix(SKIP_PREFIX).strip()
        for report in terminalreporter.stats.get("skipped", [])
        if (reason := _skip_reason(report)).startswith(SKIP_PREFIX)
    )
    if reasons:
        config.stash[_REAL_DATA_SKIPS] = reasons


def pytest_unconfigure(config: pytest.Config) -> None:
    """End the run's output with one loud line when real-data tests were skipped; with
    RADGATE_SKIP_LINE_FILE set, write the line to that file instead (scripts/test.sh prints it
    last, after mypy's output)."""
    reasons = config.stash.get(_REAL_DATA_SKIPS, None)
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if not reasons or reporter is None:
        return
    why = "; ".join(reason if len(reasons) == 1 else f"{n}: {reason}" for reason, n in reasons.items())
    line = f"REAL-DATA TESTS SKIPPED: {reasons.total()} ({why})"
    if target := os.environ.get("RADGATE_SKIP_LINE_FILE"):
        Path(target).write_text(line + "\n")
    else:
        reporter.write_line(line, red=True, bold=True)
