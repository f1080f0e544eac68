"""The real validators (dciodvfy, pixelmed DicomSRValidator, dsrdump, OHIF's loaders) as functions.

Each returns a `Validation`: whether the tool ran, whether the object passed, and the lines that
say why not. Tests and the node's self-check use these instead of parsing tool output themselves.
A missing tool gives `ran=False` with the reason, never a silent pass.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import select
import shutil
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

PIXELMED_JAR = Path("/usr/share/java/pixelmed.jar")
"""Debian's pixelmed (package libpixelmed-java, which pixelmed-apps' DicomSRValidator runs)."""
_PIXELMED_RUNNER = Path(__file__).with_name("PixelmedSrValidator.java")
# Debian's JDK 17 stops pixelmed's XPath-heavy template checks at the default JAXP limits. The
# client compiler alone and the serial collector halve the CPU time of a validation.
_PIXELMED_JAVA_OPTIONS = (
    "-Djdk.xml.xpathExprOpLimit=0",
    "-Djdk.xml.xpathExprGrpLimit=0",
    "-Djdk.xml.xpathTotalOpLimit=0",
    "-XX:TieredStopAtLevel=1",
    "-XX:+UseSerialGC",
)
_TIMEOUT_S = 300


@dataclass(frozen=True)
class Validation:
    """One validator run: `ok` only when the tool ran and reported no error."""

    tool: str
    ran: bool
    ok: bool
    errors: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()
    output: str = field(default="", repr=False)

    def __str__(self) -> str:
        if not self.ran:
            return f"{self.tool}: did not run: {'; '.join(self.errors)}"
        verdict = "ok" if self.ok else "FAILED"
        head = f"{self.tool}: {verdict} ({len(self.errors)} errors, {len(self.warnings)} warnings)"
        return "\n".join([head, *self.errors])


def _run(
    tool: str, argv: Sequence[str], env: dict[str, str] | None = None, cwd: Path | None = None
) -> tuple[int, str] | Validation:
    """Run a tool; a Validation that says it did not run when it is missing or hangs."""
    if shutil.which(argv[0]) is None:
        return Validation(tool, ran=False, ok=False, errors=(f"{argv[0]} not installed",))
    try:
        done = subprocess.run(
            list(argv),
            capture_output=True,
            text=True,
            errors="replace",
            timeout=_TIMEOUT_S,
            env={**os.environ, **(env or {})},
            cwd=cwd,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return Validation(tool, ran=False, ok=False, errors=(f"timed out after {_TIMEOUT_S} s",))
    return done.returncode, done.stdout + done.stderr


def _dicom3tools(tool: str, args: Sequence[str]) -> Validation:
    """Run a dicom3tools checker: lines starting `Error` fail, `Warning` lines are reported."""
    result = _run(tool, [tool, *args])
    if isinstance(result, Validation):
        return result
    _, output = result
    lines = output.splitlines()
    errors = tuple(line for line in lines if line.startswith("Error"))
    warnings = tuple(line for line in lines if line.startswith("Warning"))
    return Validation(tool, ran=True, ok=not errors, errors=errors, warnings=warnings, output=output)


def dciodvfy(path: Path) -> Validation:
    """dicom3tools' IOD check (`-new`): lines starting `Error` fail, `Warning` lines are reported."""
    return _dicom3tools("dciodvfy", ["-new", str(path)])


def dcentvfy(paths: Sequence[Path]) -> Validation:
    """dicom3tools' consistency check across instances of one study (patient/study attributes agree)."""
    return _dicom3tools("dcentvfy", [str(p) for p in paths])


