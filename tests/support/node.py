"""Helpers for the receiving-node tests: tiny CT instances, free ports, waiting on conditions."""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest
import yaml
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, CTImageStorage, ExplicitVRLittleEndian, generate_uid
from sqlalchemy.sql.compiler import SQLCompiler

from plugin.store.models import utcnow
from plugin.store.recording import HeaderTags, InstanceRecord

T = TypeVar("T")


def ct_instance(study_uid: str, series_uid: str, number: int, size: int = 16) -> Dataset:
    """A small but complete CT Image instance (no patient data beyond a dummy ID)."""
    sop_uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.PatientID = "PHANTOM"
    ds.AccessionNumber = "ACC1"
    ds.Modality = "CT"
    ds.SeriesNumber = 1
    ds.InstanceNumber = number
    ds.ImagePositionPatient = [0.0, 0.0, float(number)]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.PixelSpacing = [1.0, 1.0]
    ds.SliceThickness = 1.0
    ds.Rows = ds.Columns = size
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleIntercept = -1024
    ds.RescaleSlope = 1
    ds.PixelData = (np.arange(size * size, dtype=np.int16) + number).tobytes()
    return ds


def write_series(directory: Path, count: int, study_uid: str | None = None, size: int = 16) -> list[Path]:
    """Write ``count`` instances of one new series (of ``study_uid`` or a new study) as Part 10 files."""
    directory.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or generate_uid()
    series_uid = generate_uid()
    paths = []
    for k in range(count):
        ds = ct_instance(study_uid, series_uid, k + 1, size)
        path = directory / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def instance_record(
    study_uid: str,
    series_uid: str | None = None,
    sop: str | None = None,
    key: str | None = "a1",
    received_at: datetime | None = None,
    calling_ae: str | None = None,
    accession_number: str | None = None,
) -> InstanceRecord:
    """What the spool records for one CT instance (no file behind it); new UIDs where none are given."""
    sop = sop or generate_uid()
    series_uid = series_uid or generate_uid()
    return InstanceRecord(
        study_uid=study_uid,
        series_uid=series_uid,
        sop_instance_uid=sop,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        transfer_syntax="1.2.840.10008.1.2.1",
        spool_path=f"{study_uid}/{series_uid}/{sop}.dcm",
        size=1,
        received_at=received_at or utcnow(),
        calling_ae=calling_ae,
        association_key=key,
        tags=HeaderTags(accession_number=accession_number),
    )


