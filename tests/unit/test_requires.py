"""A rule's `requires`: its config, choosing the prior, and WAITING jobs moved on by the worker
(a real SQLite store, an archive that answers from lists)."""

from __future__ import annotations

import datetime as _dt
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from sqlalchemy import select

from plugin.cli.jobs import print_jobs
from plugin.config import Config, ConfigError, PriorRequirement, _validate
from plugin.jobs.queue import list_jobs, queue_routed_jobs, read_study_series
from plugin.route.requires import (
    PRIOR_RULE,
    ArchiveUnavailable,
    RequirementsWorker,
    choose_prior,
    prior_result,
)
from plugin.route.rules import RuleSet, describe_requirements, format_report, study_report, validate_rules
from plugin.store.engine import Store
from plugin.store.models import Instance, Job, JobState, Series, Study, StudyState, utcnow
from plugin.store.reports import study_status

TODAY = _dt.date(2026, 12, 6)
SOURCE = {"pacs": {"kind": "dicom", "host": "127.0.0.1", "port": 104, "ae_title": "PACS"}}


@dataclass(frozen=True)
class Found:
    study_uid: str
    study_date: _dt.date | None
    modalities: tuple[str, ...] = ("CT",)
    description: str | None = "CT THORAX"
    accession: str | None = None


@dataclass(frozen=True)
class FoundSeries:
    series_uid: str
    modality: str | None
    description: str | None
    number: int | None = None


@dataclass
class FakeArchive:
    found: list[Found] = field(default_factory=list)
    series_found: list[FoundSeries] = field(default_factory=list)
    down: bool = False
    pulls: list[tuple[str, str, tuple[str, ...]]] = field(default_factory=list)
    failed: str | None = None

    def studies(self, source: str, patient_id: str, modality: str | None, before: _dt.date) -> list[Found]:
        if self.down:
            raise ArchiveUnavailable("connection refused")
        return [f for f in self.found if f.study_date is None or f.study_date < before]

    def series(self, source: str, study_uid: str) -> list[FoundSeries]:
        if self.down:
            raise ArchiveUnavailable("connection refused")
        return self.series_found

    def pull(self, source: str, study_uid: str, series_uids: Sequence[str], reason: str) -> int:
        self.pulls.append((source, study_uid, tuple(series_uids)))
        return len(self.pulls)

    def pull_failed(self, request_id: int) -> str | None:
        return self.failed


def _config(config: Config, requires: dict[str, Any], scope: str = "study") -> Config:
    data = config.model_dump(mode="python")
    data["sources"] = SOURCE
    data["rules"] = [
        {
            "name": "chest",
            "scope": scope,
            "match": {"Modality": {"equals": "CT"}},
            "pipeline": "ct-lung",
            "requires": requires,
        }
    ]
    return _validate(data, "test")


def _rules(config: Config) -> RuleSet:
    return validate_rules(config, ["ct-lung"])


def _add_series(
    store: Store, config: Config, study_uid: str, thickness: float = 5.0, description: str = "Thorax 5mm"
) -> str:
    """One CT instance of a new series, into the study's spool and rows (its current revision)."""
    now = utcnow()
    series_uid, sop = generate_uid(), generate_uid()
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study_uid, series_uid, sop
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.Modality, ds.StudyDescription, ds.SeriesDescription = "CT", "CT THORAX", description
    ds.SliceThickness = thickness
    relative = f"{study_uid}/{series_uid}/{sop}.dcm"
    (config.spool_dir / relative).parent.mkdir(parents=True, exist_ok=True)
    pydicom.dcmwrite(config.spool_dir / relative, ds, enforce_file_format=True)
    with store.session() as s:
        study = s.scalars(select(Study).where(Study.study_uid == study_uid)).one()
        series = Series(study_id=study.id, series_uid=series_uid, modality="CT", first_received_at=now)
        s.add(series)
        s.flush()
        s.add(
            Instance(
                study_id=study.id,
                series_id=series.id,
                sop_instance_uid=sop,
                sop_class_uid=ds.SOPClassUID,
                transfer_syntax=ExplicitVRLittleEndian,
                study_revision=study.revision,
                spool_path=relative,
                size=1,
                received_at=now,
            )
        )
    return series_uid