class _PixelmedJvm:
    """One JVM per process running PixelmedSrValidator.java (compiled on first use, cached in the
    temporary folder): a validation costs the validator's work alone, not a JVM and its set-up, and
    the template pass runs once per distinct content tree (the runner's docstring says why that is
    the same verdict)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._process: subprocess.Popen[bytes] | None = None
        self._end = f"radgate-pixelmed-end-{uuid.uuid4().hex}".encode()
        atexit.register(self.stop)

    def validate(self, path: Path) -> str | Validation:
        """What DicomSRValidator prints for `path`; a Validation that says why it did not run."""
        for tool in ("java", "javac"):
            if shutil.which(tool) is None:
                return Validation("DicomSRValidator", ran=False, ok=False, errors=(f"{tool} not installed",))
        if not PIXELMED_JAR.is_file():
            return Validation(
                "DicomSRValidator", ran=False, ok=False, errors=(f"{PIXELMED_JAR} not installed",)
            )
        with self._lock:
            try:
                process = self._start()
                assert process.stdin is not None
                process.stdin.write(f"{path.resolve()}\n".encode())
                process.stdin.flush()
                return self._read_output(process)
            except (OSError, TimeoutError, subprocess.CalledProcessError) as err:
                self.stop()
                return Validation("DicomSRValidator", ran=False, ok=False, errors=(str(err),))

    def _start(self) -> subprocess.Popen[bytes]:
        if self._process is not None and self._process.poll() is None:
            return self._process
        classpath = f"{PIXELMED_JAR}{os.pathsep}{_compiled_runner()}"
        self._process = subprocess.Popen(
            ["java", *_PIXELMED_JAVA_OPTIONS, "-cp", classpath, _PIXELMED_RUNNER.stem, self._end.decode()],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        return self._process

    def _read_output(self, process: subprocess.Popen[bytes]) -> str:
        """What the JVM printed up to the end line; OSError when it died, TimeoutError after _TIMEOUT_S."""
        assert process.stdout is not None
        fd = process.stdout.fileno()
        end = b"\n" + self._end + b"\n"
        deadline = time.monotonic() + _TIMEOUT_S
        output = bytearray()
        while end not in output:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"timed out after {_TIMEOUT_S} s")
            if select.select([fd], [], [], remaining)[0]:
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    tail = " | ".join(output.decode(errors="replace").splitlines()[-5:])
                    raise OSError(f"the JVM exited: {tail or 'no output'}")
                output += chunk
        return output[: output.index(end)].decode(errors="replace")

    def stop(self) -> None:
        """End the JVM (it exits at the end of its input); a later validation starts another."""
        process, self._process = self._process, None
        if process is None:
            return
        if process.stdin is not None:
            process.stdin.close()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()


def _compiled_runner() -> Path:
    """The folder holding PixelmedSrValidator.class, compiled once per source and pixelmed version
    into the temporary folder (shared by processes: written aside, then renamed into place)."""
    key = hashlib.sha256(_PIXELMED_RUNNER.read_bytes() + str(PIXELMED_JAR.resolve()).encode()).hexdigest()
    target = Path(tempfile.gettempdir()) / f"radgate-pixelmed-{key[:16]}"
    if (target / f"{_PIXELMED_RUNNER.stem}.class").is_file():
        return target
    build = Path(tempfile.mkdtemp(prefix=f"{target.name}.", dir=target.parent))
    subprocess.run(
        ["javac", "-cp", str(PIXELMED_JAR), "-d", str(build), str(_PIXELMED_RUNNER)],
        check=True,
        capture_output=True,
        timeout=_TIMEOUT_S,
    )
    try:
        build.rename(target)
    except OSError:  # another process was first
        shutil.rmtree(build, ignore_errors=True)
    return target


_PIXELMED = _PixelmedJvm()


def pixelmed_sr(path: Path) -> Validation:
    """pixelmed's DicomSRValidator (IOD + TID 1500 templates); no `IOD validation complete` = not run.

    Runs in one JVM per process, kept for later validations (PixelmedSrValidator.java); needs a JDK.
    """
    output = _PIXELMED.validate(path)
    if isinstance(output, Validation):
        return output
    lines = output.splitlines()
    if not any("IOD validation complete" in line for line in lines):
        tail = tuple(lines[-5:]) or ("no output",)
        return Validation("DicomSRValidator", ran=False, ok=False, errors=tail, output=output)
    errors = tuple(line for line in lines if line.startswith("Error") or "Error:" in line)
    warnings = tuple(line for line in lines if line.startswith("Warning") or "Warning:" in line)
    return Validation(
        "DicomSRValidator", ran=True, ok=not errors, errors=errors, warnings=warnings, output=output
    )


def dsrdump(path: Path) -> Validation:
    """DCMTK's SR dump with codes, units and long text: the SR must parse and print without errors."""
    result = _run("dsrdump", ["dsrdump", "+Pt", "+Pc", "+Pu", str(path)])
    if isinstance(result, Validation):
        return result
    code, output = result
    errors = tuple(line for line in output.splitlines() if line.startswith(("E:", "F:")))
    if code != 0 and not errors:
        errors = (f"exit status {code}",)
    warnings = tuple(line for line in output.splitlines() if line.startswith("W:"))
    return Validation("dsrdump", ran=True, ok=not errors, errors=errors, warnings=warnings, output=output)


