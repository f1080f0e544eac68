"""Fetch without a network: the `sources` configuration, the query keys, answers read into matches,
and the requests' backoff and claims in a SQLite store."""

from __future__ import annotations

import contextlib
import datetime
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from pydicom import Dataset
from sqlalchemy import select, update
from support.node import instance_record

from plugin.config import Config, ConfigError, DicomSource, DicomWebSource, load_config
from plugin.fetch import FetchWorker, Routing, completion_hook, get_fetch, request_fetch
from plugin.fetch.query import series_match, study_filters, study_match
from plugin.ingest.receive import Receiver
from plugin.route.rules import validate_rules
from plugin.store.engine import Store
from plugin.store.models import FetchRequest, Study, utcnow


def _load(tmp_path: Path, settings: dict[str, object]) -> Config:
    path = tmp_path / "radgate.yaml"
    path.write_text(yaml.safe_dump(settings))
    return load_config(path)


def test_a_dicom_source_calls_and_moves_to_our_own_ae_title_by_default(tmp_path: Path) -> None:
    pacs = {"kind": "dicom", "host": "pacs", "port": 104, "ae_title": "PACS01"}
    config = _load(
        tmp_path,
        {
            "dicom": {"ae_title": "NODE7"},
            "sources": {
                "pacs": pacs,
                "other": {
                    **pacs,
                    "calling_ae_title": "ME",
                    "move_destination": "ELSEWHERE",
                    "retrieve": "get",
                },
                "vna": {
                    "kind": "dicomweb",
                    "url": "https://vna/dicom-web/",
                    "auth": {"type": "bearer", "token": "t"},
                },
            },
        },
    )
    pacs_source, other, vna = config.sources["pacs"], config.sources["other"], config.sources["vna"]
    assert isinstance(pacs_source, DicomSource) and isinstance(other, DicomSource)
    assert (pacs_source.calling_ae_title, pacs_source.move_destination, pacs_source.retrieve) == (
        "NODE7",
        "NODE7",
        "move",
    )
    assert (other.calling_ae_title, other.move_destination, other.retrieve) == ("ME", "ELSEWHERE", "get")
    assert isinstance(vna, DicomWebSource) and vna.url == "https://vna/dicom-web"
    assert config.fetch.max_attempts == 5 and Config().sources == {}
    moved = config.with_overrides(**{"dicom.ae_title": "NODE8"}).sources  # `serve --ae-title NODE8`
    ae_titles = {
        n: (s.calling_ae_title, s.move_destination) for n, s in moved.items() if isinstance(s, DicomSource)
    }
    assert ae_titles == {"pacs": ("NODE8", "NODE8"), "other": ("ME", "ELSEWHERE")}


@pytest.mark.parametrize(
    ("source", "named"),
    [
        ({"kind": "dicom", "host": "h", "port": 104, "ae_title": "A" * 17}, "sources.pacs.dicom.ae_title"),
        ({"kind": "dicom", "host": "h", "port": 104, "ae_title": "P", "retrieve": "copy"}, "retrieve"),
        ({"kind": "dicomweb", "url": "ftp://pacs"}, "sources.pacs.dicomweb.url"),
        ({"kind": "wado", "url": "http://pacs"}, "sources.pacs"),
    ],
)
def test_a_wrong_source_is_refused_with_its_key(
    tmp_path: Path, source: dict[str, object], named: str
) -> None:
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        _load(tmp_path, {"sources": {"pacs": source}})


def test_the_example_file_shows_the_fetch_defaults() -> None:
    example = load_config(Path(__file__).resolve().parents[2] / "radgate.example.yaml")
    assert example.fetch == Config().fetch and example.sources == {}


def test_fetch_delays_must_be_in_order(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="retry_max_s must not be below retry_base_s"):
        _load(tmp_path, {"fetch": {"retry_base_s": 60, "retry_max_s": 10}})


def test_query_keys_and_a_date_strictly_before() -> None:
    keys = study_filters(
        patient_id="P1", accession=None, study_uid=None, modality="CT", before=datetime.date(2024, 3, 1)
    )
    assert keys == {"PatientID": "P1", "ModalitiesInStudy": "CT", "StudyDate": "-20240229"}
    with pytest.raises(ValueError, match="at least one of"):
        study_filters(patient_id=None, accession=None, study_uid=None, modality=None, before=None)


def test_answers_become_matches_and_odd_values_are_none() -> None:
    ds = Dataset()
    ds.StudyInstanceUID = "1.2.3"
    ds.PatientID = "P1"
    with pytest.warns(UserWarning, match="Invalid value for VR DA"):  # as a PACS may answer
        ds.StudyDate = "20241399"
    ds.ModalitiesInStudy = ["CT", "SR"]
    match = study_match(ds)
    assert match is not None
    assert (match.study_date, match.modalities, match.accession, match.description) == (
        None,
        ("CT", "SR"),
        None,
        None,
    )
    assert study_match(Dataset()) is None
    series = Dataset()
    series.SeriesInstanceUID = "1.2.3.4"
    series.SeriesNumber = "3"
    series.NumberOfSeriesRelatedInstances = ""
    found = series_match(series)
    assert found is not None and (found.number, found.instance_count, found.modality) == (3, None, None)


