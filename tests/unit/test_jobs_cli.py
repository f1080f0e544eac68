"""`radgate jobs` lists what the store says about each job; `radgate jobs retry` re-queues failures."""

from __future__ import annotations

import json
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select
from support.execute import add_job, job_row, spool_files
from support.node import write_series

from plugin.cli import main
from plugin.config import Config
from plugin.store.engine import Store
from plugin.store.models import Delivery, DeliveryState, Job, JobState, utcnow

REASON = "ct-lung: only 1 slices, this pipeline needs at least 5"


@pytest.fixture()
def jobs(store: Store, config: Config, tmp_path: Path) -> tuple[str, int, int]:
    """A study with a SUCCEEDED job (2 deliveries SENT, 1 DEAD) and a FAILED one: (study, ok, failed)."""
    [file] = write_series(tmp_path / "src", 1)
    spool_files(store, config, [file])
    header = pydicom.dcmread(file, stop_before_pixels=True)
    ok, failed = (add_job(store, header.StudyInstanceUID, header.SeriesInstanceUID, "ct-lung") for _ in "ab")
    now = utcnow()
    with store.session() as s:
        done = s.get_one(Job, ok)
        done.state, done.attempts, done.destinations = JobState.SUCCEEDED, 1, ["pacs", "stow"]
        done.timings = {"load_s": 0.25, "infer_s": 1.5, "encode_s": 0.5}
        bad = s.get_one(Job, failed)
        bad.state, bad.attempts, bad.error = JobState.FAILED, 3, REASON
        for uid, to, state in (
            ("1.2.3", "pacs", "SENT"),
            ("1.2.4", "pacs", "SENT"),
            ("1.2.3", "stow", "DEAD"),
        ):
            s.add(
                Delivery(
                    job_id=ok, sop_instance_uid=uid, destination=to, state=state, attempts=1,
                    created_at=now, updated_at=now,
                )
            )  # fmt: skip
    return str(header.StudyInstanceUID), ok, failed


def _run(config: Config, *args: str) -> int:
    return main([*args[:1], "--data-dir", str(config.data_dir), *args[1:]])


def test_jobs_json_lists_state_timings_errors_and_deliveries(
    config: Config, jobs: tuple[str, int, int], capsys: pytest.CaptureFixture[str]
) -> None:
    study_uid, ok, failed = jobs
    assert _run(config, "jobs", "--json") == 0
    listed = {j["id"]: j for j in json.loads(capsys.readouterr().out)}
    done, bad = listed[ok], listed[failed]
    assert (done["study_uid"], done["pipeline"], done["state"], done["attempts"]) == (
        study_uid, "ct-lung", "SUCCEEDED", 1,
    )  # fmt: skip
    assert done["timings"] == {"load_s": 0.25, "infer_s": 1.5, "encode_s": 0.5}
    assert done["deliveries"] == {"SENT": 2, "DEAD": 1} and done["destinations"] == ["pacs", "stow"]
    assert done["results_dir"] == str(config.results_dir / str(ok))
    assert (bad["state"], bad["error"], bad["deliveries"], bad["results_dir"]) == ("FAILED", REASON, {}, None)


def test_jobs_table_shows_one_line_per_job(
    config: Config, jobs: tuple[str, int, int], capsys: pytest.CaptureFixture[str]
) -> None:
    assert _run(config, "jobs") == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3
    assert (
        "SUCCEEDED" in lines[1]
        and "load 0.2s infer 1.5s encode 0.5s" in lines[1]
        and "1 DEAD, 2 SENT" in lines[1]
    )
    assert "FAILED" in lines[2] and REASON in lines[2] and jobs[0] in lines[2]


def test_an_error_with_line_breaks_stays_on_its_job_s_line(
    config: Config, store: Store, jobs: tuple[str, int, int], capsys: pytest.CaptureFixture[str]
) -> None:
    """An error's text may quote a peer (a destination's answer): the table keeps one line per job."""
    with store.session() as s:
        s.get_one(Job, jobs[2]).error = "refused\n    7 FAILED  forged\r"
    assert _run(config, "jobs") == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and lines[2].endswith("refused\\n    7 FAILED  forged\\r")


def test_retry_requeues_a_failed_job_then_has_nothing_left_to_do(
    config: Config, store: Store, jobs: tuple[str, int, int], capsys: pytest.CaptureFixture[str]
) -> None:
    failed = jobs[2]
    assert _run(config, "jobs", "retry", str(failed)) == 0
    assert capsys.readouterr().out.strip() == f"job {failed} re-queued"
    job = job_row(store, failed)
    assert (job.state, job.attempts, job.finished_at) == (JobState.QUEUED, 0, None)
    assert _run(config, "jobs", "retry", str(failed)) == 1
    assert "is QUEUED and has no dead deliveries" in capsys.readouterr().err


def test_retry_requeues_the_dead_deliveries_of_a_job(
    config: Config, store: Store, jobs: tuple[str, int, int], capsys: pytest.CaptureFixture[str]
) -> None:
    ok = jobs[1]
    assert _run(config, "jobs", "retry", str(ok)) == 0
    assert capsys.readouterr().out.strip() == f"job {ok}: 1 dead deliveries re-queued"
    with store.session() as s:
        states = sorted(s.scalars(select(Delivery.state).where(Delivery.job_id == ok)))
    assert states == [DeliveryState.PENDING, DeliveryState.SENT, DeliveryState.SENT]
    assert job_row(store, ok).state == JobState.SUCCEEDED


def test_retry_of_an_unknown_job_says_so(
    config: Config, store: Store, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _run(config, "jobs", "retry", "99") == 1
    assert "no job 99" in capsys.readouterr().err


def test_jobs_on_an_empty_store(config: Config, store: Store, capsys: pytest.CaptureFixture[str]) -> None:
    assert _run(config, "jobs", "--json") == 0
    assert json.loads(capsys.readouterr().out) == []
