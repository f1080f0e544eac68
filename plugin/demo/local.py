"""``radgate demo``: the main job on one machine, the whole way round, with real parts only.

A local Orthanc (the Debian binary, on free loopback ports) plays the PACS; ``radgate serve`` runs
as its own process on the embedded defaults plus one destination, that Orthanc; a synthetic chest
CT is pushed with DCMTK ``storescu``; the demo follows the job store until the SEG, SR and SC are
in Orthanc, in the source study, then prints what arrived, the measurements read back from the SR
and the URL of Orthanc's explorer (and, with ``--viewer``, of the study in OHIF served by
``plugin.demo.viewer``). Nothing is simulated, so a demo that passes shows a site the
same path its PACS will take. The local node is reused by ``bench/e2e.py``.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from types import FrameType
from typing import Any

import httpx
import pydicom
import yaml

from dicom_io.results.reading import sr_measurements
from dicom_io.testing.orthanc_server import OrthancError, OrthancServer
from dicom_io.testing.synthetic import ct_chest_phantom
from dicom_io.testing.tools import ToolNotFoundError, free_port, storescu
from plugin.config import Config
from plugin.demo.viewer import OHIF_DIR, ViewerError, ViewerServer, ohif_dist
from plugin.dispatch.outbox import list_deliveries
from plugin.jobs.queue import list_jobs
from plugin.store.engine import Store
from plugin.store.models import DeliveryState, JobState

DESTINATION = "orthanc"
RESULT_MODALITIES = ("SEG", "SR", "OT")
"""What ct-lung delivers: the segmentation, the TID 1500 report and the secondary captures (OT)."""


class DemoError(RuntimeError):
    """Why the demo did not get its results back (printed as the one-line reason, exit status 1)."""


def node_settings(
    data_dir: Path, port: int, orthanc: OrthancServer, **sections: dict[str, Any]
) -> dict[str, Any]:
    """The embedded defaults plus: loopback listener, a short quiet period, Orthanc as the destination.

    The quiet period only decides when a study is complete; storescu releases its association
    at the end, after which ``after_release_s`` applies, so 2 s is plenty on one machine. Extra
    ``sections`` (e.g. ``dispatch={"retry_base_s": 0.5}``) are merged into the sections they name.
    """
    settings: dict[str, Any] = {
        "data_dir": str(data_dir),
        "dicom": {"host": "127.0.0.1", "port": port},
        "completion": {"quiet_period_s": 2.0, "after_release_s": 0.5},
        "executor": {"poll_s": 0.2},
        "dispatch": {"poll_interval_s": 0.2},
        "destinations": {
            DESTINATION: {
                "kind": "dicom",
                "host": orthanc.host,
                "port": orthanc.dicom_port,
                "ae_title": orthanc.aet,
            }
        },
    }
    for key, values in sections.items():
        settings.setdefault(key, {}).update(values)
    Config.model_validate(settings)  # a wrong key fails here, before a node is started with it
    return settings


class LocalNode:
    """``radgate serve`` as a child process with its own YAML configuration and log file."""

    def __init__(self, workdir: Path, settings: dict[str, Any]) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = workdir / "radgate.yaml"
        self.config_path.write_text(yaml.safe_dump(settings))
        self.config = Config.model_validate(settings)
        self.log_path = workdir / "node.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def port(self) -> int:
        return self.config.dicom.port

    def start(self, timeout: float = 60.0) -> LocalNode:
        """Start it and wait until its DICOM port accepts connections."""
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "plugin.cli", "serve", "--config", str(self.config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + timeout
        while not self._listening():
            if time.monotonic() > deadline:
                raise DemoError(f"radgate serve did not listen on port {self.port} within {timeout:.0f} s")
            time.sleep(0.1)
        return self

    def _listening(self) -> bool:
        self.check_alive()
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    def check_alive(self) -> None:
        """DemoError with the log's tail when the node has exited."""
        if self.process is not None and self.process.poll() is not None:
            raise DemoError(f"radgate serve exited with status {self.process.returncode}:\n{self.log_tail()}")

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM (a clean stop), SIGKILL after ``timeout``; the exit status."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)
        return self.process.returncode

    @contextmanager
    def store(self) -> Iterator[Store]:
        """The node's job store, for reading what it did (the node migrated it at start)."""
        store = Store(self.config.db_url)
        try:
            yield store
        finally:
            store.dispose()


# --- reading the results back ------------------------------------------------------------------


@dataclass(frozen=True)
class SeriesArrived:
    modality: str
    number: str
    description: str
    instance_ids: tuple[str, ...]  # Orthanc's ids, for /instances/{id}/file


def series_in_orthanc(orthanc: OrthancServer, study_uid: str) -> list[SeriesArrived]:
    """Every series of the study as Orthanc holds it, by series number."""
    found = [
        SeriesArrived(
            str(tags.get("Modality", "")),
            str(tags.get("SeriesNumber", "")),
            str(tags.get("SeriesDescription", "")),
            tuple(series["Instances"]),
        )
        for series in orthanc.series_of_study(study_uid)
        for tags in [series["MainDicomTags"]]
    ]
    return sorted(found, key=lambda s: int(s.number) if s.number.isdigit() else 0)


def format_measurements(rows: list[tuple[str, str, float, str]]) -> list[str]:
    """One line per measurement group, e.g. ``Right lung  volume 1911.3 mL  %LAA-950 1.26 %``."""
    groups: dict[str, list[str]] = {}
    for group, label, value, unit in rows:
        shown = f"{value:.2f}" if unit == "%" else f"{value:.1f}"
        groups.setdefault(group, []).append(f"{label} {shown} {unit}")
    width = max((len(group) for group in groups), default=0) + 2
    return [f"  {group:<{width}}" + "   ".join(items) for group, items in groups.items()]


# --- following one study -----------------------------------------------------------------------


class _Progress:
    """Prints a line when something changes (and a heartbeat), with seconds since the send."""

    def __init__(self, start: float) -> None:
        self._start = start
        self._last = ""
        self._printed_at = start

    def say(self, line: str) -> None:
        print(f"[{time.monotonic() - self._start:6.1f} s] {line}", flush=True)
        self._printed_at = time.monotonic()

    def update(self, line: str) -> None:
        if line != self._last or time.monotonic() - self._printed_at > 10:
            self._last = line
            self.say(line)


def _state(node: LocalNode, study_uid: str) -> tuple[str, bool]:
    """A one-line account of the study's jobs and deliveries, and whether every delivery is SENT."""
    with node.store() as store:
        # the study first: completion commits its state with its jobs, so a study read COMPLETE has its
        # jobs by the next read (read the other way round, completion could fall between the two)
        studies = [s for s in store.studies() if s.study_uid == study_uid]
        jobs = [j for j in list_jobs(store, node.config.results_dir) if j["study_uid"] == study_uid]
        ids = {j["id"] for j in jobs}
        deliveries = [d for d in list_deliveries(store) if d.job_id in ids]
    if not studies:
        return "waiting for the node to record the study", False
    if not jobs:
        if studies[0].state == "COMPLETE":
            raise DemoError("the study is complete but no rule matched it: no job (see the node's log)")
        return f"received {studies[0].instance_count} instances; waiting for the quiet period", False
    parts = []
    for job in jobs:
        if job["state"] == JobState.FAILED:
            raise DemoError(f"job {job['id']} ({job['pipeline']}) FAILED: {job['error']}")
        steps = ", ".join(f"{k.removesuffix('_s')} {v:.1f} s" for k, v in job["timings"].items())
        parts.append(f"job {job['id']} {job['pipeline']} {job['state']}" + (f" ({steps})" if steps else ""))
    dead = [d for d in deliveries if d.state == DeliveryState.DEAD]
    if dead:
        raise DemoError(f"{len(dead)} deliveries DEAD: {dead[0].last_error}")
    sent = sum(d.state == DeliveryState.SENT for d in deliveries)
    if deliveries:
        parts.append(f"{sent}/{len(deliveries)} result instances sent to {DESTINATION}")
        retrying = [d for d in deliveries if d.last_error and d.state != DeliveryState.SENT]
        if retrying:
            parts.append(f"retrying: {retrying[0].last_error}")
    return "; ".join(parts), bool(deliveries) and sent == len(deliveries)


def wait_for_results(
    node: LocalNode, orthanc: OrthancServer, study_uid: str, timeout: float, progress: _Progress
) -> list[SeriesArrived]:
    """Follow the study until every result is SENT and Orthanc holds SEG, SR and SC in it."""
    deadline = time.monotonic() + timeout
    while True:
        node.check_alive()
        line, all_sent = _state(node, study_uid)
        progress.update(line)
        if all_sent:
            arrived = series_in_orthanc(orthanc, study_uid)
            if {s.modality for s in arrived} >= set(RESULT_MODALITIES):
                return arrived
        if time.monotonic() > deadline:
            raise DemoError(f"no results in Orthanc after {timeout:.0f} s; last state: {line}")
        time.sleep(0.3)


def _report(
    orthanc: OrthancServer, study_uid: str, arrived: list[SeriesArrived], viewer: ViewerServer | None
) -> None:
    print(f"\nIn Orthanc, study {study_uid}:")
    for s in arrived:
        count = len(s.instance_ids)
        print(
            f"  {s.modality:<4} series {s.number:>5}  {s.description:<32} {count} instance"
            + "s" * (count != 1)
        )
    [sr_id] = [s.instance_ids[0] for s in arrived if s.modality == "SR"]
    sr = pydicom.dcmread(BytesIO(orthanc.instance_file(sr_id)))
    print("ct-lung measurements, read back from the SR:")
    print("\n".join(format_measurements(sr_measurements(sr))))
    print(f"\nOpen it in Orthanc: {orthanc.url}/app/explorer.html#study?uuid={orthanc.study_id(study_uid)}")
    if viewer is not None:
        print(f"Open it in OHIF: {viewer.study_url(study_uid)}")


def _send(files: list[Path], port: int, called_ae: str) -> None:
    """C-STORE every file with DCMTK storescu (one association); DemoError unless all succeeded."""
    sent = storescu("127.0.0.1", port, called_ae, files, calling_ae="RADGATE_DEMO")
    if not sent.all_succeeded or len(sent.statuses) != len(files):
        raise DemoError(f"storescu to {called_ae} failed (exit {sent.returncode}):\n{sent.output[-2000:]}")


def _wait_for_signal() -> None:
    """Block until SIGINT or SIGTERM (Ctrl-C also reaches Orthanc and the node: both stop cleanly)."""
    stop = threading.Event()

    def _on_signal(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _on_signal)
    stop.wait()


def _check_viewer(viewer: ViewerServer, study_uid: str) -> int:
    """The study's series as OHIF will query them, through the viewer's same-origin ``/dicom-web``."""
    url = f"{viewer.url}/dicom-web/studies/{study_uid}/series"
    try:
        answer = httpx.get(url, headers={"Accept": "application/dicom+json"}, timeout=30)
    except httpx.HTTPError as exc:
        raise DemoError(f"the viewer's DICOMweb did not answer: {exc}") from exc
    if answer.status_code != 200:
        raise DemoError(f"the viewer's DICOMweb answered HTTP {answer.status_code}: {answer.text[:200]}")
    return len(answer.json())