def _viewercheck_argv(seg: Path | None, sr: Path | None, source_dir: Path) -> list[str]:
    """check.js's arguments for one SEG and/or SR over the source images in source_dir."""
    argv = ["--source", str(source_dir)]
    if seg is not None:
        argv += ["--seg", str(seg)]
    if sr is not None:
        argv += ["--sr", str(sr)]
    return argv


def _viewercheck_result(code: int, output: str) -> Validation:
    """A Validation from check.js's exit status and output: FAIL lines fail, WARN lines are reported."""
    lines = output.splitlines()
    if not any(line.startswith("viewercheck:") for line in lines):
        return Validation(
            "viewercheck", ran=False, ok=False, errors=tuple(lines[-5:]) or ("no output",), output=output
        )
    errors = tuple(line for line in lines if line.startswith("FAIL"))
    warnings = tuple(line for line in lines if line.startswith("WARN"))
    return Validation(
        "viewercheck", ran=True, ok=code == 0 and not errors, errors=errors, warnings=warnings, output=output
    )


def _viewercheck_unprepared(tool_dir: Path) -> Validation | None:
    """A Validation saying viewercheck cannot run, where tool_dir has no node_modules (no `npm ci`)."""
    if (tool_dir / "node_modules").is_dir():
        return None
    return Validation("viewercheck", ran=False, ok=False, errors=(f"no node_modules in {tool_dir} (npm ci)",))


def viewercheck(tool_dir: Path, seg: Path | None, sr: Path | None, source_dir: Path) -> Validation:
    """OHIF 3.13's own SEG and SR loaders, headless (`check.js`, after `npm ci` in tool_dir)."""
    script = tool_dir / "check.js"
    if (unprepared := _viewercheck_unprepared(tool_dir)) is not None:
        return unprepared
    result = _run("viewercheck", ["node", str(script), *_viewercheck_argv(seg, sr, source_dir)], cwd=tool_dir)
    if isinstance(result, Validation):
        return result
    return _viewercheck_result(*result)


# check.js run once per job in one Node process: argv[1] is check.js, argv[2] the end marker, the jobs
# (check.js argument lists) a JSON array on stdin. check.js is evaluated afresh for each job, so each
# job runs check.js's own main() and builds its own OHIF runtime; what a job shares with the earlier
# ones is Node's module cache (OHIF's and Cornerstone3D's code, loaded once: most of a run's cost).
# A job ends with check.js's summary line (or its usage error); the runner then prints the end marker
# and check.js's exit status.
_VIEWERCHECK_BATCH = r"""
'use strict';
const check = process.argv[1], end = process.argv[2];
const jobs = JSON.parse(require('fs').readFileSync(0, 'utf8'));
let finished = null;
function watch(stream, done) {
  const write = stream.write.bind(stream);
  stream.write = (chunk, ...rest) => {
    const written = write(chunk, ...rest);
    if (finished && done(String(chunk))) {
      const resolve = finished;
      finished = null;
      setImmediate(resolve);  // after check.js has set process.exitCode
    }
    return written;
  };
  return write;
}
const out = watch(process.stdout, text => /^viewercheck: \d+ passed, \d+ failed$/m.test(text));
watch(process.stderr, text => text.includes('usage: node check.js'));
(async () => {
  for (const args of jobs) {
    process.argv = [process.argv[0], check, ...args];
    process.exitCode = undefined;
    await new Promise(resolve => {
      finished = resolve;
      delete require.cache[check];
      require(check);
    });
    out(`${end} ${process.exitCode === undefined ? 0 : process.exitCode}\n`);
  }
  process.exitCode = 0;
})();
"""


