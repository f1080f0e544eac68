"""The web console over a real node: studies sent with DCMTK storescu through `radgate serve`, whose
jobs, deliveries (to a real Orthanc, and to a port nobody listens on) and SC pictures are real; the
JSON API, the pages in a real headless Chromium, the operator's actions and the bad input.

One node serves the whole module (the ct-lung job is the expensive part); the tests that change
the store run last, in file order.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pydicom
import pytest
from PIL import Image
from pydicom.uid import generate_uid
from sqlalchemy import select
from support.browser import chromium_page
from support.node import NodeProcess, ct_instance, free_port, wait_for
from support.web import CHEAP_HASHER, ROLES, login, password, web_node

from dicom_io.testing.orthanc_server import OrthancServer
from plugin.store.engine import Store
from plugin.store.models import Delivery, Job, JobState, Study
from plugin.web.security import Role
from plugin.web.users import add_user

if TYPE_CHECKING:
    from playwright.sync_api import Browser

VIEWER = "http://viewer.example:3000/viewer?StudyInstanceUIDs={study_uid}"
RULES = [
    {
        "name": "chest-ct",
        "scope": "study",
        "match": {"Modality": {"equals": "CT"}, "BodyPartExamined": {"equals": "CHEST"}},
        "pipeline": "ct-lung",
        "destinations": ["archive", "dead"],
    },
    {"name": "other-ct", "match": {"Modality": {"equals": "CT"}}, "pipeline": "ct-lung", "destinations": []},
]


@dataclass(frozen=True)
class Site:
    node: NodeProcess
    url: str
    store: Store
    chest: str  # the phantom: a SUCCEEDED job, deliveries SENT to the archive and DEAD to "dead"
    tiny: str  # three 16x16 slices: its job FAILED
    tiny_job: int
    chest_job: int

    @contextmanager
    def client(self, role: str) -> Iterator[httpx.Client]:
        """A client logged in as the user of ``role`` (it sends the session's CSRF token)."""
        with httpx.Client(base_url=self.url, follow_redirects=False, timeout=60) as client:
            login(client, role)
            yield client

    def job(self, job_id: int) -> Job:
        with self.store.session() as s:
            return s.get_one(Job, job_id)


def _tiny_study(folder: Path) -> list[Path]:
    study_uid, series_uid = generate_uid(), generate_uid()
    folder.mkdir(parents=True)
    paths = []
    for k in range(3):
        ds = ct_instance(study_uid, series_uid, k + 1)
        ds.AccessionNumber, ds.PatientID, ds.PatientName = "TINY1", "TINY-PAT", "Small^Series"
        paths.append(folder / f"{k}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
    return paths


def _job_of(store: Store, study_uid: str) -> Job | None:
    with store.session() as s:
        return s.scalars(select(Job).join(Study).where(Study.study_uid == study_uid).order_by(Job.id)).first()


@pytest.fixture(scope="module")
def site(
    tmp_path_factory: pytest.TempPathFactory, orthanc_session: OrthancServer, ct_phantom_dir: Path
) -> Iterator[Site]:
    workdir = tmp_path_factory.mktemp("console")
    web_port = free_port()
    settings: dict[str, Any] = {
        "web": {"port": web_port, "viewer_url_template": VIEWER, "disk_warning_gb": 0.001},
        "dicom": {"receivers": 1},  # received in the node's process: no receiving processes to start
        "destinations": {
            "archive": {"kind": "orthanc", "url": orthanc_session.url},
            "dead": {"kind": "dicom", "host": "127.0.0.1", "port": free_port(), "ae_title": "NOBODY"},
            "echo": {
                "kind": "dicom",
                "host": "127.0.0.1",
                "port": orthanc_session.dicom_port,
                "ae_title": "ORTHANC",
            },
        },
        "dispatch": {"max_attempts": 1, "timeout_s": 10},
        "executor": {"max_attempts": 1},
        "rules": RULES,
    }
    node = NodeProcess(workdir / "node", settings).start()
    store = Store(f"sqlite:///{(node.data_dir / 'radgate.db').resolve()}")
    try:
        for role in ROLES:
            add_user(store, role, password(role), Role.parse(role), CHEAP_HASHER)
        tiny_files = _tiny_study(workdir / "tiny")
        chest_files = sorted(ct_phantom_dir.iterdir())
        for files in (tiny_files, chest_files):
            sent = node.storescu(*files)
            assert sent.returncode == 0, sent.stdout + sent.stderr
        tiny = str(pydicom.dcmread(tiny_files[0], stop_before_pixels=True).StudyInstanceUID)
        chest = str(pydicom.dcmread(chest_files[0], stop_before_pixels=True).StudyInstanceUID)

        def settled() -> tuple[Job, Job] | None:
            tiny_job, chest_job = _job_of(store, tiny), _job_of(store, chest)
            if tiny_job is None or chest_job is None or tiny_job.state != JobState.FAILED:
                return None
            with store.session() as s:
                states = {d.state for d in s.scalars(select(Delivery).where(Delivery.job_id == chest_job.id))}
            return (
                (tiny_job, chest_job)
                if chest_job.state == JobState.SUCCEEDED and states == {"SENT", "DEAD"}
                else None
            )

        tiny_job, chest_job = wait_for(settled, 300, "the tiny job FAILED, the chest one delivered")
        yield Site(node, f"http://127.0.0.1:{web_port}", store, chest, tiny, tiny_job.id, chest_job.id)
    finally:
        store.dispose()
        assert node.stop() == 0, node.log()[-3000:]


def test_overview_api_shows_today_queue_failures_deliveries_disk_and_devices(site: Site) -> None:
    with site.client("viewer") as client:
        answer = client.get("/api/overview").json()
    figures = answer["figures"]
    assert (figures["today"]["instances"], figures["today"]["studies"]) == (43, 2)
    assert figures["failed_today"] == 1 and figures["queue_depth"] == 0
    assert figures["deliveries"]["DEAD"] == figures["dead_by_destination"]["dead"] > 0
    assert answer["disk"]["free_bytes"] > 0 and answer["disk"]["low"] is False
    assert answer["workers"] == {"configured": 1, "slots": 1, "busy": 0}
    assert answer["gpus"] == [] and answer["accelerator"].startswith("CPU only")  # no GPU here
    assert answer["cpu"]["cores"] >= 1 and answer["cpu"]["memory_total_bytes"] > 0


def test_study_search_by_accession_patient_date_and_state(site: Site) -> None:
    with site.client("viewer") as client:

        def found(**query: str) -> list[str]:
            answer = client.get("/api/studies", params=query)
            assert answer.status_code == 200, answer.text
            return [s["study_uid"] for s in answer.json()["studies"]]

        assert found() == [site.chest, site.tiny]
        assert found(accession="SYN*") == [site.chest]
        assert found(patient_id="TINY-PAT") == [site.tiny]
        assert found(date_from="2024-01-15", date_to="2024-01-15") == [site.chest]
        assert found(state="FAILED") == [site.tiny]
        assert found(state="DEAD") == [site.chest]
        [row] = client.get("/api/studies", params={"accession": "SYN0001"}).json()["studies"]
    assert (row["patient_id"], row["patient_name"], row["status"]) == (
        "RG-SYN-CT-0001",
        "Phantom^Chest",
        "dead",
    )
    assert (row["series"], row["instances"]) == (1, 40)


def test_study_api_tells_the_timeline_routing_results_and_viewer_link(site: Site) -> None:
    with site.client("viewer") as client:
        answer = client.get(f"/api/studies/{site.chest}").json()
        timeline = answer["timeline"]
        [job] = timeline["jobs"]
        assert (job["state"], job["rule"], job["pipeline"]) == ("SUCCEEDED", "chest-ct", "ct-lung")
        assert [s["name"] for s in job["steps"]] == ["load", "infer", "encode"]
        assert all(s["seconds"] > 0 for s in job["steps"])
        where = job["placement"]  # the local executor's worker process on this machine's CPU
        assert (where["executor"], where["device"]) == ("local", "cpu") and where["worker"].startswith("pid ")
        assert job["ran_on"] == f"local {where['hostname']}, {where['worker']}, cpu"
        fragment = client.get(f"/studies/{site.chest}/timeline").text
        assert f'Ran on <span class="uid">{job["ran_on"]}</span>' in fragment
        by_destination = {d["destination"]: d for d in job["deliveries"]}
        assert by_destination["archive"]["state"] == "SENT"
        assert by_destination["dead"]["state"] == "DEAD" and "refused" in by_destination["dead"]["last_error"]
        assert "released" in timeline["completion"]
        kinds = [e["kind"] for e in timeline["events"]]
        assert kinds[0] == "received" and {"complete", "queued", "succeeded", "delivered", "delivery"} <= set(
            kinds
        )
        [results] = answer["results"]
        assert {o["kind"] for o in results["objects"]} == {"SEG", "SR", "SC"}
        volumes = {m["group"]: m["value"] for m in results["findings"] if m["label"] == "volume"}
        assert volumes and all(v > 0 for v in volumes.values()) and results["images"]
        [series] = answer["routing"]["series"]
        assert series["action"]["rule"] == "chest-ct" and series["not_matched"] == []
        assert answer["viewer_url"] == VIEWER.replace("{study_uid}", site.chest)
        assert "ct-lung" in answer["pipelines"]
        image = client.get(results["images"][0]["url"])
        assert (image.status_code, image.headers["content-type"]) == (200, "image/png")
        picture = Image.open(io.BytesIO(image.content))
        assert picture.mode == "RGB" and min(picture.size) >= 512  # key images are scaled up to 512
        tiny = client.get(f"/api/studies/{site.tiny}").json()
    [tiny_series] = tiny["routing"]["series"]
    assert tiny_series["action"]["rule"] == "other-ct"
    [(rule, reasons)] = [(m["rule"], m["reasons"]) for m in tiny_series["not_matched"]]
    assert rule == "chest-ct" and reasons == ["BodyPartExamined: wanted equals 'CHEST', got absent"]
    assert "at least 5" in tiny["timeline"]["jobs"][0]["error"] and tiny["results"] == []


def test_bad_input_gets_a_clear_4xx(site: Site) -> None:
    with site.client("viewer") as viewer, site.client("operator") as operator:
        missing = viewer.get("/api/studies/1.2.3.4")
        assert (missing.status_code, missing.json()["detail"]) == (404, "no study 1.2.3.4 has been received")
        assert viewer.get("/studies/1.2.3.4").status_code == 404
        bad_date = viewer.get("/studies", params={"date_from": "2024-02-30"})
        assert bad_date.status_code == 400 and "not a date" in bad_date.text
        assert 'id="rerun-button"' not in viewer.get(f"/studies/{site.chest}").text  # no actions for viewers
        assert 'id="rerun-button"' in operator.get(f"/studies/{site.chest}").text
        assert viewer.get("/api/studies/not-a-uid").status_code == 422
        for query in ({"limit": "x"}, {"state": "LOST"}, {"date_from": "15.01.2024"}, {"colour": "red"}):
            answer = viewer.get("/api/studies", params=query)
            assert answer.status_code == 422, (query, answer.text)
        assert viewer.get("/api/studies", params={"date_from": "2024-02-30"}).status_code == 400
        wrong_order = viewer.get("/api/studies", params={"date_from": "2024-02-02", "date_to": "2024-02-01"})
        assert (wrong_order.status_code, wrong_order.json()["detail"]) == (400, "date_from is after date_to")
        assert viewer.get(f"/api/studies/{site.chest}/jobs/{site.chest_job}/images/99.png").status_code == 404
        assert viewer.get(f"/api/studies/{site.tiny}/jobs/{site.chest_job}/images/1.png").status_code == 404
        refused = viewer.post(f"/api/jobs/{site.tiny_job}/retry")
        assert refused.status_code == 403 and "operator" in refused.json()["detail"]
        no_csrf = operator.post(f"/api/jobs/{site.tiny_job}/retry", headers={"X-CSRF-Token": "forged"})
        assert no_csrf.status_code == 403
        unknown = operator.post(f"/api/studies/{site.chest}/rerun", json={"pipeline": "nope"})
        assert unknown.status_code == 400 and "installed: " in unknown.json()["detail"]
        assert (
            operator.post(
                f"/api/studies/{site.chest}/rerun", json={"pipeline": "ct-lung", "x": 1}
            ).status_code
            == 422
        )
        unusable = operator.post(f"/api/studies/{site.tiny}/rerun", json={"pipeline": "ct-lung"})
        assert unusable.status_code == 409 and "can use no series" in unusable.json()["detail"]
        assert operator.post("/api/jobs/99999/retry").status_code == 404
        assert operator.post("/api/deliveries/retry", json={}).status_code == 400
        assert operator.post("/api/rules/nope/pause").status_code == 404
        assert operator.post("/api/rules/dry-run", json={"study_uid": "1.2.3.4"}).status_code == 404
    assert site.job(site.tiny_job).state == JobState.FAILED  # nothing refused changed anything
    with site.client("admin") as admin:
        trail = admin.get("/api/audit", params={"studies": "false"}).json()
    refusals = {(e["action"], e["actor"], e["target"]) for e in trail if e["outcome"] == "failure"}
    assert {
        ("request.not_found", "viewer", "/api/studies/1.2.3.4"),  # an unknown study
        ("request.invalid", "viewer", "/api/studies"),  # a query string that is not what it should be
        ("access.denied", "viewer", f"/api/jobs/{site.tiny_job}/retry"),  # an action without the role
        ("csrf.rejected", "operator", f"/api/jobs/{site.tiny_job}/retry"),
        ("study.rerun", "operator", f"study {site.tiny}"),
    } <= refusals


def test_destinations_are_tested_paused_and_rules_dry_run(site: Site) -> None:
    with site.client("operator") as client:
        tests = {
            name: client.post(f"/api/destinations/{name}/test").json() for name in ("archive", "echo", "dead")
        }
        assert tests["archive"]["ok"] and tests["archive"]["detail"].startswith("HTTP check")
        assert tests["echo"]["ok"] and tests["echo"]["detail"].startswith("C-ECHO: ORTHANC@")
        assert not tests["dead"]["ok"] and "connection refused" in tests["dead"]["detail"]
        assert client.post("/api/rules/other-ct/pause").json()["message"] == "rule other-ct paused"
        report = client.post("/api/rules/dry-run", json={"study_uid": site.tiny}).json()
        [series] = report["series"]
        assert (
            series["action"] is None and {"rule": "other-ct", "reasons": ["paused"]} in series["not_matched"]
        )
        assert client.post("/api/destinations/dead/pause").status_code == 200
        rules = client.get("/api/rules").json()
        assert [r["paused"] for r in rules["rules"]] == [False, True]
        assert {d["name"]: d["paused"] for d in rules["destinations"]} == {
            "archive": False,
            "dead": True,
            "echo": False,
        }
        for path in ("/api/rules/other-ct/resume", "/api/destinations/dead/resume"):
            assert client.post(path).status_code == 200
        assert client.post("/api/rules/dry-run", json={"study_uid": site.tiny}).json()["series"][0]["action"]
    with site.client("admin") as admin:
        actions = {e["action"] for e in admin.get("/api/audit", params={"studies": "false"}).json()}
    assert {
        "destination.test",
        "rule.pause",
        "rule.resume",
        "destination.pause",
        "destination.resume",
    } <= actions


def test_the_openapi_document_describes_the_console(site: Site) -> None:
    with site.client("viewer") as client:
        document = client.get("/api/openapi.json").json()
    paths = document["paths"]
    for path in (
        "/api/overview", "/api/studies", "/api/studies/{study_uid}", "/api/rules", "/api/rules/dry-run",
        "/api/studies/{study_uid}/rerun", "/api/jobs/{job_id}/retry", "/api/deliveries/retry",
        "/api/destinations/{name}/test", "/api/destinations/{name}/pause", "/api/rules/{name}/resume",
    ):  # fmt: skip
        assert path in paths, path
    schemas = document["components"]["schemas"]
    assert {"OverviewAnswer", "StudyPage", "StudyAnswer", "RoutingReport", "RulesAnswer"} <= set(schemas)
    study = paths["/api/studies"]["get"]["parameters"]
    assert {p["name"] for p in study} >= {"accession", "patient_id", "date_from", "date_to", "state"}


def test_a_browser_walks_the_console_and_acts(site: Site, chromium: Browser, tmp_path: Path) -> None:
    """Overview -> studies -> the study (pictures, findings, timeline), then retry and re-run."""
    with chromium_page(chromium) as page:
        page.goto(f"{site.url}/login?next=/")
        page.fill("input[name=username]", "operator")
        page.fill("input[name=password]", password("operator"))
        page.click("button[type=submit]")
        page.wait_for_url(f"{site.url}/")
        assert page.inner_text("#instances-today") == "43"
        assert page.inner_text("#failed-today") == "1"
        page.screenshot(path=str(tmp_path / "overview.png"), full_page=True)
        page.click("nav >> text=Studies")
        page.wait_for_selector("#studies")
        assert "Phantom Chest" in page.inner_text("#studies")
        page.click(f"#studies a[href='/studies/{site.chest}']")
        page.wait_for_selector(".key-image")
        loaded = (
            "[...document.querySelectorAll('img.key-image')].every(i => i.complete && i.naturalWidth >= 512)"
        )
        page.wait_for_function(f"() => {loaded}")
        findings = page.inner_text("table.findings")
        assert "volume" in findings and "mL" in findings
        assert "delivered to archive" in page.inner_text("#events")
        dead = page.inner_text(f"#delivery-{site.chest_job}-dead")
        assert "5 DEAD" in dead and "connection refused" in dead
        page.click(f"#deliveries-{site.chest_job} summary")  # each delivery; stays open while polled
        page.evaluate(
            "() => new Promise(done => document.addEventListener('htmx:afterSwap', done, {once: true}))"
        )
        assert page.get_attribute(f"#deliveries-{site.chest_job}", "open") is not None
        assert page.get_attribute("#open-in-viewer", "href") == VIEWER.replace("{study_uid}", site.chest)
        page.screenshot(path=str(tmp_path / "study.png"), full_page=True)
        jobs_before = {job.id for job in _jobs(site, site.chest)}
        page.select_option("#rerun-pipeline", "ct-lung")
        page.click("#rerun-button")
        page.wait_for_function("() => document.getElementById('flash').textContent.includes('queued')")
        [rerun] = [job for job in _jobs(site, site.chest) if job.id not in jobs_before]
        assert (rerun.rule, rerun.pipeline) == ("on-demand", "ct-lung")
        page.wait_for_selector(f"#job-{rerun.id}")  # the timeline shows it without a reload

        failed_at = site.job(site.tiny_job).updated_at
        page.goto(f"{site.url}/studies/{site.tiny}")
        page.click(f"#retry-{site.tiny_job}")
        page.wait_for_function("() => document.getElementById('flash').textContent.includes('re-queued')")
        assert site.job(site.tiny_job).updated_at > failed_at

        page.click("nav >> text=Rules")
        page.click("#test-destination-archive")
        page.wait_for_function("() => document.getElementById('flash').textContent.includes('answered')")
        page.click("#pause-rule-other-ct")  # the rules table is fetched again: the button turns
        page.click("#resume-rule-other-ct")
        page.wait_for_selector("#pause-rule-other-ct")
        page.fill("#dry-run-uid", site.tiny)
        page.click("#dry-run-button")
        page.wait_for_selector("#dry-run .routing")
        assert "chest-ct: BodyPartExamined: wanted equals 'CHEST', got absent" in page.inner_text("#dry-run")
    with site.client("admin") as admin:
        trail = admin.get("/api/audit", params={"studies": "false"}).json()
    done = {(e["action"], e["outcome"]) for e in trail}
    assert {("study.rerun", "ok"), ("job.retry", "ok"), ("rule.pause", "ok"), ("rule.resume", "ok")} <= done
    log = site.node.log()
    assert "RG-SYN-CT-0001" not in log and "Phantom^Chest" not in log and "TINY-PAT" not in log


def _jobs(site: Site, study_uid: str) -> list[Job]:
    with site.store.session() as s:
        return list(s.scalars(select(Job).join(Study).where(Study.study_uid == study_uid)))


def test_the_overview_warns_when_the_data_dir_disk_runs_low(tmp_path: Path) -> None:
    with web_node(tmp_path, disk_warning_gb=1e9) as console, console.client() as client:
        login(client, "viewer")
        answer = client.get("/api/overview").json()
        page = client.get("/")
    assert answer["disk"]["low"] is True and answer["disk"]["warning_gb"] == 1e9
    assert page.status_code == 200 and 'id="disk-warning"' in page.text
    assert answer["figures"]["today"] == {"instances": 0, "studies": 0, "bytes": 0}
