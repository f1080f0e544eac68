"""The audit trail in the job store (SQLite and PostgreSQL), a study's life read from the store,
the JSON-lines export, and IHE ATNA messages sent to real UDP and TCP listeners."""

from __future__ import annotations

import json
import re
import socket
import xml.etree.ElementTree as ET
from datetime import timedelta
from pathlib import Path

import pytest
from pydicom.uid import generate_uid
from sqlalchemy import select
from support.node import instance_record, wait_for
from support.web import login, web_node

from plugin.cli.main import main
from plugin.cli.users import cli_actor
from plugin.store.engine import Store
from plugin.store.models import Delivery, DeliveryState, JobState, Study, StudyState, add_queued_job, utcnow
from plugin.web import audit


def _study_with_a_life(store: Store) -> str:
    """A study received, complete, routed to one job that ran and succeeded, one result SENT and one DEAD."""
    uid = generate_uid()
    store.recorder.record_instance(instance_record(uid))
    t0 = utcnow()
    with store.session() as s:
        study = s.scalars(select(Study).where(Study.study_uid == uid)).one()
        study.state, study.completed_at = StudyState.COMPLETE, t0
        job = add_queued_job(s, study, "ct-lung", rule="chest", destinations=["pacs", "stow"], now=t0)
        s.flush()
        job.state, job.started_at, job.finished_at = (
            JobState.SUCCEEDED,
            t0 + timedelta(seconds=1),
            t0 + timedelta(seconds=9),
        )
        for destination, state in (("pacs", DeliveryState.SENT), ("stow", DeliveryState.DEAD)):
            s.add(
                Delivery(
                    job_id=job.id,
                    sop_instance_uid="1.2.3.4",
                    destination=destination,
                    state=state,
                    attempts=3,
                    created_at=t0,
                    updated_at=t0 + timedelta(seconds=12),
                    sent_at=t0 + timedelta(seconds=10) if state == DeliveryState.SENT else None,
                )
            )
    return uid


def test_recorded_events_and_a_studys_life_read_back_in_order(store: Store) -> None:
    audit.record(store, "alice", "job.retry", target="7", detail={"job": 7}, remote="10.0.0.1")
    audit.record(store, "x" * 100, "login", outcome="failure")  # a long name tried is cut, not refused
    uid = _study_with_a_life(store)
    trail = audit.events(store)
    life = [(e.action, e.outcome) for e in trail if e.target == uid]
    assert life == [
        ("study.received", "ok"),
        ("study.complete", "ok"),
        ("job.routed", "ok"),
        ("job.running", "ok"),
        ("job.succeeded", "ok"),
        ("delivery.sent", "ok"),
        ("delivery.dead", "failure"),
    ]
    routed = next(e for e in trail if e.action == "job.routed")
    assert routed.detail is not None and routed.detail["rule"] == "chest" and routed.source == "store"
    retry = next(e for e in trail if e.action == "job.retry")
    assert (retry.actor, retry.target, retry.detail, retry.remote) == ("alice", "7", {"job": 7}, "10.0.0.1")
    assert next(e for e in trail if e.action == "login").actor == "x" * 64
    running = next(e for e in trail if e.action == "job.running")
    later = audit.events(store, since=running.at, until=running.at + timedelta(seconds=8.5))
    assert [e.action for e in later] == ["job.running", "job.succeeded"]
    assert [e.action for e in audit.events(store, studies=False)] == ["job.retry", "login"]


def test_the_export_prints_json_lines_since_a_time(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data"
    store = Store(f"sqlite:///{data / 'radgate.db'}")
    store.migrate()
    uid = _study_with_a_life(store)
    audit.record(store, "alice", "login")
    store.dispose()

    def export(*args: str) -> list[dict[str, object]]:
        assert main(["audit", "export", "--data-dir", str(data), *args]) == 0
        return [json.loads(line) for line in capsys.readouterr().out.splitlines()]

    every = export()
    assert [e["action"] for e in every if e["target"] == uid][:2] == ["study.received", "study.complete"]
    assert {"at", "actor", "action", "target", "outcome", "detail", "remote", "source"} == set(every[0])
    logged_in = next(e for e in every if e["action"] == "login")
    recent = export("--since", str(logged_in["at"]), "--no-studies")
    assert [(e["actor"], e["action"]) for e in recent] == [("alice", "login"), (cli_actor(), "audit.export")]


def _udp_listener() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(10)
    return sock


def _check_atna(frame: bytes, user: str, event_id: str, event_type: str, outcome: str) -> None:
    header, _, xml = frame.partition(b"\xef\xbb\xbf")
    severity = 5 if outcome == "0" else 4
    assert re.fullmatch(rf"<{10 * 8 + severity}>1 \S+ \S+ radgate - IHE\+RFC-3881 - ", header.decode())
    root = ET.fromstring(xml)
    assert root.tag == "AuditMessage"
    ident = root.find("EventIdentification")
    assert ident is not None and ident.get("EventOutcomeIndicator") == outcome
    assert ident.find("EventID").get("csd-code") == event_id  # type: ignore[union-attr]
    assert ident.find("EventTypeCode").get("csd-code") == event_type  # type: ignore[union-attr]
    participant = root.find("ActiveParticipant")
    assert participant is not None and participant.get("UserID") == user
    assert participant.get("NetworkAccessPointID") == "127.0.0.1"
    assert root.find("AuditSourceIdentification") is not None


def test_atna_messages_go_to_a_udp_collector(tmp_path: Path) -> None:
    with _udp_listener() as collector:
        port = collector.getsockname()[1]
        with web_node(tmp_path, audit={"syslog": f"127.0.0.1:{port}"}) as console, console.client() as client:
            client.post("/login", data={"username": "admin", "password": "wrong-password"})
            login(client, "admin")
            failed, _ = collector.recvfrom(65536)
            done, _ = collector.recvfrom(65536)
    _check_atna(failed, "admin", "110114", "110122", "4")
    _check_atna(done, "admin", "110114", "110122", "0")
    assert b"wrong-password" not in failed


def test_atna_messages_go_to_a_tcp_collector_with_octet_counting(tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as collector:
        collector.settimeout(10)
        port = collector.getsockname()[1]
        config = {"syslog": f"127.0.0.1:{port}", "syslog_protocol": "tcp"}
        with web_node(tmp_path, audit=config) as console, console.client() as client:
            login(client, "viewer")
            assert client.get("/api/audit").status_code == 403
            frames = []
            for _ in range(2):
                connection, _ = collector.accept()
                with connection:
                    connection.settimeout(10)
                    received = b""
                    while not received.endswith(b">"):  # the XML's last tag closes the frame
                        received += connection.recv(65536)
                length, _, frame = received.partition(b" ")
                assert int(length) == len(frame)
                frames.append(frame)
    _check_atna(frames[0], "viewer", "110114", "110122", "0")
    _check_atna(frames[1], "viewer", "110113", "110132", "4")


def test_an_unreachable_collector_costs_a_log_line_not_the_login(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with socket.create_server(("127.0.0.1", 0)) as closed:
        port = closed.getsockname()[1]
    with web_node(tmp_path, audit={"syslog": f"127.0.0.1:{port}", "syslog_protocol": "tcp"}) as console:
        with console.client() as client:
            login(client, "viewer")
        wait_for(lambda: "cannot send to the ATNA collector" in caplog.text, 10, "the log line")
