"""radgate inside a real Orthanc: Debian's Orthanc 1.10 runs the plugin from orthanc_config/, a
`radgate worker` process runs the jobs, and the results come back into the same Orthanc study.

Studies go into Orthanc with DCMTK's storescu; Orthanc calls them stable after 2 s (1 s in the replay test).
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
import requests
from support.node import write_series
from support.orthanc_plugin import POLL_S, PluginSite

from dicom_io.testing.orthanc_server import wait_until
from dicom_io.testing.synthetic import ct_chest_phantom, mr_head_phantom
from dicom_io.testing.tools import dciodvfy


@pytest.fixture()
def site(tmp_path: Path) -> Iterator[PluginSite]:
    s = PluginSite(tmp_path)
    try:
        yield s
    finally:
        s.stop()


def _ended(site: PluginSite, study_uid: str) -> dict[str, Any] | None:
    jobs = site.jobs(study_uid)
    return jobs[0] if jobs and jobs[0]["state"] in ("SUCCEEDED", "FAILED") else None


def _delivered(site: PluginSite, study_uid: str) -> dict[str, Any] | None:
    """The study's one job once it SUCCEEDED and every delivery is SENT."""
    jobs = site.jobs(study_uid)
    done = jobs and jobs[0]["state"] == "SUCCEEDED" and set(jobs[0]["deliveries"]) == {"SENT"}
    return jobs[0] if done else None


@pytest.mark.slow  # ct-lung in a worker process, Orthanc started twice: about 30 s on 2 cores
def test_stable_studies_are_run_and_results_return_into_the_same_study(
    site: PluginSite, tmp_path: Path
) -> None:
    site.start_worker()  # it imports torch meanwhile; the store's migration is safe side by side
    orthanc = site.start_orthanc()
    status = orthanc.rest_get("/radgate/status")
    assert status["python"].startswith("3.11") and not status["torch_loaded"], status
    assert "Run radgate" in requests.get(f"{orthanc.url}/plugins/explorer.js", timeout=10).text

    # a CT with too few slices: routed to ct-lung by the rules, FAILED with the reason; and an MR:
    # no rule matches, so no job; then ct-lung on demand, which can use none of its series: still
    # no job (its declaration is read without importing the pipelines: torch stays out of Orthanc).
    # Both are sent before either is waited for: they become stable together; the chest CT sent
    # later is made while Orthanc waits for them to be stable.
    short = write_series(tmp_path / "short", 3)
    short_uid = str(pydicom.dcmread(short[0], stop_before_pixels=True).StudyInstanceUID)
    site.storescu(short)
    mr = mr_head_phantom(rows=32, columns=32, slices=8, seed=3)
    site.storescu(mr.write(tmp_path / "mr"))
    ct = ct_chest_phantom(rows=64, columns=64, slices=40, seed=5)
    ct_files = ct.write(tmp_path / "ct")
    site.wait_stable(short_uid)
    mr_id = site.wait_stable(mr.study_uid)
    assert site.jobs(mr.study_uid) == []
    answer = orthanc.rest_post(f"/radgate/studies/{mr_id}/run", {"pipeline": "ct-lung"})
    assert (answer["study_uid"], answer["jobs"]) == (mr.study_uid, []), answer
    assert not orthanc.rest_get("/radgate/status")["torch_loaded"]

    short_job = wait_until(lambda: _ended(site, short_uid), 120, "the short CT's job to end", interval=0.5)
    assert (short_job["state"], short_job["error"]) == (
        "FAILED",
        "ct-lung: only 3 slices, this pipeline needs at least 5",
    )
    assert site.jobs(mr.study_uid) == []
    assert orthanc.rest_get("/system")["Version"]  # Orthanc kept serving

    # a good chest CT; Orthanc goes down while its job is pending and comes back on the same ports
    site.storescu(ct_files)
    ct_id = site.wait_stable(ct.study_uid)
    [job] = site.jobs(ct.study_uid)
    assert job["state"] in ("QUEUED", "RUNNING"), job
    site.stop_orthanc()
    orthanc = site.start_orthanc()
    job = wait_until(lambda: _delivered(site, ct.study_uid), 180, "results sent to Orthanc", interval=0.5)
    assert (job["rule"], job["destinations"]) == ("chest", ["orthanc"])

    # SEG, SR and SC in the same study in Orthanc, valid
    assert orthanc.study_id(ct.study_uid) == ct_id
    series = orthanc.series_of_study(ct.study_uid)
    results = [s for s in series if s["MainDicomTags"]["Modality"] in ("SEG", "SR", "OT")]
    assert sorted(s["MainDicomTags"]["Modality"] for s in results) == ["OT", "SEG", "SR"]
    instances = [i for s in results for i in s["Instances"]]
    assert len(instances) == job["deliveries"]["SENT"]
    with tempfile.TemporaryDirectory() as folder:
        for instance in instances:
            path = Path(folder) / f"{instance}.dcm"
            path.write_bytes(orthanc.instance_file(instance))
            assert pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID == ct.study_uid
            verdict = dciodvfy(path)
            assert verdict.ok, verdict.output

    # the results arriving made the study stable again: still one job, nothing taken back into radgate
    site.wait_stable(ct.study_uid, times=2)
    assert [j["id"] for j in site.jobs(ct.study_uid)] == [job["id"]]
    ours = [line for line in orthanc.log_tail(500_000).splitlines() if "radgate" in line]
    assert ours and not any("PHANTOM" in line for line in [*ours, *site.worker_log().splitlines()])
    assert site.stop_worker() == 0, site.worker_log()[-3000:]


