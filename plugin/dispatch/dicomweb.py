"""DICOMweb STOW-RS: one multipart/related POST per batch."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

import requests

from plugin.config import (
    BasicAuth,
    BearerAuth,
    DicomWebDestination,
)
from plugin.dispatch.base import (
    Outcomes,
    Outgoing,
    describe_network_error,
    fail_all,
    http_status,
    http_where,
    missing_file,
)


def http_session(auth: BasicAuth | BearerAuth | None) -> requests.Session:
    """A requests session that sends the configured credentials (a DICOMweb destination's or source's)."""
    session = requests.Session()
    if isinstance(auth, BasicAuth):
        session.auth = (auth.username, auth.password.get_secret_value())
    elif isinstance(auth, BearerAuth):
        session.headers["Authorization"] = f"Bearer {auth.token.get_secret_value()}"
    return session


def auth_secrets(auth: BasicAuth | BearerAuth | None) -> list[str]:
    """The password or token of configured credentials, for ``redact``."""
    if isinstance(auth, BasicAuth):
        return [auth.password.get_secret_value()]
    if isinstance(auth, BearerAuth):
        return [auth.token.get_secret_value()]
    return []


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
        self.where = http_where(destination.url)

    def check(self) -> str | None:
        """An HTTP check: a QIDO-RS query for one study (GET {url}/studies?limit=1) must answer
        200 or 204 with these credentials; None when it does, else why not."""
        try:
            with http_session(self.destination.auth) as session:
                response = session.get(
                    f"{self.destination.url}/studies",
                    params={"limit": "1"},
                    headers={"Accept": "application/dicom+json"},
                    timeout=self.timeout_s,
                )
        except requests.RequestException as err:
            return describe_network_error(err, self.where)
        return None if response.status_code in (200, 204) else http_status(response, self.where)

    def send(self, items: Sequence[Outgoing]) -> Outcomes:
        outcomes: Outcomes = {}
        boundary = uuid.uuid4().hex
        parts: list[bytes] = []
        todo: list[Outgoing] = []
        for item in items:
            if (reason := missing_file(item)) is not None:
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
            with http_session(self.destination.auth) as session:
                response = session.post(
                    f"{self.destination.url}/studies",
                    data=b"".join(parts),
                    headers=headers,
                    timeout=self.timeout_s,
                )
        except requests.RequestException as err:
            return outcomes | fail_all(todo, describe_network_error(err, self.where))
        stored, refused = _stow_answer(response)
        for item in todo:
            uid = item.sop_instance_uid
            if uid in refused:
                outcomes[item.delivery_id] = f"STOW-RS refused by {self.where}, FailureReason {refused[uid]}"
            elif uid in stored or response.status_code == 200:
                outcomes[item.delivery_id] = None
            else:
                outcomes[item.delivery_id] = f"{http_status(response, self.where)}; not listed as stored"
        return outcomes
