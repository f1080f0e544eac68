"""The console's reads from the store (overview, search, timeline) and the pauses the stages honour."""

from __future__ import annotations

from datetime import date, timedelta
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid
from sqlalchemy import select, update
from support.execute import add_job, spool_files
from support.node import ct_instance

from plugin.config import Config, ConfigError, load_config
from plugin.dispatch.outbox import Dispatcher, enqueue_deliveries
from plugin.ingest.spool import _tags
from plugin.jobs.queue import queue_routed_jobs, record_steps, rules_in_force
from plugin.route.rules import plan_study, validate_rules
from plugin.route.selection import SeriesInfo
from plugin.store.engine import Store
from plugin.store.models import Delivery, DeliveryState, Job, JobState, Reception, Study, StudyState, utcnow
from plugin.store.pauses import PauseKind, set_paused
from plugin.store.reports import (
    StudyFilterState,
    StudyQuery,
    overview,
    search_studies,
    study_status,
    study_timeline,
)


def _study(
    tmp_path: Path, accession: str, patient_id: str, study_date: str, slices: int = 2, **attrs: str
) -> list[Path]:
    """One series of a new study, with the identifying attributes the search looks at."""
    study_uid, series_uid = generate_uid(), generate_uid()
    folder = tmp_path / "src" / study_uid
    folder.mkdir(parents=True)
    paths = []
    for k in range(slices):
        ds = ct_instance(study_uid, series_uid, k + 1)
        ds.AccessionNumber, ds.PatientID, ds.StudyDate = accession, patient_id, study_date
        ds.PatientName = "DOE^JANE"
        for keyword, value in attrs.items():
            setattr(ds, keyword, value)
        path = folder / f"{k}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _uid(path: Path) -> tuple[str, str]:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)


def _set(store: Store, job_id: int, **values: object) -> None:
    with store.session() as s:
        job = s.get_one(Job, job_id)
        for key, value in values.items():
            setattr(job, key, value)


def _complete(store: Store, study_uid: str) -> None:
    with store.session() as s:
        study = s.scalars(select(Study).where(Study.study_uid == study_uid)).one()
        study.state, study.completed_at = StudyState.COMPLETE, utcnow()


def test_header_tags_keep_patient_id_name_and_a_valid_study_date() -> None:
    ds = ct_instance(generate_uid(), generate_uid(), 1)
    ds.PatientName, ds.StudyDate, ds.AccessionNumber = "DOE^JANE", "20240131", " A1 "
    tags = _tags(ds)
    assert (tags.patient_id, tags.patient_name, tags.study_date, tags.accession_number) == (
        "PHANTOM", "DOE^JANE", "20240131", "A1",
    )  # fmt: skip
    with pytest.warns(UserWarning, match="Invalid value for VR DA"):
        ds.StudyDate = "2024-1-3"  # not a DA: kept out of the store, the instance is still taken
    assert _tags(ds).study_date is None


def test_search_by_accession_patient_date_and_state(store: Store, config: Config, tmp_path: Path) -> None:
    a = _study(tmp_path, "ACC100", "PAT-1", "20240110")
    b = _study(tmp_path, "ACC200", "PAT-2", "20240215")
    c = _study(tmp_path, "XYZ300", "PAT-1", "20240320")
    for files in (a, b, c):
        spool_files(store, config, files)
    (ua, sa), (ub, sb), (uc, _) = _uid(a[0]), _uid(b[0]), _uid(c[0])
    failed = add_job(store, ub, sb, "ct-lung")
    _set(store, failed, state=JobState.FAILED, error="no lung found in this series")
    done = add_job(store, ua, sa, "ct-lung")
    _set(store, done, state=JobState.SUCCEEDED)
    with store.session() as s:
        enqueue_deliveries(s, done, [("1.2.9.1", a[0])], ["pacs"])
        s.execute(update(Delivery).values(state=DeliveryState.DEAD))

    def found(**criteria: object) -> list[str]:
        with store.session() as s:
            page = search_studies(s, StudyQuery(**criteria))  # type: ignore[arg-type]
        assert page.total == len(page.studies)
        return [row.study_uid for row in page.studies]

    assert found() == [uc, ub, ua]  # the latest received first
    assert found(accession="ACC*") == [ub, ua]
    assert found(accession="ACC1?0") == [ua]
    assert found(accession="acc100") == []  # exact, as DICOM matches
    assert found(patient_id="PAT-1") == [uc, ua]
    assert found(date_from=date(2024, 2, 1)) == [uc, ub]
    assert found(date_from=date(2024, 2, 1), date_to=date(2024, 2, 29)) == [ub]
    assert found(state=StudyFilterState.FAILED) == [ub]
    assert found(state=StudyFilterState.DEAD) == [ua]
    assert found(state=StudyFilterState.RECEIVING) == [uc, ub, ua]
    assert found(accession="100%") == []  # SQL's wildcards are literal
    with store.session() as s:
        page = search_studies(s, StudyQuery(limit=2, offset=1))
        [row] = search_studies(s, StudyQuery(accession="ACC200")).studies
    assert (page.total, [r.study_uid for r in page.studies]) == (3, [ub, ua])
    assert (row.patient_id, row.patient_name, row.study_date, row.instances, row.series) == (
        "PAT-2", "DOE^JANE", "20240215", 2, 1,
    )  # fmt: skip
    assert (row.jobs, row.status) == ({"FAILED": 1}, "receiving")