def compiled_statements(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """From now on, the kind of each statement SQLAlchemy compiles (a warm path compiles none)."""
    compiled: list[str] = []
    compile_statement = SQLCompiler.__init__

    def counted(self: SQLCompiler, *args: Any, **kwargs: Any) -> None:
        compiled.append(type(args[1]).__name__ if len(args) > 1 else "?")
        compile_statement(self, *args, **kwargs)

    monkeypatch.setattr(SQLCompiler, "__init__", counted)
    return compiled


def held_incoming(directory: Path) -> list[Path]:
    """Incoming files that hold bytes: partial or kept datasets. The receiving processes' files made
    ahead (empty until a C-STORE takes one) are not leftovers; a file renamed away meanwhile is gone."""
    held = []
    for path in directory.iterdir():
        try:
            if path.stat().st_size > 0:
                held.append(path)
        except FileNotFoundError:  # renamed into the spool or removed between listing and stat
            continue
    return sorted(held)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(condition: Callable[[], T], timeout: float, what: str, interval: float = 0.05) -> T:
    """Poll ``condition`` until it returns something truthy, or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def kill_until_gone(find: Callable[[], Iterable[int]], timeout: float, what: str) -> None:
    """SIGKILL the processes ``find()`` names, again and again until it names none (so those they
    started meanwhile go too); AssertionError (`wait_for`) if some are left after ``timeout`` s."""

    def none_left() -> bool:
        left = list(find())
        for pid in left:
            with contextlib.suppress(ProcessLookupError):  # ended meanwhile
                os.kill(pid, signal.SIGKILL)
        return not left

    wait_for(none_left, timeout, what)


def self_signed_cert(key: Path, cert: Path, subject: str, *extensions: str) -> None:
    """Write a throwaway self-signed RSA key and certificate (one day) with openssl; ``-addext`` each."""
    request = ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", subject]
    added = [arg for extension in extensions for arg in ("-addext", extension)]
    files = ["-keyout", str(key), "-out", str(cert)]
    subprocess.run([*request, *added, *files], check=True, capture_output=True, timeout=60)


RADGATE = Path(sys.executable).with_name("radgate")
STORESCU = "/usr/bin/storescu"
ECHOSCU = "/usr/bin/echoscu"
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}


class NodeProcess:
    """``radgate serve`` as a real subprocess on a free port, with its own data dir and log file.

    The node receives in its own process (``dicom.receivers: 1``) unless ``settings`` give
    ``dicom.receivers``: the product's default (2) spawns that many receiving processes at every
    start, which only the tests about receiving processes need, and which those tests ask for.
    Likewise it serves no web console unless ``settings`` give ``web`` (then on a free port, unless
    they give one): most tests never open it, and it costs every start its import.
    """

    def __init__(self, workdir: Path, settings: dict[str, Any] | None = None) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.data_dir = workdir / "data"
        self.config_path = workdir / "radgate.yaml"
        config: dict[str, Any] = {
            "data_dir": str(self.data_dir),
            "dicom": {"port": free_port(), "host": "127.0.0.1", "receivers": 1},
            "completion": {"quiet_period_s": 2.0, "after_release_s": 0.5},
            # where the settings name it, the console on a free port: nodes run side by side
            "web": {"port": 0} if settings and "web" in settings else {"enabled": False},
        }
        self._own_port = True  # a port this class chose: another is chosen if it is taken meanwhile
        for key, value in (settings or {}).items():
            if isinstance(value, dict):
                if key == "dicom" and "port" in value:
                    self._own_port = False
                config.setdefault(key, {}).update(value)
            else:
                config[key] = value
        self._config = config
        self.data_dir = Path(config["data_dir"])  # the settings' data dir, if they give one
        self.port = int(config["dicom"]["port"])
        self.config_path.write_text(yaml.safe_dump(config))
        self.log_path = workdir / "node.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, preexec_fn: Callable[[], None] | None = None) -> NodeProcess:
        """Start ``radgate serve`` and wait for its own "radgate serving" line (logged once it has
        bound its port: a connect alone might reach another process that took the port meanwhile).
        free_port() releases the port it found, so another node may bind it first: then the start
        is tried again on a new port."""
        for _attempt in range(5):
            self.log_path.touch()
            logged = self.log_path.stat().st_size  # a restart appends to the same log
            log = self.log_path.open("ab")
            self.process = subprocess.Popen(
                [str(RADGATE), "serve", "--config", str(self.config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=preexec_fn,
            )
            log.close()
            try:
                if (
                    wait_for(functools.partial(self._serving, logged), 180, "radgate serve to serve")
                    == "serving"
                ):
                    return self
            except BaseException:
                self.kill()  # a node that did not come up must not outlive its test
                raise
            self.port = free_port()  # the port was taken before the node bound it
            self._config["dicom"]["port"] = self.port
            self.config_path.write_text(yaml.safe_dump(self._config))
        raise AssertionError(f"radgate serve found its port taken five times:\n{self.log()}")

    def _serving(self, logged: int) -> str | None:
        """ "serving" once this start logged that it serves on self.port; "port taken" if it exited
        because its DICOM port was in use (and the port is one this class chose); None until then."""
        assert self.process is not None
        with self.log_path.open("rb") as f:
            f.seek(logged)
            text = f.read().decode(errors="replace")
        if "radgate serving: AE " in text and f":{self.port}, data dir " in text:
            return "serving"
        if "radgate worker: no DICOM listener" in text:
            return "serving"
        if self.process.poll() is None:
            return None
        bind = f"Address already in use (while attempting to bind on address ('127.0.0.1', {self.port}))"
        if self._own_port and "cannot start the node" in text and bind in text:
            return "port taken"
        raise AssertionError(f"radgate serve exited with {self.process.returncode}:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        """SIGTERM and wait; the exit status (SIGKILL after 20 s, which fails the caller's check)."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        return self.process.returncode

    def stop_if_running(self) -> None:
        """At a fixture's end: a node still running is stopped and must exit 0 (its log in the
        failure); one that a test stopped or killed is left as it is."""
        if self.process is not None and self.process.poll() is None:
            assert self.stop() == 0, self.log()

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait(10)

    def _listing(self, command: str, cli: bool) -> list[dict[str, Any]]:
        """What ``radgate COMMAND --json`` prints for this node (studies, jobs, deliveries).

        cli: run the ``radgate`` command; False runs the same command line in this process (for
        polling: no interpreter start, which costs most of a second of CPU per call).
        """
        argv = [command, "--json", "--config", str(self.config_path)]
        if not cli:
            from plugin.cli.main import main

            printed = io.StringIO()
            with contextlib.redirect_stdout(printed):
                assert main(argv) == 0, f"radgate {command} failed"
            return list(json.loads(printed.getvalue()))
        out = subprocess.run([str(RADGATE), *argv], check=True, capture_output=True, timeout=60)
        return list(json.loads(out.stdout))

    def studies(self, cli: bool = True) -> list[dict[str, Any]]:
        return self._listing("studies", cli)

    def jobs(self, cli: bool = True) -> list[dict[str, Any]]:
        return self._listing("jobs", cli)

    def deliveries(self, cli: bool = True) -> list[dict[str, Any]]:
        return self._listing("deliveries", cli)

    def storescu(
        self, *files: Path, calling_ae: str = "STORESCU", options: tuple[str, ...] = ()
    ) -> subprocess.CompletedProcess[str]:
        """Send files with DCMTK storescu (verbose, so every response status is in the output)."""
        command = [
            STORESCU,
            "-v",
            *options,
            "-aet",
            calling_ae,
            "-aec",
            "RADGATE",
            "127.0.0.1",
            str(self.port),
        ]
        return subprocess.run(
            [*command, *map(str, files)], capture_output=True, text=True, timeout=120, env=DCMTK_ENV
        )

    def echoscu(self, calling_ae: str = "ECHOSCU") -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [ECHOSCU, "-v", "-aet", calling_ae, "-aec", "RADGATE", "127.0.0.1", str(self.port)],
            capture_output=True,
            text=True,
            timeout=60,
            env=DCMTK_ENV,
        )
