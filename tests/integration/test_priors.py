"""A prior found, pulled and used: a real Orthanc as the PACS holds two visits of LUNG1-001's patient.

The node (one, in this process, with its executor) receives the later visit's sharp-kernel
reconstruction by C-STORE. Its rule requires the soft-kernel one (B19f) and the prior: the node
pulls the missing series by C-MOVE (the new revision supersedes the waiting job), then finds the
earlier visit by C-FIND, pulls it, runs ct-lung on it (results kept locally), then on the current
study, whose SR reports the change per lung and in total and references the prior's SR. The
visits are 28 real slices each; the prior's are moved by 2 slices, so its lungs measure differently.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from sqlalchemy import select
from support.node import free_port, wait_for
from support.study import OneSeriesStudy, ct_visit, reconstruction
from support.testdata import needs_testdata

from dicom_io.results.reading import sr_measurements
from dicom_io.testing import validate
from dicom_io.testing.orthanc_server import Modality, OrthancServer
from dicom_io.testing.tools import ToolNotFoundError, storescu
from plugin.config import load_config
from plugin.node import Node
from plugin.route.requires import PRIOR_RULE
from plugin.store.models import Job, JobState, Study
from plugin.store.reports import study_timeline

pytestmark = [pytest.mark.slow, needs_testdata]  # an Orthanc, a node and two ct-lung runs

SLICES = 28  # ct-lung wants 20 slices and 80 mm: 27 x 3 mm


@dataclass(frozen=True)
class Outcome:
    node: Node
    current: OneSeriesStudy
    sharp: OneSeriesStudy
    prior: OneSeriesStudy
    job: Job
    prior_job: Job
    sr_path: Path
    prior_sr: Dataset


def _jobs(node: Node, study_uid: str) -> list[Job]:
    with node.store.session() as s:
        rows = s.scalars(
            select(Job).join(Study, Study.id == Job.study_id).where(Study.study_uid == study_uid)
        )
        jobs = list(rows)
        for job in jobs:
            s.expunge(job)
        return jobs


def _done(node: Node, study_uid: str) -> Job | None:
    jobs = [j for j in _jobs(node, study_uid) if j.state in (JobState.SUCCEEDED, JobState.FAILED)]
    return jobs[0] if jobs else None


@pytest.fixture(scope="module")
def outcome(testdata: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Outcome]:
    root = tmp_path_factory.mktemp("priors")
    prior = ct_visit(testdata, root / "prior", SLICES, "20240105", "ACC-PRIOR", offset=2)
    current = ct_visit(testdata, root / "current", SLICES, "20261101", "ACC-NOW")
    sharp = reconstruction(current, root / "sharp", "B70f")  # what the node is sent
    older = ct_visit(testdata, root / "older", 3, "20220301", "ACC-OLDER")  # not the most recent
    pacs = OrthancServer()
    try:
        pacs.start()
    except ToolNotFoundError as err:
        pytest.skip(str(err))
    port = free_port()
    config = load_config(None).with_overrides(
        data_dir=str(root / "data"),
        **{"dicom.host": "127.0.0.1", "dicom.port": port, "dicom.receivers": 1, "web.enabled": False},
        **{"completion.quiet_period_s": 5.0, "completion.after_release_s": 0.3, "executor.poll_s": 0.2},
        **{"fetch.poll_interval_s": 0.1},
        sources={
            "pacs": {"kind": "dicom", "host": "127.0.0.1", "port": pacs.dicom_port, "ae_title": pacs.aet}
        },
        rules=[
            {
                "name": "chest",
                "scope": "study",
                "match": {"Modality": {"equals": "CT"}},
                "pipeline": "ct-lung",
                "requires": {
                    "series": {"match": {"SeriesDescription": {"regex": "B19f"}}, "pull_from": "pacs"},
                    "prior": {"source": "pacs", "wait_minutes": 5},
                },
            }
        ],
    )
    pacs.upload([*prior.files, *current.files, *sharp.files, *older.files])
    pacs.add_modality("radgate", Modality("RADGATE", "127.0.0.1", port))
    node = Node(config)
    node.start()
    stop = threading.Event()
    completion = threading.Thread(target=node.completion.run, args=(stop,), daemon=True)
    completion.start()
    try:
        sent = storescu("127.0.0.1", port, "RADGATE", sharp.files)
        assert sent.returncode == 0, sent.output
        job = wait_for(
            lambda: _done(node, current.study_uid), 300, "the current study's job to end", interval=0.25
        )
        [prior_job] = _jobs(node, prior.study_uid)
        [sr_path] = (config.results_dir / str(job.id)).glob("SR-*.dcm")
        [prior_sr] = (config.results_dir / str(prior_job.id)).glob("SR-*.dcm")
        yield Outcome(node, current, sharp, prior, job, prior_job, sr_path, pydicom.dcmread(prior_sr))
    finally:
        stop.set()
        completion.join(10)
        node.stop()
        pacs.stop()


def test_the_missing_series_is_pulled_and_the_job_runs_on_it(outcome: Outcome) -> None:
    waited, ran = _jobs(outcome.node, outcome.current.study_uid)
    assert (waited.series_uid, waited.state) == (outcome.sharp.series_uid, JobState.CANCELLED)
    assert waited.error == "superseded by revision 2 before it ran"
    assert (ran.id, ran.series_uid, ran.study_revision) == (outcome.job.id, outcome.current.series_uid, 2)
    with outcome.node.store.session() as s:
        timeline = study_timeline(s, outcome.current.study_uid)
    assert timeline is not None
    texts = [e.text for e in timeline.events if e.kind == "requires" and e.job_id == waited.id]
    assert texts[0] == (
        f"job {waited.id}: waiting for a series with SeriesDescription regex 'B19f'"
        " (up to 30 min, asking pacs for it) and the prior study from pacs (up to 5 min)"
    )
    assert texts[1].startswith(f"job {waited.id}: pulling 1 series from pacs (fetch ")


def test_the_prior_is_found_pulled_and_run_without_delivery(outcome: Outcome) -> None:
    assert outcome.job.state == JobState.SUCCEEDED, outcome.job.error
    prior_job = outcome.prior_job
    assert (prior_job.rule, prior_job.state, prior_job.destinations) == (PRIOR_RULE, JobState.SUCCEEDED, [])
    needs = outcome.job.needs or {}
    assert needs["prior"]["study_uid"] == outcome.prior.study_uid and needs["prior"]["job"] == prior_job.id
    with outcome.node.store.session() as s:
        timeline = study_timeline(s, outcome.current.study_uid)
    assert timeline is not None
    texts = [e.text for e in timeline.events if e.kind == "requires" and e.job_id == outcome.job.id]
    assert texts[0] == f"job {outcome.job.id}: waiting for the prior study from pacs (up to 5 min)"
    assert any(
        f"prior: study {outcome.prior.study_uid} (accession ACC-PRIOR), of 2024-01-05" in t for t in texts
    )
    assert any(f"result is ready (job {prior_job.id})" in t for t in texts)


def test_the_sr_reports_the_change_and_references_the_prior(outcome: Outcome) -> None:
    sr = pydicom.dcmread(outcome.sr_path)
    now = {(g, label): v for g, label, v, _ in sr_measurements(sr)}
    before = {(g, label): v for g, label, v, _ in sr_measurements(outcome.prior_sr)}
    for group in ("Right lung", "Left lung", "Both lungs"):
        change = now[(group, "volume")] - before[(group, "volume")]
        assert change != 0
        assert now[(group, "volume change")] == pytest.approx(change, rel=1e-6)
        relative = 100 * change / before[(group, "volume")]
        assert now[(group, "volume change, relative")] == pytest.approx(relative, rel=1e-6)
    for group in ("Right lung", "Left lung"):
        laa = now[(group, "%LAA-950")] - before[(group, "%LAA-950")]
        assert now[(group, "%LAA-950 change")] == pytest.approx(laa, rel=1e-6, abs=1e-9)
    [other] = sr.PertinentOtherEvidenceSequence
    assert other.StudyInstanceUID == outcome.prior.study_uid
    [series] = other.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == outcome.prior_sr.SeriesInstanceUID
    assert series.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == outcome.prior_sr.SOPInstanceUID
    for check in (validate.dciodvfy, validate.dsrdump):
        result = check(outcome.sr_path)
        assert result.ok, str(result)
