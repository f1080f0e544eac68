"""Run the real DICOM tools (DCMTK, dicom3tools, dcm2niix) as independent peers and validators.

Tests and the demo check radgate against programs it shares no code with. Binaries are looked up
only in system directories (never the virtualenv, where pynetdicom installs scripts with the same
names as DCMTK's): RADGATE_TOOL_PATH (os.pathsep-separated) overrides the search path.
DCMTK is run with TCP_NODELAY=1, without which it is very slow on loopback.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
import pydicom.errors
import pydicom.filereader
from pydicom.dataset import Dataset
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian

DEFAULT_TOOL_PATH = ("/usr/bin", "/usr/local/bin", "/usr/sbin")
DEFAULT_CALLING_AE = "RADGATE_TEST"


class ToolNotFoundError(RuntimeError):
    """A required external program is not installed where we look for it."""


def tool_path(name: str) -> str:
    """Absolute path of an external program, or ToolNotFoundError saying which package provides it."""
    env = os.environ.get("RADGATE_TOOL_PATH")
    dirs = env.split(os.pathsep) if env is not None else list(DEFAULT_TOOL_PATH)
    found = shutil.which(name, path=os.pathsep.join(d for d in dirs if d))
    if found is None:
        raise ToolNotFoundError(
            f"{name} not found in {dirs} (install the Debian package {_PACKAGES.get(name, name)!r}, "
            "or point RADGATE_TOOL_PATH at its directory)"
        )
    return found


_PACKAGES = {
    "storescu": "dcmtk",
    "echoscu": "dcmtk",
    "findscu": "dcmtk",
    "dciodvfy": "dicom3tools",
    "dcm2niix": "dcm2niix",
    "Orthanc": "orthanc",
}


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the OS picks it); the caller binds it soon after."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class ToolResult:
    """What an external program did: its command line, exit code and output."""

    args: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    def check(self) -> ToolResult:
        """Return self, or raise with the tail of the output when the program failed."""
        if not self.ok:
            raise subprocess.CalledProcessError(self.returncode, list(self.args), self.stdout, self.stderr)
        return self


def _run(args: Sequence[str], timeout: float, cwd: Path | None = None) -> ToolResult:
    env = {**os.environ, "TCP_NODELAY": "1"}
    proc = subprocess.run(
        list(args), capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd, check=False
    )
    return ToolResult(tuple(args), proc.returncode, proc.stdout, proc.stderr)


def _association(host: str, port: int, called_ae: str, calling_ae: str) -> list[str]:
    return ["-aet", calling_ae, "-aec", called_ae, host, str(port)]


@dataclass(frozen=True)
class StoreResult(ToolResult):
    """storescu's result plus one (file, status text) per C-STORE response, in sending order.

    Status text is DCMTK's wording, e.g. "Success", "Warning: Coercion of Data Elements",
    "Error: Failed - ..."; `statuses` is empty when storescu did not run verbosely.
    """

    statuses: tuple[tuple[str, str], ...] = field(default=())

    @property
    def all_succeeded(self) -> bool:
        return self.ok and bool(self.statuses) and all(s == "Success" for _, s in self.statuses)


_SENDING = re.compile(r"^I: Sending file: (.+)$")
_RESPONSE = re.compile(r"^I: Received Store Response \((.+)\)$")
_FAILED = re.compile(r"^E: Store Failed, file: (.+):$")

# storescu proposes only uncompressed syntaxes unless told; these flags add the file's own.
_PROPOSE_FLAGS = {
    "1.2.840.10008.1.2": "-xi",
    "1.2.840.10008.1.2.2": "-xb",
    "1.2.840.10008.1.2.1.99": "-xd",
    "1.2.840.10008.1.2.4.50": "-xy",
    "1.2.840.10008.1.2.4.51": "-xx",
    "1.2.840.10008.1.2.4.70": "-xs",
    "1.2.840.10008.1.2.4.80": "-xt",
    "1.2.840.10008.1.2.4.81": "-xu",
    "1.2.840.10008.1.2.4.90": "-xv",
    "1.2.840.10008.1.2.4.91": "-xw",
    "1.2.840.10008.1.2.5": "-xr",
}


def _parse_store_statuses(output: str) -> tuple[tuple[str, str], ...]:
    statuses: list[tuple[str, str]] = []
    current = ""
    for raw in output.splitlines():
        line = raw.strip()
        if m := _SENDING.match(line):
            current = m.group(1)
        elif m := _RESPONSE.match(line):
            statuses.append((current, m.group(1)))
        elif m := _FAILED.match(line):
            statuses.append((m.group(1), "Failed to send"))
    return tuple(statuses)


def _first_file(paths: Sequence[str]) -> Path | None:
    for p in map(Path, paths):
        if p.is_file():
            return p
        found = next((f for f in sorted(p.rglob("*")) if f.is_file()), None) if p.is_dir() else None
        if found is not None:
            return found
    return None


def _transfer_syntax(path: Path) -> str:
    """A file's transfer syntax from its meta header alone; "" when unreadable or absent."""
    try:
        return str(pydicom.filereader.read_file_meta_info(path).get("TransferSyntaxUID", ""))
    except (OSError, pydicom.errors.InvalidDicomError):
        return ""