def test_a_study_stable_while_the_plugin_was_down_is_replayed_once(site: PluginSite, tmp_path: Path) -> None:
    """Orthanc's change log since the last handled change is replayed at start; twice gives one job.

    The plugin is down at first because its virtual environment is missing: Orthanc runs on
    without it. Orthanc is killed between the starts (how it went down is not what is tested here).
    Its stable age is 1 s: the study is imported at the replay, whole, however often it was stable.
    """
    site.stable_age = 1
    orthanc = site.start_orthanc(env={"RADGATE_VENV": str(site.workdir / "no-venv")})
    assert "radgate: plugin not loaded: ModuleNotFoundError" in orthanc.log_tail(20_000)
    assert requests.get(f"{orthanc.url}/radgate/status", timeout=10).status_code == 404
    files = write_series(tmp_path / "ct", 6)
    study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    site.storescu(files)
    orthanc_id = wait_until(lambda: orthanc.study_id(study_uid), 30, "the study in Orthanc", POLL_S)
    wait_until(lambda: site.stable_changes(orthanc_id) or None, 30, "the study to be stable", POLL_S)
    assert orthanc.rest_get("/system")["Version"]  # Orthanc kept serving
    site.stop_orthanc(kill=True)

    site.data_dir.mkdir(parents=True)
    site.cursor.save(0)  # the plugin had handled nothing of it (its queue was not drained)
    orthanc = site.start_orthanc()
    wait_until(lambda: site.handled(site.stable_changes(orthanc_id)[0]), 60, "the replay", POLL_S)
    [job] = site.jobs(study_uid)
    assert (job["state"], job["pipeline"], job["revision"]) == ("QUEUED", "ct-lung", 1)

    site.stop_orthanc(kill=True)
    site.cursor.save(0)  # the same stable event once more
    orthanc = site.start_orthanc()
    wait_until(lambda: site.handled(site.stable_changes(orthanc_id)[0]), 60, "the second replay", POLL_S)
    assert [j["id"] for j in site.jobs(study_uid)] == [job["id"]]

    # on demand: no body runs the rules again; a wrong body, pipeline or study is refused
    answer = orthanc.rest_post(f"/radgate/studies/{orthanc_id}/run")
    assert answer["instances"] == {"stored": 0, "known": 6, "refused": 0} and len(answer["jobs"]) == 1
    run = f"{orthanc.url}/radgate/studies/{orthanc_id}/run"
    assert requests.post(run, json={"pipe": "x"}, timeout=30).status_code == 400
    assert requests.post(run, json={"pipeline": "../x"}, timeout=30).status_code == 400
    assert requests.post(run, data=b"{not json", timeout=30).status_code == 400
    jobs = site.jobs(study_uid)
    unknown = requests.post(run, json={"pipeline": "no-such-pipeline"}, timeout=30)
    assert unknown.status_code == 400, unknown.text
    error = unknown.json()["error"]
    assert error.startswith("unknown pipeline 'no-such-pipeline'; known pipelines: ") and "ct-lung" in error
    assert site.jobs(study_uid) == jobs  # no job that could only fail
    assert requests.post(f"{orthanc.url}/radgate/studies/nope/run", timeout=30).status_code == 404


def test_a_broken_radgate_config_leaves_orthanc_running(site: PluginSite) -> None:
    site.config_path.write_text("data_dir: [not, a, path]\n")
    orthanc = site.start_orthanc()
    assert orthanc.rest_get("/system")["Version"]
    assert requests.get(f"{orthanc.url}/radgate/jobs", timeout=10).status_code == 404
    assert "radgate: plugin disabled: invalid configuration" in orthanc.log_tail(20_000)
