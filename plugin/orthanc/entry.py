"""The Orthanc side of the plugin: callbacks, REST routes, the worker thread, the Explorer button.

Orthanc must never go down because of radgate, so every callback returns fast and catches
everything: the change callback only wakes the worker thread, and errors are written to
Orthanc's log (``orthanc.LogError``). The worker thread does all the work in order: it follows
Orthanc's change log (`Bridge.follow_changes`) and runs on-demand requests; after an error it
tries again ``RetrySeconds`` later from the last change it handled.

The ``orthanc`` module exists only inside Orthanc, so it is never imported here: the loader
script passes it to `register`.

Configuration, in Orthanc's configuration file::

    "Radgate": {
      "ConfigFile": "/etc/radgate/radgate.yaml",  // the radgate config the workers use too
      "DataDir": "/var/lib/radgate",              // optional: overrides the config's data_dir
      "Destinations": ["orthanc"],                // optional: where on-demand results go (default all)
      "RetrySeconds": 10,                         // optional: wait after an error
      "MaxAttempts": 5,                           // optional: tries before a failing study is set aside
      "Venv": "/opt/radgate/.venv"                // read by the loader: radgate's virtual environment
    }
"""

from __future__ import annotations

import contextlib
import json
import logging
import platform
import queue
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ai_models.registry import UnknownPipelineError
from plugin.config import Config, ConfigError, load_config
from plugin.logs import SafeFormatter
from plugin.orthanc.bridge import Bridge

log = logging.getLogger(__name__)

RUN_WAIT_S = 30.0
"""How long ``POST /radgate/studies/{id}/run`` waits for the jobs before answering "accepted"."""

EXPLORER_JS = """
$('#study').live('pagebeforecreate', function() {
  var button = $('<a>')
    .attr('data-role', 'button').attr('href', '#').attr('data-icon', 'gear').attr('data-theme', 'e')
    .text('Run radgate');
  button.insertBefore($('#study-delete').parent().parent());
  button.click(function() {
    if (!$.mobile.pageData) { return; }
    $.ajax({
      url: '../radgate/studies/' + $.mobile.pageData.uuid + '/run',
      type: 'POST', data: '{}', contentType: 'application/json', dataType: 'json',
      success: function(answer) { alert('radgate: jobs ' + JSON.stringify(answer.jobs || answer.state)); },
      error: function(xhr) { alert('radgate: ' + xhr.responseText); }
    });
  });
});
"""


class PluginSettings(BaseModel):
    """The ``Radgate`` section of Orthanc's configuration."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    config_file: Path | None = Field(default=None, alias="ConfigFile")
    data_dir: Path | None = Field(default=None, alias="DataDir")
    destinations: list[str] | None = Field(default=None, alias="Destinations")
    retry_s: float = Field(default=10.0, gt=0, alias="RetrySeconds")
    max_attempts: int = Field(default=5, ge=1, alias="MaxAttempts")
    venv: Path | None = Field(default=None, alias="Venv")

    @classmethod
    def from_orthanc(cls, configuration: dict[str, Any]) -> PluginSettings:
        try:
            return cls.model_validate(configuration.get("Radgate") or {})
        except ValidationError as err:
            raise ConfigError(f"Orthanc configuration, section Radgate: {err}") from None

    def radgate_config(self) -> Config:
        return load_config(self.config_file).with_overrides(data_dir=self.data_dir)


class RunRequest(BaseModel):
    """The optional body of ``POST /radgate/studies/{id}/run``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    pipeline: str | None = None


class OrthancRest:
    """`plugin.orthanc.bridge.RestApi` on the plugin SDK (in-process, no HTTP)."""

    def __init__(self, orthanc: ModuleType) -> None:
        self._orthanc = orthanc

    def get(self, path: str) -> bytes:
        return bytes(self._orthanc.RestApiGet(path))


