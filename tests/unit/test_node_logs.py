"""Node logging: plain text or JSON lines on stderr, at the configured level."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest

from plugin.config import LoggingConfig
from plugin.logs import setup_logging


@pytest.fixture()
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.mark.usefixtures("restore_logging")
def test_json_lines_carry_time_level_logger_and_message(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging(LoggingConfig(level="INFO", json_lines=True))
    logging.getLogger("plugin.test").info("study %s complete", "1.2.3")
    logging.getLogger("plugin.test").debug("not shown")
    [line] = capsys.readouterr().err.splitlines()
    entry = json.loads(line)
    assert (entry["level"], entry["logger"], entry["message"]) == (
        "INFO",
        "plugin.test",
        "study 1.2.3 complete",
    )
    assert entry["time"].endswith("+00:00")


@pytest.mark.usefixtures("restore_logging")
def test_plain_text_lines(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging(LoggingConfig(level="WARNING"))
    logging.getLogger("plugin.test").warning("refused SOP %s", "1.2.3.4")
    [line] = capsys.readouterr().err.splitlines()
    assert "WARNING plugin.test" in line and line.endswith("refused SOP 1.2.3.4")
