"""The outbox and its senders, against real peers: Orthanc (C-STORE, DICOMweb STOW-RS, REST) and a
pynetdicom Storage SCP that answers chosen statuses. Dispatchers are driven round by round
(``run_once``), so every test decides exactly when a send happens; nothing sleeps to synchronise.
"""

from __future__ import annotations

import itertools
import json
import logging
import random
import ssl
import threading
from collections import Counter
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydicom.uid import generate_uid
from pynetdicom import AE, AllStoragePresentationContexts, evt
from sqlalchemy import select, update
from support.execute import make_job
from support.node import self_signed_cert, write_series
from support.postgres import both_databases, database_url

from dicom_io.testing import orthanc_server
from dicom_io.testing.orthanc_server import OrthancServer, wait_until
from dicom_io.testing.tools import ToolNotFoundError, free_port
from plugin.cli import main
from plugin.config import Config, DispatchConfig, load_config
from plugin.dispatch.base import Outgoing
from plugin.dispatch.outbox import Dispatcher, backoff_delay, enqueue_deliveries
from plugin.dispatch.senders import make_sender
from plugin.store.engine import Store, migrated_store
from plugin.store.models import Delivery, DeliveryState, utcnow

SECRET = "s3cret-Pa55word"


# --- helpers -----------------------------------------------------------------------------------


def make_config(tmp_path: Path, destinations: dict[str, Any], **dispatch: Any) -> Path:
    """A config file whose store is in tmp_path; fast retries unless the test says otherwise."""
    path = tmp_path / "radgate.yaml"
    settings = {"retry_base_s": 0.01, "retry_max_s": 0.05, "retry_jitter": 0.0, **dispatch}
    data = {"data_dir": str(tmp_path / "data"), "destinations": destinations, "dispatch": settings}
    path.write_text(yaml.safe_dump(data))
    return path


def load(path: Path) -> Config:
    return load_config(path)


@pytest.fixture()
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """SQLite in the config's data dir; the tests of the outbox's rows and claims also run on
    PostgreSQL (`both_databases`), those of the senders need not."""
    with migrated_store(database_url(request, tmp_path / "data")) as s:
        yield s


def queue_results(
    store: Store, tmp_path: Path, destinations: list[str], count: int = 2
) -> tuple[str, list[Path]]:
    """Write ``count`` tiny CT result files of a new study and queue them; returns (study UID, files)."""
    study_uid = generate_uid()
    files = write_series(tmp_path / "results" / study_uid, count, study_uid=study_uid)
    job_id = make_job(store)
    with store.session() as s:
        enqueue_deliveries(s, job_id, [(f.stem, f) for f in files], destinations)
    return study_uid, files


def rows(store: Store) -> list[Delivery]:
    with store.session() as s:
        return list(s.scalars(select(Delivery).order_by(Delivery.id)))


def states(store: Store) -> set[str]:
    return {r.state for r in rows(store)}


def until_settled(dispatcher: Dispatcher, store: Store, timeout: float = 20.0) -> None:
    """Run rounds until no delivery is PENDING or SENDING (retries are due within milliseconds)."""

    def settled() -> bool:
        dispatcher.run_once()
        return not states(store) & {DeliveryState.PENDING, DeliveryState.SENDING}

    wait_until(settled, timeout, "every delivery SENT or DEAD", interval=0.02)


def dicom_destination(port: int, ae_title: str = "ORTHANC") -> dict[str, Any]:
    return {"kind": "dicom", "host": "127.0.0.1", "port": port, "ae_title": ae_title}


@pytest.fixture()
def orthanc_later(monkeypatch: pytest.MonkeyPatch) -> Iterator[OrthancServer]:
    """An Orthanc not started yet whose HTTP and DICOM ports are chosen now (a destination that is down)."""
    ports = (free_port(), free_port())
    monkeypatch.setattr(orthanc_server, "free_port", itertools.cycle(ports).__next__)
    server = OrthancServer(dicomweb=True)
    server.http_port, server.dicom_port = ports
    yield server
    server.stop()


