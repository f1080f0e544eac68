"""What every sender shares: the outgoing file, the outcomes, reasons an operator can act on.

A sender reports, per delivery, None (sent) or the reason it was not sent, in words an operator
can act on (the DICOM status, the HTTP status, "connection refused"). It never raises for a
network or peer failure and never puts a destination's credentials in a reason: every reason goes
through ``redact`` with the destination's secrets.
"""

from __future__ import annotations

import errno
import socket
import ssl
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol
from urllib.parse import urlsplit

import requests
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

Outcomes = dict[int, str | None]
"""Delivery id -> None when sent, else the reason it was not."""


UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)


@dataclass(frozen=True)
class Outgoing:
    """One result file to send, with the delivery row it answers for."""

    delivery_id: int
    sop_instance_uid: str
    path: Path


class Sender(Protocol):
    def send(self, items: Sequence[Outgoing]) -> Outcomes: ...

    def check(self) -> str | None:
        """Whether the destination answers (C-ECHO, an HTTP request): None, or why not."""
        ...


def redact(text: str, secrets: Sequence[str]) -> str:
    """``text`` with every secret replaced by ***, so no reason or log line carries a credential."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """The exception and what it wraps: __cause__/__context__, and urllib3's ``reason``/first arg."""
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        e = todo.pop(0)
        if id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        for inner in (e.__cause__, e.__context__, getattr(e, "reason", None), *e.args[:1]):
            if isinstance(inner, BaseException):
                todo.append(inner)


def describe_network_error(exc: BaseException, where: str) -> str:
    """A short reason for a failed connection or request: refused, timed out, TLS, name lookup."""
    for e in _causes(exc):
        if isinstance(e, ConnectionRefusedError) or getattr(e, "errno", None) == errno.ECONNREFUSED:
            return f"connection refused ({where})"
        if isinstance(e, TimeoutError | requests.Timeout):
            return f"timed out ({where})"
        if isinstance(e, ssl.SSLError):
            return f"TLS error ({where}): {e.reason or e}"
        if isinstance(e, socket.gaierror):
            return f"host name not found ({where})"
        if isinstance(e, ConnectionResetError):
            return f"connection reset by the peer ({where})"
    return f"{type(exc).__name__} ({where}): {exc}"


def http_where(url: str) -> str:
    """host:port of a URL, never its user information."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return f"{parts.hostname}:{port}"


def url_secrets(url: str) -> list[str]:
    password = urlsplit(url).password
    return [password] if password else []


def fail_all(items: Sequence[Outgoing], reason: str) -> Outcomes:
    return {item.delivery_id: reason for item in items}


def missing_file(item: Outgoing) -> str | None:
    return None if item.path.is_file() else f"result file missing: {item.path}"


def http_status(response: requests.Response, where: str) -> str:
    return f"HTTP {response.status_code} {response.reason} from {where}"
