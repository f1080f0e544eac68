"""Pull studies from a real Orthanc as the PACS: C-FIND, C-MOVE, C-GET, QIDO-RS and WADO-RS.

One Orthanc (with its DICOMweb plugin) and one node in this process (listener, completion, fetch
worker; no executor: the jobs stay QUEUED, which is what the fetch decides) for the module. Each
test pulls a study of its own, so what arrives is new to the node.
"""

from __future__ import annotations

import contextlib
import io
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pydicom
import pytest
import yaml
from pydicom.uid import generate_uid
from sqlalchemy import select
from support.browser import chromium_page
from support.node import ct_instance, free_port, wait_for
from support.web import login, login_page, web_node

from dicom_io.testing.orthanc_server import Modality, OrthancError, OrthancServer, find_plugin
from dicom_io.testing.tools import ToolNotFoundError
from plugin.cli.main import main
from plugin.config import Config, load_config
from plugin.fetch import (
    FetchError,
    FetchStatus,
    NoMatch,
    find_series,
    find_studies,
    get_fetch,
    request_fetch,
    submit_fetch,
)
from plugin.node import Node
from plugin.store.accounts import AuditEvent
from plugin.store.models import Job, Study
from plugin.web.security import CSRF_HEADER

if TYPE_CHECKING:
    from playwright.sync_api import Browser

pytestmark = pytest.mark.slow  # a node, an Orthanc and a browser; retrieves wait for completion

RULES = [{"name": "chest", "match": {"Modality": {"equals": "CT"}}, "pipeline": "ct-lung"}]


@dataclass(frozen=True)
class PacsStudy:
    study_uid: str
    accession: str
    series_uid: str
    files: tuple[Path, ...]


def _study(folder: Path, accession: str, slices: int) -> PacsStudy:
    """A small CT study: ``slices`` 16x16 slices 5 mm apart (20 of them are enough for ct-lung)."""
    folder.mkdir(parents=True)
    study_uid, series_uid = generate_uid(), generate_uid()
    files = []
    for k in range(1, slices + 1):
        ds = ct_instance(study_uid, series_uid, k)
        ds.AccessionNumber = accession
        ds.StudyDate = "20240105"
        ds.SliceThickness = 5.0
        ds.ImagePositionPatient = [0.0, 0.0, 5.0 * k]
        path = folder / f"{k}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return PacsStudy(study_uid, accession, series_uid, tuple(files))