def start(server: OrthancServer) -> None:
    try:
        server.start(attempts=1)
    except ToolNotFoundError as exc:
        pytest.skip(str(exc))


class CountingSCP:
    """A pynetdicom Storage SCP that counts C-STOREs per SOP Instance UID and answers chosen statuses."""

    def __init__(self, statuses: dict[str, int], tls: ssl.SSLContext | None = None) -> None:
        self.statuses = statuses
        self.received: Counter[str] = Counter()
        self._lock = threading.Lock()
        self.port = free_port()
        ae = AE(ae_title="COUNTER")
        ae.supported_contexts = AllStoragePresentationContexts
        server = ae.start_server(
            ("127.0.0.1", self.port),
            block=False,
            evt_handlers=[(evt.EVT_C_STORE, self._on_store)],
            ssl_context=tls,
        )
        assert server is not None
        self.server = server

    def _on_store(self, event: evt.Event) -> int:
        uid = str(event.dataset.SOPInstanceUID)
        with self._lock:
            self.received[uid] += 1
        return self.statuses.get(uid, 0x0000)

    def shutdown(self) -> None:
        self.server.shutdown()


# --- the seam with the executor ----------------------------------------------------------------


@both_databases
def test_one_row_per_result_and_destination_and_idempotent(store: Store, tmp_path: Path) -> None:
    job_id = make_job(store)
    results = [("1.2.3.1", tmp_path / "a.dcm"), ("1.2.3.2", tmp_path / "b.dcm")]
    with store.session() as s:
        assert enqueue_deliveries(s, job_id, results, ["pacs", "web", "pacs"]) == 4
    with store.session() as s:
        assert enqueue_deliveries(s, job_id, results, ["pacs", "web"]) == 0
        assert enqueue_deliveries(s, job_id, [*results, ("1.2.3.3", tmp_path / "c.dcm")], ["web"]) == 1
    found = rows(store)
    assert len(found) == 5
    assert {r.state for r in found} == {DeliveryState.PENDING}
    assert {r.attempts for r in found} == {0}
    assert found[0].file_path == str((tmp_path / "a.dcm").resolve())


def test_no_destinations_queues_nothing(store: Store, tmp_path: Path) -> None:
    job_id = make_job(store)
    with store.session() as s:
        assert enqueue_deliveries(s, job_id, [("1.2.3.1", tmp_path / "a.dcm")], []) == 0
    assert rows(store) == []


@both_databases
def test_rolled_back_with_the_callers_transaction(store: Store, tmp_path: Path) -> None:
    job_id = make_job(store)
    with pytest.raises(RuntimeError), store.session() as s:
        enqueue_deliveries(s, job_id, [("1.2.3.1", tmp_path / "a.dcm")], ["pacs"])
        raise RuntimeError("the executor failed before marking the job SUCCEEDED")
    assert rows(store) == []


# --- store-level behaviour -----------------------------------------------------------------------


def test_backoff_doubles_is_capped_and_jitter_only_shortens() -> None:
    config = DispatchConfig(retry_base_s=10, retry_max_s=100, retry_jitter=0.0)
    assert [backoff_delay(n, config, random.Random(1)).total_seconds() for n in range(1, 6)] == [
        10,
        20,
        40,
        80,
        100,
    ]
    jittered = DispatchConfig(retry_base_s=10, retry_max_s=100, retry_jitter=0.5)
    rng = random.Random(2)
    delays = [backoff_delay(3, jittered, rng).total_seconds() for _ in range(200)]
    assert all(20 <= d <= 40 for d in delays) and len(set(delays)) > 100