def _study(
    store: Store, config: Config, date: str = "20261206", thickness: float = 5.0, uid: str | None = None
) -> str:
    """A COMPLETE study of one CT series (one instance in the spool)."""
    now = utcnow()
    study_uid = uid or generate_uid()
    with store.session() as s:
        s.add(
            Study(
                study_uid=study_uid,
                revision=1,
                state=StudyState.COMPLETE,
                first_received_at=now,
                revision_started_at=now,
                completed_at=now,
                patient_id="P1",
                study_date=date,
            )
        )
    _add_series(store, config, study_uid, thickness)
    return study_uid


def _route(store: Store, config: Config, study_uid: str) -> list[int]:
    with store.session() as s:
        study = s.query(Study).filter_by(study_uid=study_uid).one()
        return [job.id for job in queue_routed_jobs(s, study, _rules(config), config.spool_dir)]


def _job(store: Store, job_id: int) -> Job:
    with store.session() as s:
        job = s.get(Job, job_id)
        assert job is not None
        s.expunge(job)
        return job


def _texts(job: Job) -> list[str]:
    return [note["text"] for note in (job.needs or {}).get("notes", [])]


def _succeed(store: Store, job_id: int) -> None:
    with store.session() as s:
        job = s.get(Job, job_id)
        assert job is not None
        job.state = JobState.SUCCEEDED


# --- config ----------------------------------------------------------------------------------------


def test_requires_parses_with_defaults(config: Config) -> None:
    checked = _config(
        config,
        {"prior": {"source": "pacs"}, "series": {"match": {"SliceThickness": {"range": {"max": 1.5}}}}},
    )
    requires = checked.rules[0].requires if checked.rules else None
    assert requires is not None and requires.prior is not None and requires.series is not None
    assert requires.prior.same == ("modality",) and requires.prior.deliver is False
    assert requires.series.after_wait == "run" and requires.series.pull_from is None


