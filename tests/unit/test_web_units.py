"""The web console's pure parts: roles, config keys, safe redirects, user names, ATNA messages."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from datetime import UTC, datetime
from pathlib import Path

import pytest

from plugin.config import ConfigError, load_config
from plugin.web.atna import audit_message, syslog_frame
from plugin.web.routes import _safe_next
from plugin.web.security import Role
from plugin.web.users import check_name

REPO = Path(__file__).resolve().parents[2]


def test_roles_order_and_parse() -> None:
    assert Role.VIEWER < Role.OPERATOR < Role.ADMIN
    assert Role.parse(" Operator ") is Role.OPERATOR and Role.ADMIN.label == "admin"
    with pytest.raises(ValueError, match="unknown role 'root'"):
        Role.parse("root")


def test_web_defaults_are_loopback_8080_and_the_example_says_so() -> None:
    example = load_config(REPO / "radgate.example.yaml").web
    assert (example.enabled, example.host, example.port) == (True, "127.0.0.1", 8080)
    assert example == load_config(None).web


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("web:\n  port: 70000\n", "web.port"),
        ("web:\n  session_minutes: 0\n", "web.session_minutes"),
        ("web:\n  audit:\n    syslog: collector\n", "web.audit.syslog"),
        ("web:\n  audit:\n    syslog: collector:99999\n", "web.audit.syslog"),
        ("web:\n  audit:\n    syslog_protocol: tls\n", "web.audit.syslog_protocol"),
        ("web:\n  secret_key: x\n", "web.secret_key: unknown key"),
    ],
)
def test_a_wrong_web_key_or_value_names_it(tmp_path: Path, text: str, named: str) -> None:
    path = tmp_path / "radgate.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        load_config(path)


@pytest.mark.parametrize(
    ("target", "landing"),
    [
        ("/studies?q=1", "/studies?q=1"),
        ("//evil.example", "/"),
        ("/\\evil.example", "/"),
        ("https://evil.example/", "/"),
        ("", "/"),
        (None, "/"),
    ],
)
def test_a_login_returns_only_to_a_path_of_this_site(target: str | None, landing: str) -> None:
    assert _safe_next(target) == landing


@pytest.mark.parametrize("name", ["", "a" * 65, "two words", "-dash", "évé", "x\ny", "name\n"])
def test_bad_user_names_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match="user name"):
        check_name(name)


@pytest.mark.parametrize(
    ("action", "outcome", "event_id", "event_type"),
    [
        ("login", "failure", "110114", "110122"),
        ("logout", "ok", "110114", "110123"),
        ("config.loaded", "ok", "110100", "110120"),
        ("csrf.rejected", "failure", "110113", "110132"),
        ("user.add", "ok", "110113", "110137"),
        ("job.retry", "ok", "110100", None),
    ],
)
def test_each_event_is_a_well_formed_dicom_audit_message(
    action: str, outcome: str, event_id: str, event_type: str | None
) -> None:
    at = datetime(2026, 12, 6, 10, 0, tzinfo=UTC)
    xml = audit_message(at, "al<i>ce", action, outcome, "10.0.0.1", "radgate@node")
    root = ET.fromstring(xml)  # well-formed, whatever the user name holds
    ident = root.find("EventIdentification")
    assert ident is not None
    assert ident.get("EventOutcomeIndicator") == ("0" if outcome == "ok" else "4")
    assert ident.get("EventDateTime") == "2026-12-06T10:00:00+00:00"
    assert ident.find("EventID").get("csd-code") == event_id  # type: ignore[union-attr]
    found_type = ident.find("EventTypeCode")
    assert (found_type.get("csd-code") if found_type is not None else None) == event_type
    assert root.find("ActiveParticipant").get("UserID") == "al<i>ce"  # type: ignore[union-attr]
    assert root.find("AuditSourceIdentification").get("AuditSourceID") == "radgate@node"  # type: ignore[union-attr]


def test_the_syslog_frame_is_rfc_5424() -> None:
    at = datetime(2026, 12, 6, 10, 0, tzinfo=UTC)
    frame = syslog_frame(b"<AuditMessage/>", at, "node1", 5)
    assert (
        frame == b"<85>1 2026-12-06T10:00:00+00:00 node1 radgate - IHE+RFC-3881 - \xef\xbb\xbf<AuditMessage/>"
    )