@dataclass
class Site:
    pacs: OrthancServer
    node: Node
    config: Config
    config_path: Path
    studies: dict[str, PacsStudy]

    def status(self, request_id: int) -> FetchStatus:
        status = get_fetch(self.node.store, request_id)
        assert status is not None
        return status

    def ended(self, request_id: int, timeout: float = 60) -> FetchStatus:
        """The request once DONE or FAILED."""
        return wait_for(
            lambda: (s := self.status(request_id)).state in ("DONE", "FAILED") and s,
            timeout,
            f"fetch request {request_id} to end",
            interval=0.1,  # the node polls every 0.1 s too, in this process
        )

    def jobs(self, study_uid: str) -> list[Job]:
        with self.node.store.session() as s:
            study = s.scalars(select(Study).where(Study.study_uid == study_uid)).one()
            return list(s.scalars(select(Job).where(Job.study_id == study.id).order_by(Job.id)))

    def cli(self, *argv: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main([*argv, "--config", str(self.config_path)])
        return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    root = tmp_path_factory.mktemp("fetch")
    try:
        find_plugin("libOrthancDicomWeb.so")
    except OrthancError as err:
        pytest.skip(str(err))
    pacs = OrthancServer(dicomweb=True)
    try:
        pacs.start()
    except ToolNotFoundError as err:
        pytest.skip(str(err))
    studies = {
        name: _study(root / name, f"ACC-{name.upper()}", slices)
        for name, slices in (("move", 3), ("get", 3), ("wado", 3), ("named", 20), ("api", 3), ("series", 3))
    }
    two = studies["series"]  # a second series in the study: 2 slices
    second = _study(root / "series-2", two.accession, 2)
    for path in second.files:
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID = two.study_uid
        ds.SeriesNumber = 2
        ds.save_as(path)
    studies["series-2"] = PacsStudy(two.study_uid, two.accession, second.series_uid, second.files)
    for study in studies.values():
        pacs.upload(study.files)
    port, closed = free_port(), free_port()
    dicom = {"kind": "dicom", "host": "127.0.0.1", "port": pacs.dicom_port, "ae_title": pacs.aet}
    settings: dict[str, Any] = {
        "data_dir": str(root / "data"),
        "dicom": {"host": "127.0.0.1", "port": port, "receivers": 1},
        "completion": {"quiet_period_s": 5.0, "after_release_s": 0.3},
        "web": {"enabled": False},
        "rules": RULES,
        "sources": {
            "pacs": dicom,
            "pacs-get": {**dicom, "retrieve": "get"},
            "pacs-web": {"kind": "dicomweb", "url": pacs.dicomweb_url},
            "pacs-down": {**dicom, "port": closed, "timeout_s": 2},
            "pacs-nobody": {**dicom, "move_destination": "NOBODY"},
        },
        "fetch": {"poll_interval_s": 0.1, "retry_base_s": 0.2, "retry_max_s": 0.2, "max_attempts": 2},
    }
    config_path = root / "radgate.yaml"
    config_path.write_text(yaml.safe_dump(settings))
    config = load_config(config_path)
    pacs.add_modality("radgate", Modality("RADGATE", "127.0.0.1", port))
    node = Node(config, listen=True, execute=False)
    node.start()
    stop = threading.Event()
    completion = threading.Thread(target=node.completion.run, args=(stop,), daemon=True)
    completion.start()
    try:
        yield Site(pacs, node, config, config_path, studies)
    finally:
        stop.set()
        completion.join(10)
        node.stop()
        pacs.stop()


def test_find_studies_and_series_by_c_find_and_qido(site: Site) -> None:
    study = site.studies["move"]
    for name in ("pacs", "pacs-web"):
        source = site.config.sources[name]
        [match] = find_studies(source, accession=study.accession)
        assert (match.study_uid, match.accession, match.patient_id) == (
            study.study_uid,
            study.accession,
            "PHANTOM",
        )
        assert match.modalities == ("CT",) and str(match.study_date) == "2024-01-05", name
        assert find_studies(source, accession="NO-SUCH") == []
        assert [m.study_uid for m in find_studies(source, patient_id="PHANTOM", modality="CT")] != []
        assert (
            find_studies(source, study_uid=study.study_uid, before=match.study_date) == []
        )  # strictly before
        [series] = find_series(source, study.study_uid)
        assert (series.series_uid, series.modality, series.instance_count) == (study.series_uid, "CT", 3), (
            name
        )
    with pytest.raises(FetchError, match="connection refused"):
        find_studies(site.config.sources["pacs-down"], accession=study.accession)


@pytest.mark.parametrize(("source", "name"), [("pacs", "move"), ("pacs-get", "get"), ("pacs-web", "wado")])
def test_a_study_pulled_by_accession_completes_and_is_routed(site: Site, source: str, name: str) -> None:
    study = site.studies[name]
    code, out, err = site.cli("fetch", "--source", source, "--accession", study.accession, "--wait", "60")
    assert code == 0, out + err
    assert f"(study {study.study_uid})" in out and " DONE " in out
    [request] = [r for r in _listed(site) if r["accession"] == study.accession]
    assert request["state"] == "DONE" and request["instances"] == 3 and request["attempts"] == 1
    [job] = site.jobs(study.study_uid)  # the rules ran, once
    assert (job.pipeline, job.rule, job.state, job.series_uid) == (
        "ct-lung",
        "chest",
        "QUEUED",
        study.series_uid,
    )
    assert request["jobs"] == [job.id]
    with site.node.store.session() as s:
        stored = s.scalars(select(Study).where(Study.study_uid == study.study_uid)).one()
        assert stored.state == "COMPLETE" and stored.accession_number == study.accession


def _listed(site: Site) -> list[dict[str, Any]]:
    code, out, _ = site.cli("fetch", "--list", "--json")
    assert code == 0
    return list(json.loads(out))


def test_only_the_named_pipeline_runs_and_a_second_pull_runs_it_again(site: Site) -> None:
    study = site.studies["named"]
    first = request_fetch(
        site.node.store, "pacs-get", study_uid=study.study_uid, pipeline="ct-lung", reason="test"
    )
    assert site.ended(first).state == "DONE"
    [job] = site.jobs(study.study_uid)
    assert (job.pipeline, job.rule) == ("ct-lung", "on-demand")  # not the rule "chest"
    # pulled again: nothing new arrives, the study is complete already, and it runs once more
    again = request_fetch(
        site.node.store, "pacs-web", study_uid=study.study_uid, pipeline="ct-lung", reason="test"
    )
    done = site.ended(again)
    assert done.state == "DONE" and done.instances == 20
    assert [j.rule for j in site.jobs(study.study_uid)] == ["on-demand", "on-demand"]
    assert done.jobs == (site.jobs(study.study_uid)[1].id,)
    # a pipeline that can use none of its series: FAILED, with the reason
    other = request_fetch(
        site.node.store, "pacs", study_uid=site.studies["move"].study_uid, pipeline="ct-lung", reason="t"
    )
    failed = site.ended(other)
    assert failed.state == "FAILED" and "ct-lung can use no series" in (failed.error or "")


def test_one_series_is_pulled_then_the_other_and_the_study_grows(site: Site) -> None:
    first, second = site.studies["series"], site.studies["series-2"]
    assert [m.instance_count for m in find_series(site.config.sources["pacs"], first.study_uid)] == [3, 2]
    one = request_fetch(
        site.node.store, "pacs", study_uid=first.study_uid, series_uids=(second.series_uid,), reason="t"
    )
    assert site.ended(one).instances == 2  # C-MOVE at series level
    [job] = site.jobs(first.study_uid)
    assert job.series_uid == second.series_uid
    other = request_fetch(
        site.node.store, "pacs-web", study_uid=first.study_uid, series_uids=(first.series_uid,), reason="t"
    )
    done = site.ended(other)
    assert (done.state, done.instances) == ("DONE", 3)  # WADO-RS of one series
    jobs = site.jobs(first.study_uid)
    assert [(j.series_uid, j.study_revision) for j in jobs] == [(second.series_uid, 1), (first.series_uid, 2)]
    with pytest.raises(ValueError, match="not a DICOM UID"):
        request_fetch(site.node.store, "pacs", study_uid=first.study_uid, series_uids=("1.2.x",), reason="t")


def test_a_query_that_matches_nothing_is_refused_with_its_exit_status(site: Site) -> None:
    code, _, err = site.cli("fetch", "--source", "pacs", "--accession", "NO-SUCH")
    assert code == 3 and "no study at pacs matches accession NO-SUCH" in err
    code, _, err = site.cli("fetch", "--source", "pacs-web", "--study", "1.2.3.4")
    assert code == 3 and "no study at pacs-web matches study 1.2.3.4" in err
    code, _, err = site.cli("fetch", "--source", "nowhere", "--study", "1.2.3.4")
    assert code == 2 and "unknown source 'nowhere'" in err
    assert not [r for r in _listed(site) if r["accession"] == "NO-SUCH" or r["study_uid"] == "1.2.3.4"]
    with pytest.raises(NoMatch):
        submit_fetch(site.config, site.node.store, "pacs", accession="NO-SUCH", reason="t")


def test_a_pacs_that_is_down_is_retried_then_reported(site: Site, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="plugin.fetch")
    study = site.studies["move"]
    code, out, err = site.cli(
        "fetch", "--source", "pacs-down", "--accession", study.accession, "--wait", "60"
    )
    assert code == 1, out + err
    assert "pacs-down cannot be asked now (connection refused" in out  # recorded all the same
    [request] = [r for r in _listed(site) if r["source"] == "pacs-down"]
    assert request["state"] == "FAILED" and request["attempts"] == 2
    assert "connection refused" in request["error"] and "after 2 attempts" in request["error"]
    assert f"fetch request {request['id']}: attempt 1 of 2 failed: connection refused" in caplog.text
    assert f"fetch request {request['id']} failed: connection refused" in caplog.text


def test_a_c_move_to_a_destination_the_pacs_does_not_know_fails_clearly(site: Site) -> None:
    study = site.studies["move"]
    request_id = request_fetch(site.node.store, "pacs-nobody", accession=study.accession, reason="test")
    failed = site.ended(request_id)
    assert failed.state == "FAILED" and failed.attempts == 2
    assert "C-MOVE status 0x" in (failed.error or "")  # Orthanc's 0xC000 (DICOM's would be 0xA801)
    assert "know the move destination NOBODY: declare it there" in (failed.error or "")


def test_the_api_action_and_the_console_form_fetch(site: Site, chromium: Browser, tmp_path: Path) -> None:
    study = site.studies["api"]
    body = {"source": "pacs", "accession": study.accession}
    with web_node(tmp_path, site.config) as console, console.client() as client:
        login(client, "viewer")
        assert client.post("/api/fetch", json=body).status_code == 403  # operators only
        client.cookies.clear()
        login(client, "operator")
        token = client.headers.pop(CSRF_HEADER)
        assert client.post("/api/fetch", json=body).status_code == 403  # no CSRF token
        client.headers[CSRF_HEADER] = token
        missing = client.post("/api/fetch", json={"source": "pacs", "accession": "NO-SUCH"})
        assert missing.status_code == 404 and "no study at pacs matches" in missing.json()["detail"]
        bad = client.post("/api/fetch", json={"source": "pacs", "study_uid": "1.2.x"})
        assert bad.status_code == 422
        with chromium_page(chromium) as page:
            login_page(page, console, "operator", "/fetch")
            page.fill("#fetch-accession", study.accession)
            page.click("#fetch-button")
            page.wait_for_function(
                "() => /fetch request \\d+ queued/.test(document.getElementById('flash').textContent)"
            )
            request_id = int(page.inner_text("#flash").split()[2])
            assert site.ended(request_id).state == "DONE"
            page.wait_for_selector(f"#fetch-{request_id} .state.done")  # the table refreshes itself
            assert study.study_uid in page.inner_text(f"#fetch-{request_id}")
            page.screenshot(path=str(tmp_path / "fetch.png"), full_page=True)  # for a person to look at
        listed = client.get("/api/fetch").json()
        assert [r["state"] for r in listed if r["id"] == request_id] == ["DONE"]
        with site.node.store.session() as s:
            actions = s.execute(
                select(AuditEvent.actor, AuditEvent.outcome).where(AuditEvent.action == "fetch.request")
            ).all()
        assert ("operator", "ok") in actions and ("operator", "failure") in actions