@pytest.mark.parametrize(
    ("requires", "message"),
    [
        ({"prior": {"source": "archive"}}, "unknown source 'archive' (known: pacs)"),
        ({"series": {"match": {"SliceThikness": {"present": True}}}}, "did you mean SliceThickness"),
        ({}, "requires needs series, prior or both"),
        ({"prior": {"source": "pacs", "same": ["body_part"]}}, "same"),
        ({"series": {"match": {"Modality": {"equals": "CT"}}, "after_wait": "later"}}, "after_wait"),
    ],
)
def test_requires_config_errors_name_the_problem(
    config: Config, requires: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _config(config, requires)


def test_a_required_series_needs_a_study_scope_rule(config: Config) -> None:
    with pytest.raises(ConfigError, match=r"requires\.series needs scope: study"):
        _config(config, {"series": {"match": {"Modality": {"equals": "CT"}}}}, scope="series")
    assert _config(config, {"prior": {"source": "pacs"}}, scope="series").rules  # a prior: any scope


# --- choosing the prior ----------------------------------------------------------------------------


def test_the_most_recent_earlier_study_of_the_same_kind_is_the_prior() -> None:
    found = [
        Found("1.1", _dt.date(2024, 1, 5)),
        Found("1.2", _dt.date(2025, 6, 1)),  # the one
        Found("1.3", _dt.date(2025, 9, 1), modalities=("MR",)),  # newer, another kind
        Found("1.4", TODAY),  # the same day: not before this one
        Found("1.5", _dt.date(2010, 1, 1)),  # too old
        Found("1.6", None),  # undated
        Found("9.9", _dt.date(2025, 12, 1)),  # this study itself
    ]
    requirement = PriorRequirement(source="pacs", max_age_days=3650)
    chosen = choose_prior(found, "9.9", TODAY, requirement, "CT", "CT THORAX")
    assert chosen is not None and chosen.study_uid == "1.2"
    described = PriorRequirement(source="pacs", same=("modality", "study_description"))
    other = [Found("2.1", _dt.date(2025, 1, 1), description="CT ABDOMEN"), Found("2.2", _dt.date(2024, 1, 1))]
    assert choose_prior(other, "9.9", TODAY, described, "CT", "ct thorax ").study_uid == "2.2"  # type: ignore[union-attr]
    assert choose_prior(found[2:5], "9.9", TODAY, requirement, "CT", None) is None


# --- the worker ------------------------------------------------------------------------------------


def test_a_prior_radgate_processed_already_is_used_without_pulling(config: Config, store: Store) -> None:
    config = _config(config, {"prior": {"source": "pacs"}})
    prior_uid = _study(store, config, date="20250102")
    [prior_job] = _route(store, config, prior_uid)  # the prior itself routed earlier, with its own wait
    with store.session() as s:
        s.get_one(Job, prior_job).state = JobState.SUCCEEDED
    [job_id] = _route(store, config, _study(store, config))
    job = _job(store, job_id)
    assert job.state == JobState.WAITING and "waiting for the prior study from pacs" in _texts(job)[0]
    assert study_status(StudyState.COMPLETE, {JobState.WAITING: 1}, {}) == "waiting"
    archive = FakeArchive(found=[Found(prior_uid, _dt.date(2025, 1, 2), accession="A7")])
    RequirementsWorker(store, _rules(config), archive, config.spool_dir).step()
    job = _job(store, job_id)
    assert job.state == JobState.QUEUED and archive.pulls == []
    assert job.needs is not None and job.needs["prior"]["state"] == "found"
    assert job.needs["prior"]["job"] == prior_job
    assert any(
        f"study {prior_uid} (accession A7)" in t and f"result is here (job {prior_job})" in t
        for t in _texts(job)
    )


def test_no_prior_runs_without_comparison_and_says_why(config: Config, store: Store) -> None:
    config = _config(config, {"prior": {"source": "pacs", "max_age_days": 365}})
    [job_id] = _route(store, config, _study(store, config))
    archive = FakeArchive(found=[Found("1.9", _dt.date(2020, 1, 1))])  # too old
    RequirementsWorker(store, _rules(config), archive, config.spool_dir).step()
    job = _job(store, job_id)
    assert job.state == JobState.QUEUED
    prior, note = prior_result(job.needs, config.results_dir)
    assert prior is None and note is not None
    assert "no earlier study of the same kind (modality) within 365 days on pacs" in note
    assert prior_result(None, config.results_dir) == (None, None)  # no prior asked for


def test_a_prior_is_pulled_run_locally_and_then_used(config: Config, store: Store) -> None:
    config = _config(config, {"prior": {"source": "pacs"}})
    [job_id] = _route(store, config, _study(store, config))
    prior_uid = generate_uid()
    archive = FakeArchive(found=[Found(prior_uid, _dt.date(2025, 3, 4))])
    worker = RequirementsWorker(store, _rules(config), archive, config.spool_dir)
    worker.step()
    assert archive.pulls == [("pacs", prior_uid, ())]
    assert _job(store, job_id).state == JobState.WAITING
    _study(store, config, date="20250304", uid=prior_uid)  # the pull brought it
    [prior_job] = _route(store, config, prior_uid)
    prior = _job(store, prior_job)
    assert (prior.rule, prior.state, prior.destinations, prior.needs) == (
        PRIOR_RULE,
        JobState.QUEUED,
        [],
        None,
    )
    worker.step()
    assert _job(store, job_id).state == JobState.WAITING  # its prior is not processed yet
    _succeed(store, prior_job)
    worker.step()
    job = _job(store, job_id)
    assert job.state == JobState.QUEUED and job.needs is not None and job.needs["prior"]["job"] == prior_job


def test_a_source_that_does_not_answer_is_asked_again_until_the_wait_ends(
    config: Config, store: Store
) -> None:
    config = _config(config, {"prior": {"source": "pacs", "wait_minutes": 5}})
    [job_id] = _route(store, config, _study(store, config))
    worker = RequirementsWorker(store, _rules(config), FakeArchive(down=True), config.spool_dir)
    worker.step()
    worker.step()  # the same error is noted once
    job = _job(store, job_id)
    assert job.state == JobState.WAITING
    assert [t for t in _texts(job) if "did not answer" in t] == [
        "pacs did not answer (connection refused); asking again"
    ]
    worker.step(now=utcnow() + _dt.timedelta(minutes=6))
    job = _job(store, job_id)
    assert (
        job.state == JobState.QUEUED and "the prior was not ready within 5 min" in job.needs["prior"]["why"]
    )  # type: ignore[index]


def test_a_missing_series_is_pulled_and_after_the_wait_the_job_is_skipped(
    config: Config, store: Store
) -> None:
    thin = {"SliceThickness": {"range": {"max": 1.5}}, "SeriesDescription": {"regex": "1mm"}}
    requires = {"series": {"match": thin, "wait_minutes": 10, "pull_from": "pacs", "after_wait": "skip"}}
    config = _config(config, requires)
    study_uid = _study(store, config)
    [job_id] = _route(store, config, study_uid)
    job = _job(store, job_id)
    assert job.state == JobState.WAITING
    assert "a series with SliceThickness range [-inf, 1.5], SeriesDescription regex '1mm'" in _texts(job)[0]
    archive = FakeArchive(
        series_found=[FoundSeries("7.1", "CT", "Thorax 5mm"), FoundSeries("7.2", "CT", "Thorax 1mm")]
    )
    worker = RequirementsWorker(store, _rules(config), archive, config.spool_dir)
    worker.step()
    assert archive.pulls == [("pacs", study_uid, ("7.2",))]  # only what the C-FIND answer can tell
    worker.step(now=utcnow() + _dt.timedelta(minutes=11))
    job = _job(store, job_id)
    assert job.state == JobState.CANCELLED and job.error is not None
    assert job.error.startswith("skipped: a series with SliceThickness") and "within 10 min" in job.error


def test_after_the_wait_a_job_may_run_on_the_series_there_are(config: Config, store: Store) -> None:
    config = _config(
        config, {"series": {"match": {"SliceThickness": {"range": {"max": 1.5}}}, "wait_minutes": 0}}
    )
    [job_id] = _route(store, config, _study(store, config))
    RequirementsWorker(store, _rules(config), FakeArchive(), config.spool_dir).step()
    job = _job(store, job_id)
    assert job.state == JobState.QUEUED
    assert any("did not arrive within 0 min: running on series" in t for t in _texts(job))


def test_a_study_with_the_series_does_not_wait(config: Config, store: Store, tmp_path: Path) -> None:
    config = _config(config, {"series": {"match": {"SliceThickness": {"range": {"max": 1.5}}}}})
    [job_id] = _route(store, config, _study(store, config, thickness=1.0))
    assert _job(store, job_id).state == JobState.QUEUED


def test_a_new_revision_supersedes_a_waiting_job_and_keeps_its_prior_in_flight(
    config: Config, store: Store
) -> None:
    thin = {"SliceThickness": {"range": {"max": 1.5}}}
    requires = {"series": {"match": thin, "wait_minutes": 0}, "prior": {"source": "pacs"}}
    config = _config(config, requires)
    study_uid = _study(store, config)
    [first] = _route(store, config, study_uid)
    prior_uid = generate_uid()
    archive = FakeArchive(found=[Found(prior_uid, _dt.date(2025, 3, 4))])
    worker = RequirementsWorker(store, _rules(config), archive, config.spool_dir)
    worker.step()  # the series first: the wait (0 min) ends, then the prior is looked for and pulled
    assert archive.pulls == [("pacs", prior_uid, ())]
    with store.session() as s:  # the thin series arrives late: revision 2
        s.scalars(select(Study).where(Study.study_uid == study_uid)).one().revision = 2
    thin_uid = _add_series(store, config, study_uid, thickness=1.0, description="Thorax 1mm")
    [second] = _route(store, config, study_uid)
    old, new = _job(store, first), _job(store, second)
    assert old.state == JobState.CANCELLED and old.error == "superseded by revision 2 before it ran"
    assert new.state == JobState.WAITING and new.series_uid == thin_uid and new.needs is not None
    assert new.needs["prior"]["state"] == "fetching" and new.needs["prior"]["study_uid"] == prior_uid
    assert "carried over from the superseded job: fetching" in _texts(new)[0]
    _study(store, config, date="20250304", uid=prior_uid)  # the pull ends: the new job's prior
    [prior_job] = _route(store, config, prior_uid)
    assert _job(store, prior_job).rule == PRIOR_RULE and archive.pulls == [("pacs", prior_uid, ())]


def test_the_rules_say_what_a_job_waits_for(config: Config, store: Store) -> None:
    requires = {
        "series": {
            "match": {"SliceThickness": {"range": {"max": 1.5}}},
            "pull_from": "pacs",
            "after_wait": "skip",
        },
        "prior": {"source": "pacs", "max_age_days": 730},
    }
    config = _config(config, requires)
    assert describe_requirements(config.rules[0].requires if config.rules else None) == [
        "a series with SliceThickness range [-inf, 1.5], pulled from pacs: waits up to 30 min, then skipped",
        "the prior study from pacs (same modality, within 730 days; its results kept locally):"
        " waits up to 60 min, then runs without",
    ]
    study_uid = _study(store, config)
    with store.session() as s:
        study = s.scalars(select(Study).where(Study.study_uid == study_uid)).one()
        series, _ = read_study_series(s, study, config.spool_dir)
    report = {"rules": ["chest"], "default_rule": None, "notes": [], "skipped_files": 0}
    text = format_report({**report, "studies": [study_report(study_uid, series, _rules(config))]})
    assert "    requires a series with SliceThickness range [-inf, 1.5], pulled from pacs" in text


def test_a_failed_pull_or_prior_run_leaves_the_job_without_comparison(config: Config, store: Store) -> None:
    config = _config(config, {"prior": {"source": "pacs"}})
    [pulled] = _route(store, config, _study(store, config))
    [ran] = _route(store, config, _study(store, config))
    failed_uid, ran_uid = generate_uid(), generate_uid()
    archive = FakeArchive(found=[Found(failed_uid, _dt.date(2025, 3, 4))])
    worker = RequirementsWorker(store, _rules(config), archive, config.spool_dir)
    worker.step()  # both jobs pull the same prior
    archive.failed = "no study at pacs matches study " + failed_uid
    worker.step()
    for job_id in (pulled, ran):
        job = _job(store, job_id)
        assert job.state == JobState.QUEUED and job.needs is not None
        assert job.needs["prior"]["why"] == f"pulling the prior from pacs failed: {archive.failed}"
        assert prior_result(job.needs, config.results_dir)[1] == (
            "No comparison with a prior study: the prior could not be pulled from pacs."
        )
    [third] = _route(store, config, _study(store, config))
    archive.found, archive.failed = [Found(ran_uid, _dt.date(2025, 5, 6))], None
    worker.step()
    _study(store, config, date="20250506", uid=ran_uid)
    [prior_job] = _route(store, config, ran_uid)
    with store.session() as s:
        prior = s.get_one(Job, prior_job)
        prior.state, prior.error = JobState.FAILED, "no lung found in this series"
    worker.step()
    job = _job(store, third)
    assert job.state == JobState.QUEUED and job.needs is not None
    assert (
        job.needs["prior"]["why"]
        == f"the prior's ct-lung job {prior_job} failed: no lung found in this series"
    )
    _, note = prior_result(job.needs, config.results_dir)
    assert note == "No comparison with a prior study: the prior's ct-lung run failed."  # no UID in the SR


def test_radgate_jobs_says_what_a_waiting_job_waits_for(
    config: Config, store: Store, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _config(config, {"prior": {"source": "pacs"}})
    [job_id] = _route(store, config, _study(store, config))
    RequirementsWorker(store, _rules(config), FakeArchive(down=True), config.spool_dir).step()
    [listed] = list_jobs(store, config.results_dir)
    assert [n["text"] for n in listed["notes"]] == _texts(_job(store, job_id))
    assert print_jobs(config, as_json=False) == 0
    row = capsys.readouterr().out.splitlines()[1]
    assert " WAITING " in row and row.endswith("pacs did not answer (connection refused); asking again")


def test_a_prior_is_delivered_only_when_the_rule_says_so(config: Config, store: Store) -> None:
    data = _config(config, {"prior": {"source": "pacs", "deliver": True}}).model_dump(mode="python")
    data["destinations"] = {
        "archive": {"kind": "dicom", "host": "127.0.0.1", "port": 104, "ae_title": "ARCH"}
    }
    config = _validate(data, "test")
    [job_id] = _route(store, config, _study(store, config))
    prior_uid = generate_uid()
    archive = FakeArchive(found=[Found(prior_uid, _dt.date(2025, 1, 1))])
    RequirementsWorker(store, _rules(config), archive, config.spool_dir).step()
    _study(store, config, date="20250101", uid=prior_uid)
    [prior_job] = _route(store, config, prior_uid)
    assert _job(store, job_id).destinations == ["archive"]
    assert (_job(store, prior_job).rule, _job(store, prior_job).destinations) == (PRIOR_RULE, ["archive"])