@contextlib.contextmanager
def _two_nodes(
    tmp_path: Path, fetch: dict[str, int]
) -> Iterator[tuple[Config, Store, FetchWorker, FetchWorker]]:
    """The configuration (source ``pacs``, these ``fetch`` keys), a migrated store, and the fetch
    workers of two nodes on it."""
    config = _load(
        tmp_path,
        {
            "data_dir": str(tmp_path / "data"),
            "sources": {"pacs": {"kind": "dicom", "host": "127.0.0.1", "port": 9, "ae_title": "P"}},
            "fetch": fetch,
        },
    )
    store = Store(config.db_url)
    store.migrate()
    try:
        routing = Routing(validate_rules(config, ["ct-lung"]), config.spool_dir, ())
        one, two = (FetchWorker(store, config, Receiver(config), routing) for _ in range(2))
        two.owner = "another-node"
        yield config, store, one, two
    finally:
        store.dispose()


def test_a_request_is_claimed_once_and_retried_with_backoff_then_failed(tmp_path: Path) -> None:
    fetch = {"retry_base_s": 10, "retry_max_s": 15, "max_attempts": 3}
    with _two_nodes(tmp_path, fetch) as (config, store, one, two):
        request_id = request_fetch(store, "pacs", accession="A1", reason="test")
        with pytest.raises(ValueError, match="Study Instance UID or an accession"):
            request_fetch(store, "pacs", reason="test")
        claimed = one.claim()
        assert claimed is not None and claimed.attempts == 1
        assert two.claim() is None  # leased to the first
        later = utcnow() + datetime.timedelta(seconds=config.fetch.lease_s + 1)
        taken_over = two.claim(now=later)  # the first node stopped renewing: taken over
        assert taken_over is not None and taken_over.attempts == 2
        one._retry_or_fail(claimed, "connection refused")  # lost its claim: changes nothing
        status = get_fetch(store, request_id)
        assert status is not None and status.state == "RUNNING" and status.error is None
        two._retry_or_fail(taken_over, "connection refused")
        status = get_fetch(store, request_id)
        assert status is not None and status.state == "QUEUED" and status.next_attempt_at is not None
        delay = (status.next_attempt_at - status.updated_at).total_seconds()
        assert 14 < delay <= 15  # 10 s doubled, capped at retry_max_s
        assert two.claim() is None  # not due yet
        last = two.claim(now=utcnow() + datetime.timedelta(seconds=16))
        assert last is not None and last.attempts == 3
        two._retry_or_fail(last, "connection refused")
        status = get_fetch(store, request_id)
        assert status is not None and status.state == "FAILED"
        assert status.error == "connection refused (after 3 attempts)"


def test_a_request_taken_over_after_its_last_attempt_fails_and_wildcards_are_refused(tmp_path: Path) -> None:
    with _two_nodes(tmp_path, {"max_attempts": 1}) as (config, store, one, two):
        request_id = request_fetch(store, "pacs", study_uid="1.2.3", reason="test")
        assert one.claim() is not None  # ... and this node dies
        assert two.work_one(now=utcnow() + datetime.timedelta(seconds=config.fetch.lease_s + 1))
        status = get_fetch(store, request_id)
        assert status is not None and status.state == "FAILED"
        assert status.error == "node lost (lease expired) and all 1 attempts used"
        for accession in ("ACC*", "AC?", "A\\B", "A" * 17):
            with pytest.raises(ValueError, match="at most 16 characters"):
                request_fetch(store, "pacs", accession=accession, reason="test")


def test_completion_waits_for_a_request_that_retrieves_or_will_try_again(
    store: Store, config: Config, caplog: pytest.LogCaptureFixture
) -> None:
    """Routed as usual while a request has not been tried; held while one retrieves or waits to
    try again; the requests that retrieved it run once that is over."""
    caplog.set_level("INFO", logger="plugin")
    study_uid = "1.2.826.0.1.3680043.8.498.1"
    assert store.recorder.record_instance(instance_record(study_uid))
    hook = completion_hook(Routing(validate_rules(config, ["ct-lung"]), config.spool_dir, ()))
    first = request_fetch(store, "pacs", study_uid=study_uid, reason="test")
    second = request_fetch(store, "pacs", study_uid=study_uid, reason="test")

    def complete(**first_values: object) -> None:
        with store.session() as s:
            if first_values:
                s.execute(update(FetchRequest).where(FetchRequest.id == first).values(**first_values))
            hook(s, s.scalars(select(Study).where(Study.study_uid == study_uid)).one())

    complete()  # neither was tried: a study sent meanwhile is routed as usual
    assert f"study {study_uid} revision 1: no job" in caplog.text
    caplog.clear()
    retrieved = {"state": "RUNNING", "retrieved_at": utcnow()}
    with store.session() as s:
        s.execute(update(FetchRequest).where(FetchRequest.id == second).values(**retrieved))
    for waiting in ({"state": "QUEUED", "attempts": 1}, {"state": "RUNNING", "attempts": 1}):
        complete(**waiting)
        assert f"its jobs wait for fetch request(s) [{first}]" in caplog.text
        assert "no job" not in caplog.text
    complete(**retrieved)  # both retrieved: the rules run once for both
    assert caplog.text.count("no job") == 1
    statuses = [get_fetch(store, request_id) for request_id in (first, second)]
    assert [(s.state, s.jobs) for s in statuses if s is not None] == [("DONE", ()), ("DONE", ())]
