"""Logging for the node: one line per event, plain text or JSON lines, UIDs only (no patient data)."""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime

from plugin.config import LoggingConfig


class _JsonLines(logging.Formatter):
    """One JSON object per line, for log shippers."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "process": record.process,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def setup_logging(config: LoggingConfig) -> None:
    """Log to stderr at the configured level; replaces handlers set up before (idempotent)."""
    handler = logging.StreamHandler(sys.stderr)
    if config.json_lines:
        handler.setFormatter(_JsonLines())
    else:
        formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s")
        formatter.converter = lambda *_: datetime.now(UTC).timetuple()
        handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(config.level)
    logging.getLogger("pynetdicom").setLevel(max(logging.WARNING, root.level))
    logging.getLogger("alembic.runtime.plugins").setLevel(max(logging.WARNING, root.level))