def _propose_flag(paths: Sequence[str]) -> list[str]:
    """The storescu flag proposing the first file's transfer syntax, when it is not the default."""
    first = _first_file(paths)
    flag = _PROPOSE_FLAGS.get(_transfer_syntax(first)) if first is not None else None
    return [flag] if flag else []


def storescu(
    host: str,
    port: int,
    called_ae: str,
    paths: Iterable[str | Path],
    calling_ae: str = DEFAULT_CALLING_AE,
    extra_args: Sequence[str] = (),
    timeout: float = 300.0,
    propose_own_syntax: bool = True,
) -> StoreResult:
    """Send files and directories (scanned recursively) with DCMTK storescu, verbosely, to parse statuses.

    propose_own_syntax adds the proposal flag for the first file's transfer syntax (J2K, RLE, ...),
    so compressed series go as they are instead of failing a conversion storescu cannot do.
    """
    files = [str(p) for p in paths]
    if not files:
        raise ValueError("storescu needs at least one file or directory")
    propose = _propose_flag(files) if propose_own_syntax else []
    args = [tool_path("storescu"), "-v", "+sd", "+r", *propose, *extra_args]
    result = _run([*args, *_association(host, port, called_ae, calling_ae), *files], timeout)
    return StoreResult(
        result.args, result.returncode, result.stdout, result.stderr, _parse_store_statuses(result.output)
    )


def echoscu(
    host: str,
    port: int,
    called_ae: str,
    calling_ae: str = DEFAULT_CALLING_AE,
    extra_args: Sequence[str] = (),
    timeout: float = 60.0,
) -> ToolResult:
    """One C-ECHO with DCMTK echoscu; `ok` is True when the peer answered."""
    return _run(
        [tool_path("echoscu"), *extra_args, *_association(host, port, called_ae, calling_ae)], timeout
    )


@dataclass(frozen=True)
class FindResult(ToolResult):
    """findscu's result plus the matching identifiers it received."""

    matches: tuple[Dataset, ...] = field(default=())


def findscu(
    host: str,
    port: int,
    called_ae: str,
    keys: Mapping[str, str],
    level: str = "STUDY",
    calling_ae: str = DEFAULT_CALLING_AE,
    extra_args: Sequence[str] = (),
    timeout: float = 60.0,
) -> FindResult:
    """A Study Root C-FIND; keys map DICOM keywords to match values ("" asks for the value back)."""
    with tempfile.TemporaryDirectory(prefix="radgate-findscu-") as out:
        key_args = [a for k, v in {"QueryRetrieveLevel": level, **keys}.items() for a in ("-k", f"{k}={v}")]
        args = [tool_path("findscu"), "-S", "-X", "-od", out, *key_args, *extra_args]
        result = _run([*args, *_association(host, port, called_ae, calling_ae)], timeout)
        matches = tuple(pydicom.dcmread(p) for p in sorted(Path(out).glob("rsp*.dcm")))
    return FindResult(result.args, result.returncode, result.stdout, result.stderr, matches)


@dataclass(frozen=True)
class Validation:
    """dciodvfy's verdict on one file: its Error and Warning lines and the whole output."""

    errors: tuple[str, ...]
    warnings: tuple[str, ...]
    output: str

    @property
    def ok(self) -> bool:
        return not self.errors


def dciodvfy(path: str | Path, timeout: float = 120.0) -> Validation:
    """Validate a file against its IOD with dicom3tools' dciodvfy.

    dciodvfy cannot read deflated files, so those are checked as an Explicit VR Little Endian copy.
    """
    exe = tool_path("dciodvfy")
    target = Path(path)
    with tempfile.TemporaryDirectory(prefix="radgate-dciodvfy-") as tmp:
        if _transfer_syntax(target) == DeflatedExplicitVRLittleEndian:
            ds = pydicom.dcmread(target)
            plain = Dataset()
            plain.update(ds)
            plain.file_meta = ds.file_meta
            plain.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            target = Path(tmp) / "inflated.dcm"
            plain.save_as(target, enforce_file_format=True)
        result = _run([exe, str(target)], timeout)
    lines = [line.strip() for line in result.output.splitlines()]
    return Validation(
        tuple(line for line in lines if "Error - " in line or line.startswith("Error")),
        tuple(line for line in lines if "Warning - " in line or line.startswith("Warning")),
        result.output,
    )


def dcm2niix(directory: str | Path, out_dir: str | Path | None = None, timeout: float = 300.0) -> Path:
    """Convert one series folder to gzipped NIfTI with dcm2niix and return the main .nii.gz.

    dcm2niix may write variants beside it (e.g. "_Tilt_1" for a tilted CT); the main file is the one
    with the shortest name.
    """
    src = Path(directory)
    out = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="radgate-dcm2niix-"))
    out.mkdir(parents=True, exist_ok=True)
    result = _run(
        [tool_path("dcm2niix"), "-z", "y", "-b", "n", "-f", "%s", "-o", str(out), str(src)], timeout
    )
    produced = sorted(out.glob("*.nii.gz"), key=lambda p: (len(p.name), p.name))
    if not result.ok or not produced:
        raise RuntimeError(
            f"dcm2niix made no NIfTI from {src} (exit {result.returncode}): {result.output[-2000:]}"
        )
    return produced[0]
