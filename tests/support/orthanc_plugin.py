"""Helpers for the Orthanc plugin tests: Debian's Orthanc running radgate's plugin, a radgate worker.

The plugin is loaded exactly as a site loads it: Orthanc's Python plugin runs
orthanc_config/radgate_plugin.py, which finds this repository and the .venv by itself.
"""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path
from typing import Any

import yaml

from dicom_io.testing.orthanc_server import OrthancServer, wait_until
from plugin.orthanc.bridge import ChangeCursor
from support.node import DCMTK_ENV, RADGATE, STORESCU, free_port

REPO = Path(__file__).resolve().parents[2]
LOADER = REPO / "orthanc_config" / "radgate_plugin.py"
RULES = [{"name": "chest", "match": {"Modality": {"equals": "CT"}}, "pipeline": "ct-lung"}]
POLL_S = 0.25
"""How often the waits ask Orthanc: each question is a REST call, some into the plugin's Python, and
Orthanc's stable age (2 s unless a test sets another) is what they wait for."""


class PluginSite:
    """One Orthanc with the radgate plugin, its radgate config and data dir, and a radgate worker."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.ports = (free_port(), free_port())
        self.data_dir = workdir / "radgate-data"
        self.config_path = workdir / "radgate.yaml"
        config: dict[str, Any] = {
            "data_dir": str(self.data_dir),
            "rules": RULES,
            "destinations": {"orthanc": {"kind": "orthanc", "url": f"http://127.0.0.1:{self.ports[0]}"}},
            "executor": {"poll_s": 0.2},
            "dispatch": {
                "poll_interval_s": 0.2,
                "retry_base_s": 0.5,
                "retry_max_s": 1.0,
                "max_attempts": 1000,
            },
        }
        self.config_path.write_text(yaml.safe_dump(config))
        self.cursor = ChangeCursor(self.data_dir / "orthanc-changes.json")
        self.stable_age = 2
        """Orthanc's StableAge (s) for the starts to come."""
        self.orthanc: OrthancServer | None = None
        self.worker: subprocess.Popen[bytes] | None = None

    def server(self, plugin: bool = True, env: dict[str, str] | None = None) -> OrthancServer:
        """An Orthanc on this site's ports and storage (not started), with or without the plugin."""
        return OrthancServer(
            python_script=LOADER if plugin else None,
            stable_age=self.stable_age,
            workdir=self.workdir / "orthanc",
            ports=self.ports,
            extra_config={"Radgate": {"ConfigFile": str(self.config_path)}},
            env=env,
        )

    def start_orthanc(self, plugin: bool = True, env: dict[str, str] | None = None) -> OrthancServer:
        self.orthanc = self.server(plugin, env).start()
        return self.orthanc

    def stop_orthanc(self, kill: bool = False) -> None:
        """Stop Orthanc cleanly (its plugin sees Orthanc stopping), or kill it: a crash, or a test
        done with it (a clean stop takes Orthanc about 3 s)."""
        if self.orthanc is not None:
            self.orthanc.stop(kill=kill)

    def start_worker(self) -> None:
        log = (self.workdir / "worker.log").open("ab")
        self.worker = subprocess.Popen(
            [str(RADGATE), "worker", "--config", str(self.config_path)], stdout=log, stderr=subprocess.STDOUT
        )
        log.close()

    def worker_log(self) -> str:
        path = self.workdir / "worker.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop_worker(self) -> int | None:
        if self.worker is None:
            return None
        if self.worker.poll() is None:
            self.worker.send_signal(signal.SIGTERM)
            try:
                self.worker.wait(30)
            except subprocess.TimeoutExpired:
                self.worker.kill()
                self.worker.wait(10)
        return self.worker.returncode

    def stop(self) -> None:
        """The end of a test: the worker stopped, Orthanc killed (a test checks a clean stop itself)."""
        self.stop_worker()
        self.stop_orthanc(kill=True)

    # ------------------------------------------------------------------ talking to it

    def storescu(self, files: list[Path]) -> None:
        """Send files into Orthanc with DCMTK (never pynetdicom's script of the same name)."""
        assert self.orthanc is not None
        command = [STORESCU, "-aet", "MODALITY", "-aec", "ORTHANC", "127.0.0.1", str(self.orthanc.dicom_port)]
        sent = subprocess.run(
            [*command, *map(str, files)], capture_output=True, text=True, timeout=120, env=DCMTK_ENV
        )
        assert sent.returncode == 0, sent.stdout + sent.stderr

    def jobs(self, study_uid: str | None = None) -> list[dict[str, Any]]:
        """radgate's jobs, through the plugin's REST route."""
        assert self.orthanc is not None
        jobs: list[dict[str, Any]] = self.orthanc.rest_get("/radgate/jobs")
        return [j for j in jobs if study_uid is None or j["study_uid"] == study_uid]

    def stable_changes(self, orthanc_id: str) -> list[int]:
        """Sequence numbers of the StableStudy changes Orthanc logged for a study."""
        assert self.orthanc is not None
        changes = self.orthanc.rest_get("/changes", since=0, limit=10000)["Changes"]
        return [c["Seq"] for c in changes if c["ChangeType"] == "StableStudy" and c["ID"] == orthanc_id]

    def handled(self, seq: int) -> bool:
        """The plugin has handled Orthanc's changes up to ``seq``."""
        assert self.orthanc is not None
        return int(self.orthanc.rest_get("/radgate/status")["last_change"] or 0) >= seq

    def wait_stable(self, study_uid: str, times: int = 1, timeout: float = 60) -> str:
        """Wait until Orthanc called the study stable ``times`` times and the plugin handled it; its id."""
        assert self.orthanc is not None
        server = self.orthanc
        orthanc_id = wait_until(
            lambda: server.study_id(study_uid), timeout, f"study {study_uid} in Orthanc", POLL_S
        )

        def stable() -> list[int] | None:
            found = self.stable_changes(orthanc_id)
            return found if len(found) >= times else None

        seqs = wait_until(stable, timeout, f"study {study_uid} stable {times} time(s)", POLL_S)
        wait_until(lambda: self.handled(seqs[-1]), timeout, "the plugin to handle the stable study", POLL_S)
        return orthanc_id
