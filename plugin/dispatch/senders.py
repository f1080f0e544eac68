"""Senders: one batch of result files to one destination, by C-STORE, STOW-RS or Orthanc REST.

A sender reports, per delivery, None (sent) or the reason it was not sent, in words an operator
can act on (the DICOM status, the HTTP status, "connection refused"). It never raises for a
network or peer failure and never puts a destination's credentials in a reason: every reason goes
through ``redact`` with the destination's secrets.
"""

from __future__ import annotations

import errno
import socket
import ssl
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import requests
from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, build_context
from pynetdicom.presentation import PresentationContext
from pynetdicom.status import code_to_category

from plugin.config import (
    BasicAuth,
    BearerAuth,
    ClientTLS,
    DicomDestination,
    DicomWebDestination,
    OrthancDestination,
)

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


def _http_where(url: str) -> str:
    """host:port of a URL, never its user information."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return f"{parts.hostname}:{port}"


def _url_secrets(url: str) -> list[str]:
    password = urlsplit(url).password
    return [password] if password else []


def _all(items: Sequence[Outgoing], reason: str) -> Outcomes:
    return {item.delivery_id: reason for item in items}


def _missing(item: Outgoing) -> str | None:
    return None if item.path.is_file() else f"result file missing: {item.path}"


# --- DICOM C-STORE ------------------------------------------------------------------------------


def _client_ssl_context(tls: ClientTLS) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(tls.ca_file) if tls.ca_file else None)
    if tls.cert_file and tls.key_file:
        context.load_cert_chain(str(tls.cert_file), str(tls.key_file))
    return context


def _status_reason(status: Any) -> str | None:
    """None for Success and Warning (0xB000.. : stored, perhaps coerced), else the status in words."""
    if "Status" not in status:
        return "no C-STORE response (timeout, abort or invalid response)"
    code = int(status.Status)
    category = code_to_category(code)
    if category in ("Success", "Warning"):
        return None
    comment = f": {status.ErrorComment}" if "ErrorComment" in status else ""
    return f"C-STORE status 0x{code:04X} ({category}){comment}"


class DicomSender:
    """C-STORE SCU: one association per batch; proposes each file's own transfer syntax and the
    uncompressed little endian ones, so an uncompressed file can be converted for a picky peer."""

    def __init__(self, destination: DicomDestination, calling_ae_title: str, timeout_s: float) -> None:
        self.destination = destination
        self.calling_ae_title = destination.calling_ae_title or calling_ae_title
        self.timeout_s = timeout_s
        self.where = f"{destination.ae_title}@{destination.host}:{destination.port}"

    def _contexts(self, items: Sequence[Outgoing]) -> tuple[list[PresentationContext], Outcomes]:
        """Presentation contexts for the files' SOP classes and syntaxes; unreadable files fail here.

        At most two per file, so a batch of 64 stays within the 128 contexts DICOM allows.
        """
        wanted: dict[tuple[str, tuple[str, ...]], None] = {}
        failed: Outcomes = {}
        for item in items:
            if (reason := _missing(item)) is not None:
                failed[item.delivery_id] = reason
                continue
            try:
                meta = read_file_meta_info(item.path)
                sop_class, syntax = str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID)
            except (InvalidDicomError, AttributeError, OSError) as err:
                failed[item.delivery_id] = f"not a readable DICOM file: {item.path} ({err})"
                continue
            if syntax not in UNCOMPRESSED:
                wanted[(sop_class, (syntax,))] = None
            wanted[(sop_class, UNCOMPRESSED)] = None
        contexts = [build_context(sop_class, list(syntaxes)) for sop_class, syntaxes in wanted]
        return contexts, failed

    def _association_failure(self, assoc: Any, tls: ssl.SSLContext | None) -> str:
        if assoc.is_rejected:
            return f"association rejected by {self.where} (A-ASSOCIATE-RJ; check the AE titles)"
        host, port = self.destination.host, self.destination.port
        try:  # pynetdicom only logs why the connection failed (and calls it an abort): try once more
            with socket.create_connection((host, port), self.timeout_s) as sock:
                if tls is not None:
                    tls.wrap_socket(sock, server_hostname=host).close()
        except OSError as err:  # ssl.SSLError is an OSError
            return describe_network_error(err, self.where)
        if assoc.is_aborted:
            return f"association aborted by {self.where}"
        return f"no association with {self.where} (no A-ASSOCIATE response)"

    def send(self, items: Sequence[Outgoing]) -> Outcomes:
        contexts, outcomes = self._contexts(items)
        todo = [item for item in items if item.delivery_id not in outcomes]
        if not todo:
            return outcomes
        ae = AE(ae_title=self.calling_ae_title)
        ae.requested_contexts = contexts
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout_s
        ae.connection_timeout = self.timeout_s
        tls = self.destination.tls
        context = _client_ssl_context(tls) if tls is not None else None
        tls_args = (context, self.destination.host) if context is not None else None
        try:
            assoc = ae.associate(
                self.destination.host,
                self.destination.port,
                ae_title=self.destination.ae_title,
                tls_args=tls_args,
            )
        except (OSError, ssl.SSLError) as err:
            return outcomes | _all(todo, describe_network_error(err, self.where))
        if not assoc.is_established:
            return outcomes | _all(todo, self._association_failure(assoc, context))
        try:
            for item in todo:
                if not assoc.is_established:
                    outcomes[item.delivery_id] = f"association with {self.where} ended during the batch"
                    continue
                try:
                    status = assoc.send_c_store(dcmread(item.path))
                except (ValueError, AttributeError, InvalidDicomError, OSError) as err:
                    # ValueError: no accepted presentation context for this SOP class / syntax
                    outcomes[item.delivery_id] = f"not sent to {self.where}: {err}"
                    continue
                outcomes[item.delivery_id] = _status_reason(status)
        finally:
            if assoc.is_established:
                assoc.release()
        return outcomes


# --- HTTP: DICOMweb STOW-RS and Orthanc REST ----------------------------------------------------


def _http_session(auth: BasicAuth | BearerAuth | None) -> requests.Session:
    session = requests.Session()
    if isinstance(auth, BasicAuth):
        session.auth = (auth.username, auth.password.get_secret_value())
    elif isinstance(auth, BearerAuth):
        session.headers["Authorization"] = f"Bearer {auth.token.get_secret_value()}"
    return session


def _http_status(response: requests.Response, where: str) -> str:
    return f"HTTP {response.status_code} {response.reason} from {where}"


def _stow_answer(response: requests.Response) -> tuple[set[str], dict[str, str]]:
    """(stored, refused) SOP Instance UIDs of a STOW-RS answer: ReferencedSOPSequence (0008,1199)
    and FailedSOPSequence (0008,1198) with each FailureReason; empty when the body says nothing."""
    try:
        answer = response.json() if response.content else {}
    except ValueError:
        return set(), {}
    if not isinstance(answer, dict):
        return set(), {}

    def items(tag: str) -> list[dict[str, Any]]:
        return list(answer.get(tag, {}).get("Value", []))

    def uid(entry: dict[str, Any]) -> str:
        return str(entry.get("00081155", {}).get("Value", [""])[0])

    stored = {uid(entry) for entry in items("00081199")}
    refused: dict[str, str] = {}
    for entry in items("00081198"):
        reason = entry.get("00081197", {}).get("Value", [None])[0]
        refused[uid(entry)] = f"0x{reason:04X}" if isinstance(reason, int) else "?"
    return stored, refused


class StowSender:
    """DICOMweb STOW-RS: one multipart/related POST to {url}/studies per batch, files sent byte for byte.

    Per instance: listed in the answer's FailedSOPSequence, refused; in its ReferencedSOPSequence,
    stored, whatever the HTTP status (Orthanc answers 400 for a batch with one bad part and still
    stores the others); neither, stored only when the status is 200.
    """

    def __init__(self, destination: DicomWebDestination, timeout_s: float) -> None:
        self.destination = destination
        self.timeout_s = timeout_s
        self.where = _http_where(destination.url)

    def send(self, items: Sequence[Outgoing]) -> Outcomes:
        outcomes: Outcomes = {}
        boundary = uuid.uuid4().hex
        parts: list[bytes] = []
        todo: list[Outgoing] = []
        for item in items:
            if (reason := _missing(item)) is not None:
                outcomes[item.delivery_id] = reason
                continue
            part_header = f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
            parts += [part_header, item.path.read_bytes(), b"\r\n"]
            todo.append(item)
        if not todo:
            return outcomes
        parts.append(f"--{boundary}--\r\n".encode())
        headers = {
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
            "Accept": "application/dicom+json",
        }
        try:
            with _http_session(self.destination.auth) as session:
                response = session.post(
                    f"{self.destination.url}/studies",
                    data=b"".join(parts),
                    headers=headers,
                    timeout=self.timeout_s,
                )
        except requests.RequestException as err:
            return outcomes | _all(todo, describe_network_error(err, self.where))
        stored, refused = _stow_answer(response)
        for item in todo:
            uid = item.sop_instance_uid
            if uid in refused:
                outcomes[item.delivery_id] = f"STOW-RS refused by {self.where}, FailureReason {refused[uid]}"
            elif uid in stored or response.status_code == 200:
                outcomes[item.delivery_id] = None
            else:
                outcomes[item.delivery_id] = f"{_http_status(response, self.where)}; not listed as stored"
        return outcomes


class OrthancSender:
    """Orthanc REST: POST {url}/instances with each file's bytes, on one HTTP session per batch."""

    def __init__(self, destination: OrthancDestination, timeout_s: float) -> None:
        self.destination = destination
        self.timeout_s = timeout_s
        self.where = _http_where(destination.url)

    def send(self, items: Sequence[Outgoing]) -> Outcomes:
        outcomes: Outcomes = {}
        session = requests.Session()
        if self.destination.username is not None and self.destination.password is not None:
            session.auth = (self.destination.username, self.destination.password.get_secret_value())
        with session:
            for index, item in enumerate(items):
                if (reason := _missing(item)) is not None:
                    outcomes[item.delivery_id] = reason
                    continue
                try:
                    response = session.post(
                        f"{self.destination.url}/instances",
                        data=item.path.read_bytes(),
                        headers={"Content-Type": "application/dicom"},
                        timeout=self.timeout_s,
                    )
                except requests.RequestException as err:  # the server is unreachable: stop this batch
                    return outcomes | _all(items[index:], describe_network_error(err, self.where))
                outcomes[item.delivery_id] = None if response.ok else _http_status(response, self.where)
        return outcomes


def destination_secrets(
    destination: DicomDestination | DicomWebDestination | OrthancDestination,
) -> list[str]:
    """Every credential a destination carries, for ``redact``."""
    if isinstance(destination, DicomWebDestination):
        secrets = _url_secrets(destination.url)
        if isinstance(destination.auth, BasicAuth):
            secrets.append(destination.auth.password.get_secret_value())
        elif isinstance(destination.auth, BearerAuth):
            secrets.append(destination.auth.token.get_secret_value())
        return secrets
    if isinstance(destination, OrthancDestination):
        secrets = _url_secrets(destination.url)
        if destination.password is not None:
            secrets.append(destination.password.get_secret_value())
        return secrets
    return []


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