@both_databases
def test_claims_are_exclusive_and_stale_claims_return(store: Store, tmp_path: Path) -> None:
    config = load(make_config(tmp_path, {}, batch_size=3, max_attempts=2))
    queue_results(store, tmp_path, ["nowhere"], count=5)
    first, second = Dispatcher(store, config), Dispatcher(store, config)
    a, b = first.claim("nowhere"), second.claim("nowhere")
    assert len(a) == 3 and len(b) == 2 and not {c.id for c in a} & {c.id for c in b}
    assert second.claim("nowhere") == []
    # the first dispatcher's node dies; its claim runs out
    with store.session() as s:
        s.execute(
            update(Delivery)
            .where(Delivery.lease_owner == first.owner)
            .values(lease_expires_at=utcnow() - timedelta(seconds=1))
        )
    assert second.release_stale_claims() == 3
    assert sorted(c.id for c in second.claim("nowhere")) == sorted(c.id for c in a)
    # once more at max attempts (2): DEAD instead of another round
    with store.session() as s:
        s.execute(update(Delivery).values(lease_expires_at=utcnow() - timedelta(seconds=1)))
    second.release_stale_claims()
    by_state = Counter(r.state for r in rows(store))
    assert by_state == {DeliveryState.DEAD: 3, DeliveryState.PENDING: 2}


def test_unknown_destination_and_missing_file_fail_then_dead(store: Store, tmp_path: Path) -> None:
    config = load(make_config(tmp_path, {"pacs": dicom_destination(free_port())}, max_attempts=2))
    _, files = queue_results(store, tmp_path, ["gone", "pacs"], count=1)
    files[0].unlink()
    until_settled(Dispatcher(store, config), store)
    errors = {r.destination: (r.state, r.attempts, r.last_error or "") for r in rows(store)}
    assert errors["gone"][:2] == (DeliveryState.DEAD, 2) and "not configured" in errors["gone"][2]
    assert errors["pacs"][:2] == (DeliveryState.DEAD, 2) and "result file missing" in errors["pacs"][2]


# --- real peers ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["dicom", "dicomweb", "orthanc"])
def test_each_sender_delivers_to_orthanc(
    kind: str, orthanc: OrthancServer, store: Store, tmp_path: Path
) -> None:
    destination = {
        "dicom": dicom_destination(orthanc.dicom_port),
        "dicomweb": {"kind": "dicomweb", "url": orthanc.dicomweb_url},
        "orthanc": {"kind": "orthanc", "url": orthanc.url},
    }[kind]
    if kind == "dicomweb" and not orthanc.dicomweb:
        pytest.skip("the Orthanc DICOMweb plugin is not installed")
    config = load(make_config(tmp_path, {"archive": destination}))
    study_uid, files = queue_results(store, tmp_path, ["archive"], count=3)
    assert Dispatcher(store, config).run_once() == 3
    assert [(r.state, r.attempts, r.last_error) for r in rows(store)] == [(DeliveryState.SENT, 1, None)] * 3
    stored = orthanc.instances_of_study(study_uid)
    assert sorted(i["MainDicomTags"]["SOPInstanceUID"] for i in stored) == sorted(f.stem for f in files)


def test_destination_down_then_up_arrives_once(
    orthanc_later: OrthancServer, store: Store, tmp_path: Path
) -> None:
    destinations = {
        "pacs": dicom_destination(orthanc_later.dicom_port),
        "web": {"kind": "dicomweb", "url": f"http://127.0.0.1:{orthanc_later.http_port}/dicom-web"},
    }
    config = load(make_config(tmp_path, destinations, retry_base_s=30, retry_max_s=60, max_attempts=5))
    study_uid, files = queue_results(store, tmp_path, ["pacs", "web"], count=2)
    before = utcnow()
    dispatcher = Dispatcher(store, config)
    assert dispatcher.run_once() == 4
    for row in rows(store):
        assert (row.state, row.attempts) == (DeliveryState.PENDING, 1)
        assert "connection refused" in (row.last_error or "")
        assert row.next_attempt_at is not None and row.next_attempt_at >= before + timedelta(seconds=24)
    assert dispatcher.run_once() == 0  # not due yet: the backoff holds

    start(orthanc_later)
    with store.session() as s:  # time passes: the retry falls due
        s.execute(update(Delivery).values(next_attempt_at=utcnow()))
    assert dispatcher.run_once() == 4
    assert [(r.state, r.attempts, r.last_error) for r in rows(store)] == [(DeliveryState.SENT, 2, None)] * 4
    stored = orthanc_later.instances_of_study(study_uid)
    assert sorted(i["MainDicomTags"]["SOPInstanceUID"] for i in stored) == sorted(f.stem for f in files)
    assert orthanc_later.rest_get("/statistics")["CountInstances"] == 2