class OrthancLogHandler(logging.Handler):
    """Python logging into Orthanc's log (UIDs only: radgate never logs patient data)."""

    def __init__(self, orthanc: ModuleType) -> None:
        super().__init__()
        self._orthanc = orthanc
        self.setFormatter(SafeFormatter("radgate %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
            if record.levelno >= logging.ERROR:
                self._orthanc.LogError(text)
            elif record.levelno >= logging.WARNING:
                self._orthanc.LogWarning(text)
            else:
                self._orthanc.LogInfo(text)
        except Exception:
            self.handleError(record)


@dataclass
class _Run:
    orthanc_id: str
    pipeline: str | None
    done: Future[dict[str, Any]] = field(default_factory=Future)


_WAKE = "wake"
_STOP = "stop"


class PluginWorker:
    """The plugin's one thread: follows Orthanc's change log and runs on-demand requests, in order."""

    def __init__(self, bridge: Bridge, retry_s: float) -> None:
        self.bridge = bridge
        self.retry_s = retry_s
        self._queue: queue.Queue[_Run | str] = queue.Queue()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._prepared = False

    def prepare(self) -> None:
        """Migrate the store and set up folders, once; before the REST routes answer if possible."""
        if not self._prepared:
            self.bridge.prepare()
            self._prepared = True

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="radgate-orthanc", daemon=True)
            self._thread.start()
            self.wake()  # replay what changed while the plugin was not running

    def wake(self) -> None:
        self._queue.put(_WAKE)

    def run(self, orthanc_id: str, pipeline: str | None) -> Future[dict[str, Any]]:
        request = _Run(orthanc_id, pipeline)
        self._queue.put(request)
        return request.done

    def pending(self) -> int:
        return self._queue.qsize()

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        self._queue.put(_STOP)
        if self._thread is not None:
            self._thread.join(timeout)
        self.bridge.close()

    def _loop(self) -> None:
        retry = False
        while True:
            try:
                item = self._queue.get(timeout=self.retry_s if retry else None)
            except queue.Empty:
                item = _WAKE
            if item == _STOP:
                return
            try:
                self.prepare()
                if isinstance(item, _Run):
                    self._run(item)
                else:
                    self.bridge.follow_changes(self._stopping.is_set)
                retry = False
            except Exception:
                if self._stopping.is_set():  # an import cut short by Orthanc stopping: replayed at start
                    return
                log.exception(
                    "radgate could not take Orthanc's stable studies; retrying in %g s", self.retry_s
                )
                retry = True

    def _run(self, request: _Run) -> None:
        try:
            submitted = self.bridge.submit(
                request.orthanc_id, request.pipeline, force=True, stop=self._stopping.is_set
            )
        except Exception as err:  # the caller answers with it; the change log is not concerned
            log.warning("on-demand run of Orthanc study %s failed: %s", request.orthanc_id, err)
            request.done.set_exception(err)
            return
        request.done.set_result(submitted.as_json(request.orthanc_id))


# --- REST routes -------------------------------------------------------------------------------

Answer = tuple[int, Any]
Handler = Callable[[str, dict[str, Any]], Answer]


def _send(output: Any, status: int, body: Any) -> None:
    data = json.dumps(body, indent=2).encode()
    if status == 200:
        output.AnswerBuffer(data, "application/json")
    else:
        output.SendHttpStatus(status, data.decode(), len(data))


def rest_route(method: str, handler: Handler) -> Callable[..., None]:
    """An Orthanc REST callback around ``handler(uri, request) -> (status, JSON)``; never raises."""

    def callback(output: Any, uri: str, **request: Any) -> None:
        try:
            if request.get("method") != method:
                output.SendMethodNotAllowed(method)
                return
            status, body = handler(uri, request)
        except Exception as err:
            log.exception("radgate REST %s %s failed", method, uri)
            status, body = 500, {"error": f"{type(err).__name__}: {err}"}
        try:
            _send(output, status, body)
        except Exception:
            log.exception("radgate REST %s %s: cannot answer", method, uri)
            with contextlib.suppress(Exception):
                output.SendHttpStatusCode(500)

    return callback


class Routes:
    """The handlers of ``/radgate/...``; Orthanc's own authentication applies to them."""

    def __init__(self, worker: PluginWorker) -> None:
        self.worker = worker
        self.bridge = worker.bridge

    def run(self, uri: str, request: dict[str, Any]) -> Answer:
        orthanc_id = str(request["groups"][0])
        try:
            body = request.get("body") or b"{}"
            wanted = RunRequest.model_validate_json(body)
            pipeline = None if wanted.pipeline is None else self.bridge.check_pipeline(wanted.pipeline)
        except ValidationError as err:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
            return 400, {"error": problems}
        except ValueError as err:
            return 400, {"error": str(err)}
        try:
            self.bridge.study_uid(orthanc_id)
        except Exception:
            return 404, {"error": f"no study {orthanc_id} in Orthanc"}
        done = self.worker.run(orthanc_id, pipeline)
        try:
            return 200, done.result(timeout=RUN_WAIT_S)
        except FutureTimeout:
            return 200, {"orthanc_study": orthanc_id, "state": "accepted", "jobs": None}
        except UnknownPipelineError as err:  # known by name, but its series declaration is not here
            return 400, {"error": str(err)}
        except LookupError as err:
            return 404, {"error": str(err)}

    def jobs(self, uri: str, request: dict[str, Any]) -> Answer:
        return 200, self.bridge.jobs()

    def status(self, uri: str, request: dict[str, Any]) -> Answer:
        """What the plugin has done and which Python runs it (torch must not be loaded here)."""
        import numpy
        import pydantic_core

        return 200, {
            "last_change": self.bridge.cursor.load(),
            "set_aside": self.bridge.cursor.set_aside_studies(),
            "pending": self.worker.pending(),
            "data_dir": str(self.bridge.config.data_dir.resolve()),
            "python": platform.python_version(),
            "numpy": numpy.__version__,
            "pydantic_core": pydantic_core.__version__,
            "torch_loaded": "torch" in sys.modules,
        }


# --- registration ------------------------------------------------------------------------------


def register(orthanc: ModuleType) -> PluginWorker | None:
    """Set the plugin up inside Orthanc; a configuration error leaves Orthanc running without it."""
    root = logging.getLogger()
    root.addHandler(OrthancLogHandler(orthanc))
    root.setLevel(logging.INFO)
    try:
        settings = PluginSettings.from_orthanc(json.loads(orthanc.GetConfiguration()))
        bridge = Bridge(
            settings.radgate_config(), OrthancRest(orthanc), settings.destinations, settings.max_attempts
        )
    except Exception as err:
        orthanc.LogError(f"radgate: plugin disabled: {err}")
        return None
    worker = PluginWorker(bridge, settings.retry_s)
    routes = Routes(worker)
    try:
        worker.prepare()
    except Exception:  # the worker thread tries again
        log.exception("radgate: cannot prepare the data dir and job store yet")

    def on_change(change_type: Any, level: Any, resource_id: str) -> None:
        try:
            if change_type == orthanc.ChangeType.STABLE_STUDY:
                worker.wake()
            elif change_type == orthanc.ChangeType.ORTHANC_STARTED:
                worker.start()
            elif change_type == orthanc.ChangeType.ORTHANC_STOPPED:
                worker.stop()
        except Exception:
            log.exception("radgate change callback failed")

    orthanc.RegisterOnChangeCallback(on_change)
    orthanc.RegisterRestCallback("/radgate/studies/([^/]+)/run", rest_route("POST", routes.run))
    orthanc.RegisterRestCallback("/radgate/jobs", rest_route("GET", routes.jobs))
    orthanc.RegisterRestCallback("/radgate/status", rest_route("GET", routes.status))
    orthanc.ExtendOrthancExplorer(EXPLORER_JS)
    log.info("radgate plugin ready: data dir %s", bridge.config.data_dir.resolve())
    return worker
