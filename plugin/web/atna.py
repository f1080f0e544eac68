"""IHE ATNA: each audit event as a DICOM audit message (PS3.15 A.5, RFC 3881) in RFC 5424 syslog.

One minimal, well-formed ``AuditMessage`` per event: its EventIdentification (a DCM code for the
kind of event, the outcome), the ActiveParticipant (the user, or the node) and the
AuditSourceIdentification (this node). Sent over UDP (RFC 5426, one datagram per message) or TCP
(RFC 6587 octet counting, a connection per message). A collector that is down costs one log line
per message and never fails the action being audited.
"""

from __future__ import annotations

import logging
import socket
import xml.etree.ElementTree as ET
from datetime import datetime

from plugin.config import AuditConfig
from plugin.logs import escape_controls
from plugin.web.audit import Event

log = logging.getLogger(__name__)

FACILITY_AUTHPRIV = 10  # DICOM PS3.15 A.5.1: security/authorization messages
SEVERITY_NOTICE = 5
SEVERITY_WARNING = 4
APP_NAME = "radgate"
MSGID = "IHE+RFC-3881"
TIMEOUT_S = 2.0

# action (or its first part) -> EventID and EventTypeCode, both (code, meaning) in DICOM's DCM scheme
_APPLICATION = ("110100", "Application Activity")
_AUTHENTICATION = ("110114", "User Authentication")
_SECURITY_ALERT = ("110113", "Security Alert")
_RESTRICTED = ("110132", "Use of Restricted Function")
_EVENTS: dict[str, tuple[tuple[str, str], tuple[str, str] | None]] = {
    "login": (_AUTHENTICATION, ("110122", "Login")),
    "logout": (_AUTHENTICATION, ("110123", "Logout")),
    "config.loaded": (_APPLICATION, ("110120", "Application Start")),
    "auth.rejected": (_SECURITY_ALERT, _RESTRICTED),
    "csrf.rejected": (_SECURITY_ALERT, _RESTRICTED),
    "access.denied": (_SECURITY_ALERT, _RESTRICTED),
    "user": (_SECURITY_ALERT, ("110137", "User security Attributes Changed")),
    "audit": (("110101", "Audit Log Used"), None),
}
_ACTION_CODES = {"login": "E", "logout": "E", "audit": "R"}


def _codes(action: str) -> tuple[tuple[str, str], tuple[str, str] | None]:
    return _EVENTS.get(action) or _EVENTS.get(action.split(".", 1)[0]) or (_APPLICATION, None)


def audit_message(
    at: datetime,
    actor: str | None,
    action: str,
    outcome: str,
    remote: str | None,
    source_id: str,
) -> bytes:
    """The DICOM audit message (PS3.15 A.5.1) of one event, as UTF-8 XML."""
    event_id, event_type = _codes(action)
    root = ET.Element("AuditMessage")
    identification = ET.SubElement(
        root,
        "EventIdentification",
        EventActionCode=_ACTION_CODES.get(action.split(".", 1)[0], "E"),
        EventDateTime=at.isoformat(),
        EventOutcomeIndicator="0" if outcome == "ok" else "4",
    )
    ET.SubElement(
        identification,
        "EventID",
        {"csd-code": event_id[0], "codeSystemName": "DCM", "originalText": event_id[1]},
    )
    if event_type is not None:
        ET.SubElement(
            identification,
            "EventTypeCode",
            {"csd-code": event_type[0], "codeSystemName": "DCM", "originalText": event_type[1]},
        )
    participant = {"UserID": actor or APP_NAME, "UserIsRequestor": "true" if actor else "false"}
    if remote is not None:
        participant |= {"NetworkAccessPointID": remote, "NetworkAccessPointTypeCode": "2"}
    ET.SubElement(root, "ActiveParticipant", participant)
    ET.SubElement(root, "AuditSourceIdentification", AuditSourceID=source_id)
    object_detail = ET.SubElement(
        root, "ParticipantObjectIdentification", ParticipantObjectID=action, ParticipantObjectTypeCode="2"
    )
    ET.SubElement(
        object_detail,
        "ParticipantObjectIDTypeCode",
        {"csd-code": "radgate-action", "codeSystemName": "radgate", "originalText": "radgate action"},
    )
    return ET.tostring(root, encoding="utf-8", xml_declaration=True)


def syslog_frame(message: bytes, at: datetime, hostname: str, severity: int) -> bytes:
    """An RFC 5424 message: ``<PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID MSGID - MSG`` (MSG with a BOM)."""
    pri = FACILITY_AUTHPRIV * 8 + severity
    header = f"<{pri}>1 {at.isoformat()} {hostname or '-'} {APP_NAME} - {MSGID} - "
    return header.encode("ascii", "replace") + b"\xef\xbb\xbf" + message


class SyslogSender:
    """Sends audit events to the ATNA collector `AuditConfig.syslog` names."""

    def __init__(self, config: AuditConfig) -> None:
        if config.syslog is None:
            raise ValueError("no syslog collector configured")
        host, _, port = config.syslog.rpartition(":")
        self.address = (host.strip("[]"), int(port))
        self.protocol = config.syslog_protocol
        self.hostname = socket.gethostname()[:255]

    def send(self, event: Event) -> None:
        """Send one audit event; a failure to send is logged, never raised."""
        xml = audit_message(
            event.at, event.actor, event.action, event.outcome, event.remote, f"{APP_NAME}@{self.hostname}"
        )
        severity = SEVERITY_NOTICE if event.outcome == "ok" else SEVERITY_WARNING
        frame = syslog_frame(xml, event.at, self.hostname, severity)
        try:
            if self.protocol == "udp":
                with socket.socket(_family(self.address[0]), socket.SOCK_DGRAM) as udp:
                    udp.sendto(frame, self.address)
            else:
                with socket.create_connection(self.address, timeout=TIMEOUT_S) as tcp:
                    tcp.sendall(str(len(frame)).encode() + b" " + frame)
        except OSError as err:
            log.warning(
                "audit: cannot send to the ATNA collector %s:%d: %s", *self.address, escape_controls(str(err))
            )


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET
