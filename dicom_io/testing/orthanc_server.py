"""A real Debian Orthanc process on free loopback ports, for tests and `radgate demo`.

radgate talks to PACS it does not control; running the genuine Orthanc binary (not a mock) makes
the tests exercise the same DICOM and REST behaviour a site has. The configuration is rendered
from orthanc_config/orthanc.json.template into a private temporary folder that also holds the
storage, the SQLite index and the log, and everything is removed on stop.

Security: the HTTP server refuses non-loopback clients (RemoteAccessAllowed false). Without
`credentials` the REST API needs no login, which is what loopback tests want; with
`credentials=(user, password)` HTTP basic authentication is switched on and the helpers send it.
The DICOM port accepts C-ECHO/C-STORE/C-FIND/C-MOVE/C-GET from any AE (DicomAlways* true).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import string
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from dicom_io.testing.tools import free_port, tool_path

TEMPLATE = Path(__file__).resolve().parents[2] / "orthanc_config" / "orthanc.json.template"
PLUGIN_DIRS = (Path("/usr/share/orthanc/plugins"), Path("/usr/lib/orthanc"))
LOOPBACK = "127.0.0.1"

T = TypeVar("T")


class OrthancError(RuntimeError):
    """Orthanc did not start, stopped early, or answered a request with an error."""


def find_plugin(name: str) -> Path:
    """Path of a Debian Orthanc plugin library such as "libOrthancDicomWeb.so"."""
    for folder in PLUGIN_DIRS:
        candidates = sorted(folder.glob(f"{name}*")) if folder.is_dir() else []
        if candidates:
            return candidates[0]
    raise OrthancError(f"Orthanc plugin {name} not found in {[str(d) for d in PLUGIN_DIRS]}")


def wait_until(condition: Callable[[], T | None], timeout: float, what: str, interval: float = 0.05) -> T:
    """Poll condition until it returns something other than None/False, or raise TimeoutError."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value is not None and value is not False:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


@dataclass(frozen=True)
class Modality:
    """A DICOM peer Orthanc may send to (e.g. radgate's SCP)."""

    aet: str
    host: str
    port: int


class OrthancServer:
    """Start, query and stop one Orthanc. Use as a context manager or call start()/stop()."""

    def __init__(
        self,
        aet: str = "ORTHANC",
        modalities: Mapping[str, Modality] | None = None,
        dicomweb: bool = False,
        python_script: str | Path | None = None,
        credentials: tuple[str, str] | None = None,
        stable_age: int = 60,
        env: Mapping[str, str] | None = None,
        startup_timeout: float = 60.0,
        workdir: str | Path | None = None,
        extra_config: Mapping[str, Any] | None = None,
        ports: tuple[int, int] | None = None,
    ) -> None:
        """python_script loads the Debian Python plugin with that script (env reaches its interpreter);
        extra_config is merged over the rendered template's top level (e.g. a section for the script);
        workdir keeps storage and log in a folder of yours instead of a removed temporary one;
        ports (HTTP, DICOM) are used instead of free ones, e.g. to restart where clients expect it.
        """
        self.aet = aet
        self.modalities = dict(modalities or {})
        self._configured_modalities = dict(self.modalities)
        self.dicomweb = dicomweb
        self.python_script = Path(python_script).resolve() if python_script else None
        self.credentials = credentials
        self.stable_age = stable_age
        self.env = dict(env or {})
        self.startup_timeout = startup_timeout
        self._workdir_arg = Path(workdir) if workdir else None
        self.extra_config = dict(extra_config or {})
        self._ports = ports
        self.host = LOOPBACK
        self.http_port = 0
        self.dicom_port = 0
        self.workdir: Path | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._session = requests.Session()
        # Orthanc closes a keep-alive connection idle for a second: a request sent on it just then
        # finds it closed, so idempotent requests (GET, PUT, DELETE) go once more on a new one.
        self._session.mount("http://", HTTPAdapter(max_retries=Retry(total=2, status=0, redirect=0)))
        if credentials:
            self._session.auth = credentials

    # ------------------------------------------------------------------ lifecycle

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicom-web"

    @property
    def log_path(self) -> Path:
        if self.workdir is None:
            raise OrthancError("Orthanc has not been started")
        return self.workdir / "orthanc.log"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def render_config(self) -> dict[str, Any]:
        """The configuration for the current ports and work folder, from the template."""
        if self.workdir is None:
            raise OrthancError("render_config needs a work folder; call start()")
        plugins = []
        if self.dicomweb:
            plugins.append(str(find_plugin("libOrthancDicomWeb.so")))
        if self.python_script:
            plugins.append(str(find_plugin("libOrthancPython.so")))
        user, password = self.credentials or ("", "")
        values = {
            "name": f"radgate-test-{self.http_port}",
            "storage_dir": str(self.workdir / "storage"),
            "temp_dir": str(self.workdir / "tmp"),
            "plugins": plugins,
            "http_port": self.http_port,
            "authentication": self.credentials is not None,
            "users": {user: password} if self.credentials else {},
            "aet": self.aet,
            "dicom_port": self.dicom_port,
            "modalities": {name: [m.aet, m.host, m.port] for name, m in self.modalities.items()},
            "stable_age": self.stable_age,
            "python_script": str(self.python_script or ""),
        }
        text = string.Template(TEMPLATE.read_text()).substitute({k: json.dumps(v) for k, v in values.items()})
        config: dict[str, Any] = json.loads(text)
        config.update(self.extra_config)
        return config

    def start(self, attempts: int = 3, ports: tuple[int, int] | None = None) -> OrthancServer:
        """Start on fresh free ports and wait for REST /system; retries if a port was taken meanwhile.

        ports (HTTP, DICOM): on these from now on, e.g. those it had before a stop, where clients
        expect it to come back."""
        if self.running:
            return self
        if ports is not None:
            self._ports = ports
        binary = tool_path("Orthanc")
        if self._workdir_arg is not None:
            self._workdir_arg.mkdir(parents=True, exist_ok=True)
            self.workdir = self._workdir_arg
        else:
            self.workdir = Path(tempfile.mkdtemp(prefix="radgate-orthanc-"))
        (self.workdir / "storage").mkdir(exist_ok=True)
        (self.workdir / "tmp").mkdir(exist_ok=True)
        for attempt in range(1, attempts + 1):
            self.http_port, self.dicom_port = self._ports or (free_port(), free_port())
            config_path = self.workdir / "orthanc.json"
            config_path.write_text(json.dumps(self.render_config(), indent=2))
            with self.log_path.open("ab") as log:
                self._process = subprocess.Popen(
                    [binary, f"--logfile={self.log_path}", str(config_path)],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    env={**os.environ, **self.env},
                )
            try:
                wait_until(self._ready, self.startup_timeout, f"Orthanc REST on port {self.http_port}")
                return self
            except OrthancError:
                if attempt == attempts:
                    self.stop()
                    raise
            except TimeoutError as exc:
                self.stop()
                raise OrthancError(f"{exc}; log tail:\n{self.log_tail()}") from exc
        raise AssertionError("unreachable")

    def _ready(self) -> bool:
        """True once /system answers; OrthancError if the process died (e.g. port already in use)."""
        assert self._process is not None
        if self._process.poll() is not None:
            raise OrthancError(
                f"Orthanc exited with status {self._process.returncode} while starting; "
                f"log tail:\n{self.log_tail()}"
            )
        try:
            return self._session.get(f"{self.url}/system", timeout=2).status_code == 200
        except requests.ConnectionError:
            return False

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except (OSError, OrthancError):
            return ""

    def stop(self, timeout: float = 20.0, kill: bool | None = None) -> None:
        """SIGTERM, then SIGKILL after timeout; removes the work folder unless one was given.

        Without a work folder of the caller's, nothing it holds outlives the stop: SIGKILL at once
        (Orthanc takes about 3 s to shut down cleanly). ``kill`` overrides that choice: True kills
        at once (a crash, or a caller done with a server whose clean stop it does not check), False
        asks for the clean stop."""
        process, self._process = self._process, None
        if kill is None:
            kill = self._workdir_arg is None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=timeout)
        if self.workdir is not None and self._workdir_arg is None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    def __enter__(self) -> OrthancServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ REST

    def _request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        response = self._session.request(
            method, f"{self.url}{path}", timeout=kwargs.pop("timeout", 60), **kwargs
        )
        if response.status_code >= 400:
            raise OrthancError(
                f"Orthanc {method} {path} -> HTTP {response.status_code}: {response.text[:500]}"
            )
        return response

    def rest_get(self, path: str, **params: Any) -> Any:
        """GET a REST path (e.g. "/system") and return its JSON."""
        return self._request("GET", path, params=params or None).json()

    def rest_get_bytes(self, path: str) -> bytes:
        return self._request("GET", path).content

    def rest_post(self, path: str, body: Any = None, data: bytes | None = None) -> Any:
        """POST JSON (body) or raw bytes (data); returns the JSON answer, or None when there is none."""
        response = self._request("POST", path, json=body if data is None else None, data=data)
        return response.json() if response.content else None

    def rest_put(self, path: str, body: Any) -> Any:
        response = self._request("PUT", path, json=body)
        return response.json() if response.content else None

    def rest_delete(self, path: str) -> None:
        self._request("DELETE", path)

    def upload(self, paths: Iterable[str | Path]) -> list[str]:
        """POST DICOM files (directories are walked) to /instances; returns the Orthanc instance ids."""
        ids = []
        for path in _walk(paths):
            answer = self.rest_post("/instances", data=path.read_bytes())
            ids.append(str(answer["ID"]))
        return ids

    def studies(self) -> list[dict[str, Any]]:
        """Every study with its main DICOM tags (expanded)."""
        answer: list[dict[str, Any]] = self.rest_get("/studies", expand="")
        return answer

    def study_uids(self) -> list[str]:
        return [str(s["MainDicomTags"]["StudyInstanceUID"]) for s in self.studies()]

    def _lookup(self, uid: str, level: str) -> str | None:
        """Orthanc id of the study/series/instance with this DICOM UID, or None."""
        for match in self.rest_post("/tools/lookup", data=uid.encode()):
            if match["Type"] == level:
                return str(match["ID"])
        return None

    def study_id(self, study_uid: str) -> str | None:
        return self._lookup(study_uid, "Study")

    def series_of_study(self, study_uid: str) -> list[dict[str, Any]]:
        """Series of a study (expanded, with MainDicomTags and Instances ids); [] when it is absent."""
        oid = self.study_id(study_uid)
        return list(self.rest_get(f"/studies/{oid}/series")) if oid else []

    def instances_of_study(self, study_uid: str) -> list[dict[str, Any]]:
        """Instances of a study with MainDicomTags (SOPInstanceUID, InstanceNumber...); [] when absent."""
        oid = self.study_id(study_uid)
        return list(self.rest_get(f"/studies/{oid}/instances")) if oid else []

    def instance_file(self, instance_id: str) -> bytes:
        """The stored DICOM file of an instance, byte for byte."""
        return self.rest_get_bytes(f"/instances/{instance_id}/file")

    def wait_for_instances(self, study_uid: str, count: int, timeout: float = 30.0) -> list[dict[str, Any]]:
        """Wait until the study holds at least count instances (for asynchronous senders)."""

        def enough() -> list[dict[str, Any]] | None:
            found = self.instances_of_study(study_uid)
            return found if len(found) >= count else None

        return wait_until(enough, timeout, f"{count} instances of study {study_uid}")

    def add_modality(self, name: str, modality: Modality) -> None:
        """Declare (or replace) a DICOM peer at runtime, e.g. a radgate SCP started after Orthanc."""
        self.rest_put(
            f"/modalities/{name}", {"AET": modality.aet, "Host": modality.host, "Port": modality.port}
        )
        self.modalities[name] = modality

    def reset(self) -> None:
        """Delete every patient and each modality added at runtime, so a shared server starts a test clean."""
        for patient in self.rest_get("/patients"):
            self.rest_delete(f"/patients/{patient}")
        for name in self.rest_get("/modalities"):
            if name not in self._configured_modalities:
                self.rest_delete(f"/modalities/{name}")
        self.modalities = dict(self._configured_modalities)


def _walk(paths: Iterable[str | Path]) -> list[Path]:
    files: list[Path] = []
    for p in map(Path, paths):
        files.extend(sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p])
    return files