def test_a_study_status_says_where_it_is_stuck() -> None:
    assert study_status("RECEIVING", {"FAILED": 1}, {}) == "receiving"
    assert study_status("COMPLETE", {"RUNNING": 1, "FAILED": 1}, {"DEAD": 1}) == "running"
    assert study_status("COMPLETE", {"SUCCEEDED": 1}, {"DEAD": 1, "SENT": 3}) == "dead"
    assert study_status("COMPLETE", {"SUCCEEDED": 1}, {"PENDING": 1, "SENT": 3}) == "sending"
    assert study_status("COMPLETE", {"SUCCEEDED": 1}, {"SENT": 3}) == "delivered"
    assert study_status("COMPLETE", {"SUCCEEDED": 1}, {}) == "done"
    assert study_status("COMPLETE", {}, {}) == "no job"


def test_overview_counts_today_the_queue_running_steps_and_failures(
    store: Store, config: Config, tmp_path: Path
) -> None:
    files = _study(tmp_path, "ACC1", "P1", "20240101", slices=3)
    spool_files(store, config, files)
    study_uid, series_uid = _uid(files[0])
    running, queued, failed = (add_job(store, study_uid, series_uid, "ct-lung") for _ in range(3))
    started = utcnow() - timedelta(seconds=30)
    _set(store, running, state=JobState.RUNNING, started_at=started, attempts=1, lease_owner="host:1:0")
    assert record_steps(store, running, "host:1:0", {"load_s": 1.5})
    assert not record_steps(store, running, "someone-else", {"load_s": 9.0})  # not its lease
    _set(store, failed, state=JobState.FAILED, error="no lung found", finished_at=utcnow())
    with store.session() as s:
        figures = overview(s)
    assert (figures.today.instances, figures.today.studies, figures.studies_in_store) == (3, 1, 1)
    assert figures.today.bytes == sum(f.stat().st_size for f in files)
    assert (figures.queue_depth, figures.failed_today, figures.studies_receiving) == (1, 1, 1)
    [job] = figures.running
    assert (job.id, job.step, job.worker, job.study_uid) == (running, "infer", "host:1:0", study_uid)
    assert 29 <= job.elapsed_s < 120
    assert [(f.id, f.error) for f in figures.recent_failures] == [(failed, "no lung found")]
    assert figures.jobs == {"RUNNING": 1, "QUEUED": 1, "FAILED": 1}
    assert queued not in {job.id for job in figures.running}


def test_timeline_from_first_instance_to_each_delivery(store: Store, config: Config, tmp_path: Path) -> None:
    files = _study(tmp_path, "ACC9", "P9", "20240101")
    spool_files(store, config, files)
    study_uid, series_uid = _uid(files[0])
    now = utcnow()
    with store.session() as s:
        study = s.scalars(select(Study).where(Study.study_uid == study_uid)).one()
        s.add(
            Reception(
                association_key="a1", study_id=study.id, study_revision=1, calling_ae="MODALITY",
                address="10.0.0.5", started_at=now, released_at=now + timedelta(seconds=1),
            )
        )  # fmt: skip
    _complete(store, study_uid)
    job = add_job(store, study_uid, series_uid, "ct-lung")
    timings = {"load_s": 0.5, "infer_s": 2.25, "encode_s": 0.75}
    _set(store, job, state=JobState.SUCCEEDED, timings=timings, started_at=now, finished_at=now, attempts=1)
    with store.session() as s:
        enqueue_deliveries(s, job, [("1.2.9.1", files[0]), ("1.2.9.2", files[1])], ["pacs", "stow"])
        for d in s.scalars(select(Delivery)):
            if d.destination == "pacs":
                d.state, d.sent_at, d.attempts = DeliveryState.SENT, now, 1
            else:
                d.state, d.attempts, d.last_error = DeliveryState.DEAD, 10, "connection refused (stow:443)"
    with store.session() as s:
        timeline = study_timeline(s, study_uid)
        assert study_timeline(s, "1.2.3.4") is None
    assert timeline is not None
    assert timeline.study.status == "dead"
    assert timeline.completion is not None and "released" in timeline.completion
    [item] = timeline.jobs
    assert [(st.name, st.seconds) for st in item.steps] == [("load", 0.5), ("infer", 2.25), ("encode", 0.75)]
    assert {(d.destination, d.state) for d in item.deliveries} == {
        ("pacs", "SENT"), ("stow", "DEAD"),
    }  # fmt: skip
    kinds = [e.kind for e in timeline.events]
    assert kinds[0] == "received" and {"association", "released", "complete", "queued", "succeeded"} <= set(
        kinds
    )
    dead = next(e for e in timeline.events if e.kind == "delivery")
    assert "2 DEAD" in dead.text and "connection refused" in dead.text
    delivered = next(e for e in timeline.events if e.kind == "delivered")
    assert delivered.text.startswith("2 result(s) delivered to pacs")
    assert [e.at for e in timeline.events] == sorted(e.at for e in timeline.events)
    assert [(s.calling_ae, s.instances) for s in timeline.receptions] == [
        ("MODALITY", 0)
    ]  # no AE on the rows


def test_a_paused_rule_is_skipped_with_reason_paused_and_resumed(
    store: Store, config: Config, tmp_path: Path
) -> None:
    files = _study(tmp_path, "ACC5", "P5", "20240101", slices=1, BodyPartExamined="CHEST")
    header = pydicom.dcmread(files[0], stop_before_pixels=True)
    rules = validate_rules(config, ["ct-lung", "mr-brain"])
    series = [SeriesInfo(str(header.SeriesInstanceUID), header, 1)]
    assert set_paused(store, PauseKind.RULE, "chest-ct", True, "operator")
    assert not set_paused(store, PauseKind.RULE, "chest-ct", True, "operator")  # already paused
    with store.session() as s:
        paused = rules_in_force(s, rules)
    decision = plan_study(series, paused).decisions[series[0].series_uid]
    assert decision.action is None
    first = decision.not_matched[0]
    assert (first.rule, first.reasons) == ("chest-ct", ("paused",))
    spool_files(store, config, files)
    _complete(store, str(header.StudyInstanceUID))
    with store.session() as s:
        study = s.scalars(select(Study)).one()
        assert queue_routed_jobs(s, study, rules, config.spool_dir) == []  # routing reads the pause
    assert set_paused(store, PauseKind.RULE, "chest-ct", False)
    with store.session() as s:
        assert plan_study(series, rules_in_force(s, rules)).decisions[series[0].series_uid].rule == "chest-ct"


def test_a_paused_destination_keeps_its_deliveries_waiting(store: Store, tmp_path: Path) -> None:
    config = Config.model_validate(
        {
            "data_dir": str(tmp_path / "data"),
            "destinations": {
                "pacs": {"kind": "dicom", "host": "127.0.0.1", "port": 1, "ae_title": "PACS"},
                "stow": {"kind": "dicomweb", "url": "http://127.0.0.1:1/dicom-web"},
            },
        }
    )
    files = _study(tmp_path, "ACC6", "P6", "20240101", slices=1)
    spool_files(store, config, files)
    job = add_job(store, *_uid(files[0]), "ct-lung")
    with store.session() as s:
        enqueue_deliveries(s, job, [("1.2.9.1", files[0])], ["pacs", "stow"])
    dispatcher = Dispatcher(store, config)
    set_paused(store, PauseKind.DESTINATION, "pacs", True)
    assert dispatcher.due_destinations() == ["stow"]
    assert dispatcher.claim("pacs") == []  # even when asked by name
    with store.session() as s:
        waiting = s.scalars(select(Delivery).where(Delivery.destination == "pacs")).one()
        assert (waiting.state, waiting.attempts) == (DeliveryState.PENDING, 0)
    set_paused(store, PauseKind.DESTINATION, "pacs", False)
    assert sorted(dispatcher.due_destinations()) == ["pacs", "stow"]


def test_viewer_url_template_is_checked_and_quotes_the_uid(tmp_path: Path) -> None:
    path = tmp_path / "radgate.yaml"
    path.write_text("web:\n  viewer_url_template: http://viewer:3000/viewer?StudyInstanceUIDs={study_uid}\n")
    web = load_config(path).web
    assert web.viewer_url("1.2.3") == "http://viewer:3000/viewer?StudyInstanceUIDs=1.2.3"
    assert web.disk_warning_gb == 5.0
    assert Config().web.viewer_url("1.2.3") is None
    for bad in ("http://viewer:3000/viewer", "javascript:alert(1)/{study_uid}"):
        path.write_text(f"web:\n  viewer_url_template: '{bad}'\n")
        with pytest.raises(ConfigError, match="viewer_url_template"):
            load_config(path)