def viewercheck_many(
    tool_dir: Path, jobs: Sequence[tuple[Path | None, Path | None, Path]]
) -> list[Validation]:
    """`viewercheck` on each (seg, sr, source_dir) of jobs, in one Node process; one Validation each.

    Each job runs check.js afresh (its arguments, its main, its own OHIF runtime), so its lines and
    exit status are those of a `viewercheck` run of its own; a job the process did not finish, and
    every later one, did not run.
    """
    script = tool_dir / "check.js"
    if (unprepared := _viewercheck_unprepared(tool_dir)) is not None:
        return [unprepared] * len(jobs)
    if not jobs:
        return []
    if shutil.which("node") is None:
        return [Validation("viewercheck", ran=False, ok=False, errors=("node not installed",))] * len(jobs)
    end = f"radgate-viewercheck-end-{uuid.uuid4().hex}"
    argvs = [_viewercheck_argv(seg, sr, source) for seg, sr, source in jobs]
    timeout = _TIMEOUT_S * len(jobs)
    try:
        done = subprocess.run(
            ["node", "-e", _VIEWERCHECK_BATCH, str(script.resolve()), end],
            input=json.dumps(argvs),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,  # in order: check.js writes both synchronously
            text=True,
            errors="replace",
            timeout=timeout,
            cwd=tool_dir,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return [
            Validation("viewercheck", ran=False, ok=False, errors=(f"timed out after {timeout} s",))
        ] * len(jobs)
    results: list[Validation] = []
    rest = done.stdout
    for _ in jobs:
        marker = rest.find(f"{end} ")
        if marker < 0 or (marker > 0 and rest[marker - 1] != "\n"):
            tail = tuple(rest.splitlines()[-5:]) or (f"node exited with status {done.returncode}",)
            results.append(Validation("viewercheck", ran=False, ok=False, errors=tail, output=rest))
            rest = ""
            continue
        line_end = rest.find("\n", marker)
        code = int(rest[marker + len(end) + 1 : line_end if line_end >= 0 else None])
        results.append(_viewercheck_result(code, rest[:marker]))
        rest = rest[line_end + 1 :] if line_end >= 0 else ""
    return results


def prepare_viewercheck(source: Path, cache: Path) -> Path:
    """Copy the read-only viewercheck tool to `cache` and `npm ci` there once; returns the copy.

    Raises RuntimeError with npm's last lines when the install fails (no registry, no node).
    """
    target = cache / "viewercheck"
    if (target / "node_modules").is_dir():
        return target
    if shutil.which("npm") is None:
        raise RuntimeError("npm is not installed")
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("node_modules"))
    for path in [target, *target.rglob("*")]:
        path.chmod(path.stat().st_mode | 0o200)
    done = subprocess.run(
        ["npm", "ci", "--no-audit", "--no-fund"],
        cwd=target,
        capture_output=True,
        text=True,
        timeout=_TIMEOUT_S,
        check=False,
    )
    if done.returncode != 0:
        shutil.rmtree(target / "node_modules", ignore_errors=True)
        raise RuntimeError("npm ci failed: " + " | ".join((done.stdout + done.stderr).splitlines()[-5:]))
    return target
