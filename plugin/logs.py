"""Logging for the node: one line per event, plain text or JSON lines, UIDs only (no patient data).

Values from peers (AE titles, UIDs, dataset strings, HTTP input) reach log messages at many call
sites, so the formatters make every message one line whatever it holds: control characters are
escaped (`escape_controls`), and a traceback follows its line as a block whose every line is
indented, so nothing in a message or an exception's text can start a line of its own.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import UTC, datetime

from plugin.config import LoggingConfig

PLAIN_FORMAT = "%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"
TRACEBACK_INDENT = "  "

# C0, DEL, C1 (NEL among them) and the Unicode line and paragraph separators: every character that
# ends a line for some reader (str.splitlines, a terminal, a log viewer) or moves its cursor
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escaped(match: re.Match[str]) -> str:
    char = match.group()
    named = _NAMED.get(char)
    if named is not None:
        return named
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape_controls(text: str) -> str:
    """`text` with each control character written as a Python escape (``\\n``, ``\\x1b``, ``\\u2028``).

    Backslashes are left as they are: the result is for reading, not for decoding back.
    """
    return _CONTROL.sub(_escaped, text)


def indented_block(text: str) -> str:
    """A multi-line block (a traceback) for under a log line: each of its lines, wherever any reader
    would break one, indented and escaped, so that no line of it can pass for a log line."""
    return "\n".join(TRACEBACK_INDENT + escape_controls(line) for line in text.splitlines())


class SafeFormatter(logging.Formatter):
    """`logging.Formatter` whose message is one line (escaped) and whose traceback is indented.

    A record may carry a traceback as text alone (``exc_text`` without ``exc_info``): one forwarded
    from a receiving process.
    """

    def format(self, record: logging.LogRecord) -> str:
        record.message = escape_controls(record.getMessage())
        if self.usesTime():
            record.asctime = self.formatTime(record, self.datefmt)
        line = self.formatMessage(record)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        blocks = [text for text in (record.exc_text, record.stack_info) if text]
        return "\n".join([line, *map(indented_block, blocks)])


class _JsonLines(logging.Formatter):
    """One JSON object per line, for log shippers (JSON escapes every control character)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "process": record.process,
            "message": record.getMessage(),
        }
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["exception"] = record.exc_text
        return json.dumps(entry)


def setup_logging(config: LoggingConfig) -> None:
    """Log to stderr at the configured level; replaces handlers set up before (idempotent)."""
    handler = logging.StreamHandler(sys.stderr)
    if config.json_lines:
        handler.setFormatter(_JsonLines())
    else:
        formatter = SafeFormatter(PLAIN_FORMAT)
        formatter.converter = lambda *_: datetime.now(UTC).timetuple()
        handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(config.level)
    logging.getLogger("pynetdicom").setLevel(max(logging.WARNING, root.level))
    logging.getLogger("alembic.runtime.plugins").setLevel(max(logging.WARNING, root.level))


def setup_command_logging() -> None:
    """For the CLI's one-shot commands: where nothing handles log records yet, warnings and errors go
    to stderr as Python's last resort prints them (the message alone), but escaped. `setup_logging`
    (serve) replaces it."""
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setLevel(logging.WARNING)
        handler.setFormatter(SafeFormatter("%(message)s"))
        root.addHandler(handler)