def test_dead_after_max_attempts_listed_and_retried_by_the_cli(
    orthanc_later: OrthancServer, store: Store, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config_path = make_config(tmp_path, {"pacs": dicom_destination(orthanc_later.dicom_port)}, max_attempts=2)
    study_uid, _ = queue_results(store, tmp_path, ["pacs"], count=2)
    dispatcher = Dispatcher(store, load(config_path))
    until_settled(dispatcher, store)

    assert main(["deliveries", "--json", "--config", str(config_path)]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(d["state"], d["attempts"], d["destination"]) for d in listed] == [("DEAD", 2, "pacs")] * 2
    assert all("connection refused" in d["last_error"] for d in listed)
    assert {"job_id", "sop_instance_uid", "next_attempt_at"} <= set(listed[0])

    start(orthanc_later)
    assert main(["deliveries", "retry", "--config", str(config_path), str(listed[0]["id"])]) == 0
    assert [r.state for r in rows(store)] == [DeliveryState.PENDING, DeliveryState.DEAD]
    assert main(["deliveries", "retry", "--all-dead", "--config", str(config_path)]) == 0
    assert main(["deliveries", "retry", "--config", str(config_path), str(listed[0]["id"])]) == 1  # not DEAD
    capsys.readouterr()
    assert [(r.state, r.attempts) for r in rows(store)] == [(DeliveryState.PENDING, 0)] * 2
    dispatcher.run_once()
    assert [(r.state, r.attempts) for r in rows(store)] == [(DeliveryState.SENT, 1)] * 2
    assert len(orthanc_later.instances_of_study(study_uid)) == 2

    assert main(["deliveries", "--config", str(config_path)]) == 0
    table = capsys.readouterr().out
    assert "SENT" in table and "pacs" in table


@both_databases
def test_restart_resends_only_the_claim_left_by_a_dead_node(
    orthanc: OrthancServer, store: Store, tmp_path: Path
) -> None:
    """A node dies after Orthanc stored the instance but before SENT was committed: the next
    dispatcher sends it again (at least once), Orthanc keeps one instance per SOP Instance UID,
    and the rows already SENT are not sent again."""
    config_path = make_config(tmp_path, {"pacs": dicom_destination(orthanc.dicom_port)}, batch_size=2)
    study_uid, files = queue_results(store, tmp_path, ["pacs"], count=3)
    crashed = Dispatcher(store, load(config_path))
    assert crashed.send_batch("pacs") == 2  # two SENT
    [claimed] = crashed.claim("pacs")
    target = load(config_path).destinations["pacs"]
    outcome = make_sender(target, "RADGATE", 10).send(
        [Outgoing(claimed.id, claimed.sop_instance_uid, Path(claimed.file_path))]
    )
    assert outcome == {claimed.id: None}  # stored in Orthanc; the node dies before recording it
    assert len(orthanc.instances_of_study(study_uid)) == 3
    with store.session() as s:  # the dead node's claim runs out
        s.execute(update(Delivery).where(Delivery.id == claimed.id).values(lease_expires_at=utcnow()))

    restarted_store = Store(store.url)
    try:
        restarted = Dispatcher(restarted_store, load(config_path))
        assert restarted.run_once() == 1  # only the orphaned claim
        assert restarted.run_once() == 0
    finally:
        restarted_store.dispose()
    assert [(r.state, r.attempts) for r in rows(store)] == [
        (DeliveryState.SENT, 1),
        (DeliveryState.SENT, 1),
        (DeliveryState.SENT, 2),
    ]
    stored = orthanc.instances_of_study(study_uid)
    assert sorted(i["MainDicomTags"]["SOPInstanceUID"] for i in stored) == sorted(f.stem for f in files)
    assert orthanc.rest_get("/statistics")["CountInstances"] == 3


def test_cstore_statuses_failure_retried_warning_sent(store: Store, tmp_path: Path) -> None:
    _, files = queue_results(store, tmp_path, ["pacs"], count=3)
    refused, warned, fine = (f.stem for f in files)
    scp = CountingSCP({refused: 0xA700, warned: 0xB000})
    try:
        config = load(
            make_config(
                tmp_path, {"pacs": dicom_destination(scp.port, "COUNTER")}, retry_base_s=30, retry_max_s=60
            )
        )
        dispatcher = Dispatcher(store, config)
        assert dispatcher.run_once() == 3
        assert dispatcher.run_once() == 0
    finally:
        scp.shutdown()
    by_uid = {r.sop_instance_uid: r for r in rows(store)}
    assert by_uid[warned].state == by_uid[fine].state == DeliveryState.SENT
    assert by_uid[refused].state == DeliveryState.PENDING
    assert "C-STORE status 0xA700" in (by_uid[refused].last_error or "")
    assert scp.received == {refused: 1, warned: 1, fine: 1}  # one association, each sent once


def test_credentials_never_in_errors_or_logs(
    store: Store, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server = OrthancServer(dicomweb=True, credentials=("radgate", SECRET))
    start(server)
    try:
        wrong = {"kind": "orthanc", "url": server.url, "username": "radgate", "password": f"{SECRET}-old"}
        web = {
            "kind": "dicomweb",
            "url": server.dicomweb_url,
            "auth": {"type": "basic", "username": "radgate", "password": SECRET},
        }
        config = load(make_config(tmp_path, {"old": wrong, "web": web}, max_attempts=1))
        study_uid, _ = queue_results(store, tmp_path, ["old", "web"], count=1)
        with caplog.at_level(logging.DEBUG):
            Dispatcher(store, config).run_once()
        by_dest = {r.destination: r for r in rows(store)}
        assert by_dest["web"].state == DeliveryState.SENT
        assert len(server.instances_of_study(study_uid)) == 1
        assert by_dest["old"].state == DeliveryState.DEAD
        assert "HTTP 401" in (by_dest["old"].last_error or "")
        assert SECRET not in caplog.text and SECRET not in (by_dest["old"].last_error or "")
        assert "delivery" in caplog.text  # the failure was logged, without the secret
    finally:
        server.stop()


def test_node_threads_send_and_stop(orthanc: OrthancServer, store: Store, tmp_path: Path) -> None:
    config = load(make_config(tmp_path, {"pacs": dicom_destination(orthanc.dicom_port)}, workers=2))
    study_uid, _ = queue_results(store, tmp_path, ["pacs"], count=2)
    dispatcher = Dispatcher(store, config)
    dispatcher.start()
    try:
        orthanc.wait_for_instances(study_uid, 2)
        wait_until(lambda: states(store) == {DeliveryState.SENT}, 10, "deliveries recorded SENT")
    finally:
        dispatcher.stop()
    assert not any(t.is_alive() for t in threading.enumerate() if t.name.startswith("dispatch-"))


def test_cstore_over_tls_verifies_the_peer(store: Store, tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    self_signed_cert(key, cert, "/CN=localhost", "subjectAltName=IP:127.0.0.1")
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)
    _, files = queue_results(store, tmp_path, ["trusted", "untrusted"], count=1)
    scp = CountingSCP({}, tls=server_context)
    try:
        trusted = {**dicom_destination(scp.port, "COUNTER"), "tls": {"ca_file": str(cert)}}
        untrusted = {**dicom_destination(scp.port, "COUNTER"), "tls": {}}  # the system CAs do not know it
        config = load(make_config(tmp_path, {"trusted": trusted, "untrusted": untrusted}, max_attempts=1))
        Dispatcher(store, config).run_once()
    finally:
        scp.shutdown()
    by_dest = {r.destination: r for r in rows(store)}
    assert by_dest["trusted"].state == DeliveryState.SENT
    assert by_dest["untrusted"].state == DeliveryState.DEAD
    assert "TLS error" in (by_dest["untrusted"].last_error or "")
    assert "CERTIFICATE_VERIFY_FAILED" in (by_dest["untrusted"].last_error or "")
    assert "TLS" in (by_dest["untrusted"].last_error or "") or "association" in (
        by_dest["untrusted"].last_error or ""
    )
    assert scp.received == {files[0].stem: 1}


@both_databases
def test_two_nodes_on_one_store_send_each_instance_once(store: Store, tmp_path: Path) -> None:
    """Two dispatchers (as two node processes would), two threads each, on one store."""
    _, files = queue_results(store, tmp_path, ["pacs"], count=12)
    scp = CountingSCP({})
    nodes = []
    try:
        counter = {"pacs": dicom_destination(scp.port, "COUNTER")}
        config = load(make_config(tmp_path, counter, workers=2, batch_size=2, poll_interval_s=0.05))
        nodes = [Dispatcher(Store(store.url), config) for _ in range(2)]
        for node in nodes:
            node.start()
        wait_until(lambda: states(store) == {DeliveryState.SENT}, 30, "every delivery SENT")
    finally:
        for node in nodes:
            node.stop()
            node.store.dispose()
        scp.shutdown()
    assert scp.received == {f.stem: 1 for f in files}
    assert {r.attempts for r in rows(store)} == {1}


def test_woken_sending_threads_send_at_once_and_stop_without_waiting_for_their_poll(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Threads that poll every 600 s: only `wake` can get the deliveries sent within the deadline, and
    `stop` returns at once."""
    scp = CountingSCP({})
    try:
        counter = {"pacs": dicom_destination(scp.port, "COUNTER")}
        config = load(make_config(tmp_path, counter, workers=2, poll_interval_s=600))
        dispatcher = Dispatcher(store, config)
        rounds: list[int] = []  # one entry per finished round, even one that raised
        run_once = dispatcher.run_once

        def counted() -> int:
            handled = -1
            try:
                handled = run_once()
                return handled
            finally:
                rounds.append(handled)

        monkeypatch.setattr(dispatcher, "run_once", counted)
        dispatcher.start()
        try:
            # each thread's first round is over (nothing was queued): both now wait out their poll
            wait_until(lambda: len(rounds) == 2, 30, "each thread's first round")
            assert set(rounds) <= {0, -1}
            _, files = queue_results(store, tmp_path, ["pacs"], count=2)
            dispatcher.wake()
            wait_until(lambda: states(store) == {DeliveryState.SENT}, 30, "the woken threads to send")
        finally:
            stopping = threading.Thread(target=dispatcher.stop)
            stopping.start()
            stopping.join(60)
        assert not stopping.is_alive(), "stop waited for the threads' poll"
    finally:
        scp.shutdown()
    assert scp.received == {f.stem: 1 for f in files}


def test_stow_batch_with_a_bad_part_stores_the_rest(
    orthanc: OrthancServer, store: Store, tmp_path: Path
) -> None:
    if not orthanc.dicomweb:
        pytest.skip("the Orthanc DICOMweb plugin is not installed")
    config = load(
        make_config(tmp_path, {"web": {"kind": "dicomweb", "url": orthanc.dicomweb_url}}, max_attempts=1)
    )
    study_uid, files = queue_results(store, tmp_path, ["web"], count=2)
    files[1].write_bytes(b"\0" * 128 + b"DICM" + b"not a data set")
    Dispatcher(store, config).run_once()
    good, bad = rows(store)
    assert (good.state, good.last_error) == (DeliveryState.SENT, None)
    assert bad.state == DeliveryState.DEAD and "not listed as stored" in (bad.last_error or "")
    assert [i["MainDicomTags"]["SOPInstanceUID"] for i in orthanc.instances_of_study(study_uid)] == [
        files[0].stem
    ]
