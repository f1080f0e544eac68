"""Senders: the one for each destination kind (`plugin.dispatch.dicom`, `.dicomweb`,
`.orthanc_rest`) sends one batch of result files to one destination, by C-STORE, STOW-RS or Orthanc REST.

A sender reports, per delivery, None (sent) or the reason it was not sent, in words an operator
can act on (the DICOM status, the HTTP status, "connection refused"). It never raises for a
network or peer failure and never puts a destination's credentials in a reason: every reason goes
through ``redact`` with the destination's secrets.
"""

from __future__ import annotations

from plugin.config import (
    DicomDestination,
    DicomWebDestination,
    OrthancDestination,
)
from plugin.dispatch.base import Sender, http_where, redact, url_secrets
from plugin.dispatch.dicom import DicomSender
from plugin.dispatch.dicomweb import StowSender, auth_secrets
from plugin.dispatch.orthanc_rest import OrthancSender


def destination_secrets(
    destination: DicomDestination | DicomWebDestination | OrthancDestination,
) -> list[str]:
    """Every credential a destination carries, for ``redact``."""
    if isinstance(destination, DicomWebDestination):
        return url_secrets(destination.url) + auth_secrets(destination.auth)
    if isinstance(destination, OrthancDestination):
        secrets = url_secrets(destination.url)
        if destination.password is not None:
            secrets.append(destination.password.get_secret_value())
        return secrets
    return []


def destination_where(destination: DicomDestination | DicomWebDestination | OrthancDestination) -> str:
    """Where a destination is, for people: AE@host:port (DICOM) or host:port (HTTP), no credentials."""
    if isinstance(destination, DicomDestination):
        tls = " (TLS)" if destination.tls is not None else ""
        return f"{destination.ae_title}@{destination.host}:{destination.port}{tls}"
    return http_where(destination.url)


def make_sender(
    destination: DicomDestination | DicomWebDestination | OrthancDestination,
    calling_ae_title: str,
    timeout_s: float,
) -> Sender:
    """The sender for a configured destination."""
    if isinstance(destination, DicomDestination):
        return DicomSender(destination, calling_ae_title, timeout_s)
    if isinstance(destination, DicomWebDestination):
        return StowSender(destination, timeout_s)
    return OrthancSender(destination, timeout_s)


def check_destination(
    destination: DicomDestination | DicomWebDestination | OrthancDestination,
    calling_ae_title: str,
    timeout_s: float,
) -> str | None:
    """Test a destination as its sender reaches it (C-ECHO for DICOM, an HTTP request otherwise):
    None when it answers, else the reason, without its credentials."""
    reason = make_sender(destination, calling_ae_title, timeout_s).check()
    return None if reason is None else redact(reason, destination_secrets(destination))