def run_demo(
    workdir: Path, rows: int, slices: int, timeout: float, keep: bool, viewer_port: int | None = None
) -> None:
    """Orthanc, the node, one synthetic chest CT, its results back; raises DemoError on failure.

    With ``viewer_port`` (0: a free port) OHIF is served on it against Orthanc's DICOMweb
    (ViewerError when OHIF is not installed) and the demo keeps running as with ``keep``.
    """
    progress = _Progress(time.monotonic())
    dist = ohif_dist() if viewer_port is not None else None
    orthanc = OrthancServer(workdir=workdir / "orthanc", dicomweb=dist is not None)
    node: LocalNode | None = None
    viewer: ViewerServer | None = None
    try:
        orthanc.start()
        version = orthanc.rest_get("/system")["Version"]
        progress.say(f"Orthanc {version}: {orthanc.url}, DICOM AE {orthanc.aet} port {orthanc.dicom_port}")
        if dist is not None and viewer_port is not None:
            viewer = ViewerServer(orthanc.dicomweb_url, port=viewer_port, dist=dist).start()
            ohif = (OHIF_DIR / "VERSION").read_text().strip()
            progress.say(f"OHIF Viewer {ohif}: {viewer.url}, DICOMweb at {viewer.url}/dicom-web")
        # the console on a free port (demos and tests run side by side), its "open in viewer" on OHIF
        web: dict[str, Any] = {"port": free_port()}
        if viewer is not None:
            web["viewer_url_template"] = viewer.url_template
        settings = node_settings(workdir / "node" / "data", free_port(), orthanc, web=web)
        node = LocalNode(workdir / "node", settings)
        node.start()
        console = f"http://{node.config.web.host}:{node.config.web.port}"
        progress.say(f"radgate serve: AE RADGATE port {node.port}, console {console}, log {node.log_path}")
        phantom = ct_chest_phantom(rows=rows, columns=rows, slices=slices, seed=0)
        files = phantom.write(workdir / "input")
        progress.say(f"synthetic chest CT: {slices} slices of {rows}x{rows}, study {phantom.study_uid}")
        _send(files, orthanc.dicom_port, orthanc.aet)  # the archive holds the source, as a PACS does
        progress.say("stored it in Orthanc; now sending it to radgate with DCMTK storescu")
        _send(files, node.port, node.config.dicom.ae_title)
        sent_at = time.monotonic()
        progress.say(f"sent {len(files)} instances to radgate; waiting for the results")
        arrived = wait_for_results(node, orthanc, phantom.study_uid, timeout, progress)
        progress.say(f"results arrived, {time.monotonic() - sent_at:.1f} s after the last instance was sent")
        if viewer is not None:
            count = _check_viewer(viewer, phantom.study_uid)
            progress.say(f"the viewer's /dicom-web lists {count} series of the study")
        _report(orthanc, phantom.study_uid, arrived, viewer)
        if keep or viewer is not None:
            running = "Orthanc, radgate and the viewer" if viewer is not None else "Orthanc and radgate"
            print(f"\n{running} keep running; Ctrl-C stops them.", flush=True)
            _wait_for_signal()
    except DemoError as err:
        if node is not None and node.process is not None and node.process.poll() is None:
            raise DemoError(f"{err}\nlast lines of the node's log:\n{node.log_tail()}") from None
        raise
    finally:
        if viewer is not None:
            viewer.stop()
        if node is not None:
            node.stop()
        orthanc.stop()


def command(args: argparse.Namespace) -> int:
    """`radgate demo`: 0 when the results came back, 1 with the reason otherwise."""
    workdir = args.dir.resolve() if args.dir else Path(tempfile.mkdtemp(prefix="radgate-demo-"))
    try:
        run_demo(
            workdir,
            args.rows,
            args.slices,
            args.timeout,
            args.keep,
            args.viewer_port if args.viewer else None,
        )
    except (DemoError, ViewerError, OrthancError, ToolNotFoundError, OSError) as err:
        print(f"radgate demo failed: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("radgate demo interrupted", file=sys.stderr)
        return 130
    finally:
        if args.dir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0
