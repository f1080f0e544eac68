"""Ingest benchmark: C-STORE receive speed of radgate's SCP beside DCMTK storescp and Orthanc.

One run sends the same CT series (default 300 slices of 512x512, 16-bit, Explicit VR Little
Endian) with DCMTK storescu (TCP_NODELAY=1) over 1 and over 4 concurrent associations (4 storescu
processes, a quarter each) to each receiver, started fresh for every run on free loopback ports:

- radgate: the real node, `radgate serve` on a fresh data dir (no rules, so no jobs): every
  instance linked into the spool, fsync'd and recorded in the SQLite job store before the success
  status (its directory synced with those of the next instances), as in production.
- radgate-scp / radgate-scp-nofsync: where the node's time goes. `dicom_io.net.StorageSCP` alone in
  its own process with a stand-in handler: fsync (or not) and a rename into a folder; no job store.
- DCMTK storescp (TCP_NODELAY=1, --fork so concurrent associations run in parallel) writing to a
  temporary folder (no fsync).
- Orthanc (Debian package) with a minimal configuration and a temporary storage folder.
- disk-fsync: no network and no DICOM, the floor of any receiver that makes each instance durable
  before it answers: the same files' bytes (read beforehand) written to new files and fsync'd one by
  one, by 1 or 4 threads as the associations. storescp does not fsync; this row shows what the disk
  itself allows a durable receiver.

Then, to each receiver again, `--single` associations of one instance each, one after the other,
with storescu -R (the one SOP class proposed) and with storescu's default proposal (120-odd
presentation contexts): what a sender that opens an association per instance or per small series
waits for the association itself.

Prints images/s and ms per association for each, and radgate's ratio to storescp. Figures only;
nothing passes or fails.

    .venv/bin/python bench/ingest.py [--slices 300] [--pdu 131072] [--workers 2] [--associations 1 4]
        [--single 10]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dicom_io.durable import fsync_file
from dicom_io.net import ReceivedInstance, StorageSCP

DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}
AE_TITLE = "BENCH"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(check: str, probe: subprocess.Popen[bytes] | None, deadline_s: float, port: int) -> None:
    """Wait until a C-ECHO to `port` succeeds (the receiver is up), or fail at the deadline."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if probe is not None and probe.poll() is not None:
            raise RuntimeError(f"{check} exited with {probe.returncode} before it was ready")
        echo = subprocess.run(
            ["/usr/bin/echoscu", "-to", "2", "-aec", AE_TITLE, "127.0.0.1", str(port)],
            env=DCMTK_ENV,
            capture_output=True,
        )
        if echo.returncode == 0:
            return
        time.sleep(0.1)  # a polling interval of a readiness probe, not synchronisation
    raise RuntimeError(f"{check} not ready on port {port} after {deadline_s} s")


# --- receivers ----------------------------------------------------------------------------------


@contextlib.contextmanager
def serving(
    name: str,
    cmd: list[str],
    port: int,
    deadline_s: float,
    log: Path | None = None,
    env: dict[str, str] | None = None,
) -> Iterator[int]:
    """Run a receiver until the block ends: started, answering C-ECHO on `port`, then SIGTERM."""
    output = log.open("wb") if log is not None else None
    proc = subprocess.Popen(cmd, stdout=output, stderr=subprocess.STDOUT if output else None, env=env)
    try:
        wait_until(name, proc, deadline_s, port)
        yield port
    finally:
        proc.terminate()
        proc.wait(60)
        if output is not None:
            output.close()


@contextlib.contextmanager
def radgate_node(out: Path, pdu: int, workers: int) -> Iterator[int]:
    """`radgate serve` itself, spool and job store included."""
    port = free_port()
    config = out / "radgate.yaml"
    # the console is on, as in production, on a free port so that runs never collide
    node = {"dicom": {"port": port, "max_pdu": pdu, "receivers": workers}, "web": {"port": 0}}
    config.write_text(json.dumps({"data_dir": str(out / "data"), "rules": [], **node}))  # JSON is YAML
    cmd = [sys.executable, "-m", "plugin.cli", "serve", "--config", str(config)]
    with serving("radgate serve", cmd, port, 120, out / "node.log") as ready:
        yield ready


@contextlib.contextmanager
def radgate_scp(out: Path, pdu: int, workers: int, fsync: bool) -> Iterator[int]:
    port = free_port()
    cmd = [sys.executable, __file__, "--serve-radgate", str(out), "--port", str(port), "--pdu", str(pdu)]
    cmd += ["--workers", str(workers), "--fsync" if fsync else "--no-fsync"]
    with serving("radgate", cmd, port, 60) as ready:
        yield ready


@contextlib.contextmanager
def storescp(out: Path, pdu: int) -> Iterator[int]:
    port = free_port()
    cmd = ["/usr/bin/storescp", "--fork", "-aet", AE_TITLE, "--max-pdu", str(min(pdu, 131072))]
    with serving("storescp", [*cmd, "-od", str(out), str(port)], port, 30, env=DCMTK_ENV) as ready:
        yield ready


@contextlib.contextmanager
def orthanc(out: Path, pdu: int) -> Iterator[int]:
    port, http = free_port(), free_port()
    config = {
        "Name": "radgate-bench",
        "StorageDirectory": str(out / "storage"),
        "IndexDirectory": str(out / "index"),
        "DicomAet": AE_TITLE,
        "DicomPort": port,
        "HttpPort": http,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomCheckCalledAet": False,
        "MaximumPduLength": pdu,
        "Plugins": [],
    }
    cfg = out / "orthanc.json"
    cfg.write_text(json.dumps(config))
    with serving("Orthanc", ["/usr/sbin/Orthanc", str(cfg)], port, 60, out / "orthanc.log") as ready:
        yield ready


def write_durably(out: Path, parts: list[Path]) -> float:
    """Write every file of each part to `out` and fsync it, one thread per part; the seconds taken."""
    shares = [[f.read_bytes() for f in sorted(part.iterdir())] for part in parts]

    def write_share(index: int, share: list[bytes]) -> None:
        for number, data in enumerate(share):
            fd = os.open(out / f"{index}-{number}.dcm", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)

    threads = [threading.Thread(target=write_share, args=item) for item in enumerate(shares)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - start


def count_received(name: str, out: Path) -> int:
    if name == "orthanc":
        return sum(1 for p in (out / "storage").rglob("*") if p.is_file() and len(p.name) == 36)
    if name == "radgate":
        return sum(1 for _ in (out / "data" / "spool").rglob("*.dcm"))
    return sum(
        1 for p in out.rglob("*") if p.is_file() and p.suffix != ".json" and not p.name.startswith(".")
    )


# --- the run --------------------------------------------------------------------------------------


def send(port: int, parts: list[Path]) -> float:
    """Send each part over its own association, all at once; return the seconds until all finished."""
    start = time.perf_counter()
    procs = [
        subprocess.Popen(
            ["/usr/bin/storescu", "-R", "-aec", AE_TITLE, "+sd", "127.0.0.1", str(port), str(part)],
            env=DCMTK_ENV,
            stderr=subprocess.PIPE,
        )
        for part in parts
    ]
    errors = [p.communicate()[1] for p in procs]
    elapsed = time.perf_counter() - start
    for p, err in zip(procs, errors, strict=True):
        if p.returncode != 0:
            raise RuntimeError(f"storescu failed: {err.decode(errors='replace')[-500:]}")
    return elapsed


def one_per_association(port: int, files: list[Path], only_required: bool) -> float:
    """Send each file over its own association, one after the other; the mean ms per association.

    `only_required`: storescu -R proposes the file's SOP class alone; without it, every storage
    SOP class storescu knows (120-odd presentation contexts), as a default DCMTK sender does.
    """
    proposal = ["-R"] if only_required else []
    start = time.perf_counter()
    for f in files:
        done = subprocess.run(
            ["/usr/bin/storescu", *proposal, "-aec", AE_TITLE, "127.0.0.1", str(port), str(f)],
            env=DCMTK_ENV,
            capture_output=True,
        )
        if done.returncode != 0:
            raise RuntimeError(f"storescu failed: {done.stderr.decode(errors='replace')[-500:]}")
    return (time.perf_counter() - start) * 1000 / len(files)


def make_series(folder: Path, slices: int) -> list[Path]:
    """Write a synthetic 512x512 CT series (the phantom module) and return its files."""
    from dicom_io.testing.synthetic import ct_chest_phantom

    series = ct_chest_phantom(rows=512, columns=512, slices=slices, seed=7)
    return sorted(series.write(folder))


def split(files: list[Path], n: int, root: Path) -> list[Path]:
    """n folders of hard links, a contiguous share of the series each."""
    parts = []
    for i in range(n):
        part = root / f"{n}-{i}"
        part.mkdir(parents=True)
        for f in files[i * len(files) // n : (i + 1) * len(files) // n]:
            os.link(f, part / f.name)
        parts.append(part)
    return parts


def bench(args: argparse.Namespace) -> None:
    load_before = os.getloadavg()[0]
    root = Path(tempfile.mkdtemp(prefix="radgate-ingest-"))
    try:
        if args.data:
            files = sorted(p for p in Path(args.data).iterdir() if p.is_file())
        else:
            files = make_series(root / "series", args.slices)
        size_mb = sum(f.stat().st_size for f in files) / 1e6
        receivers = {
            "radgate": lambda out: radgate_node(out, args.pdu, args.workers),
            "radgate-scp": lambda out: radgate_scp(out, args.pdu, args.workers, fsync=True),
            "radgate-scp-nofsync": lambda out: radgate_scp(out, args.pdu, args.workers, fsync=False),
            "storescp": lambda out: storescp(out, args.pdu),
            "orthanc": lambda out: orthanc(out, args.pdu),
        }
        rates: dict[tuple[str, int], list[float]] = {}
        for run in range(args.repeat):  # interleaved, so a burst of load elsewhere hits every receiver alike
            for n in args.associations:
                parts = split(files, n, root / "parts")
                for name in args.receivers:
                    out = root / "out" / f"{name}-{n}-{run}"
                    out.mkdir(parents=True)
                    if name == "disk-fsync":
                        elapsed = write_durably(out, parts)
                    else:
                        with receivers[name](out) as port:
                            elapsed = send(port, parts)
                    received = count_received(name, out)
                    if received != len(files):
                        print(f"WARNING: {name} holds {received} of {len(files)} instances", file=sys.stderr)
                    rates.setdefault((name, n), []).append(len(files) / elapsed)
                    print(
                        f"  {name:15s} {n} assoc: {elapsed:6.2f} s  {len(files) / elapsed:7.1f} images/s",
                        flush=True,
                    )
                    # outputs stay until the end: ext4 without a journal skips inodes deleted in the last
                    # seconds when it allocates new ones, so deleting here slowed whoever ran next
                shutil.rmtree(root / "parts")
        per_association: dict[tuple[str, bool], list[float]] = {}
        singles = files[: 2 * args.single]
        for run in range(args.repeat if args.single else 0):
            for name in (r for r in args.receivers if r != "disk-fsync"):
                out = root / "out" / f"{name}-single-{run}"
                out.mkdir(parents=True)
                with receivers[name](out) as port:
                    for only_required, share in ((True, singles[::2]), (False, singles[1::2])):
                        ms = one_per_association(port, share, only_required)
                        per_association.setdefault((name, only_required), []).append(ms)
                        print(f"  {name:15s} 1 instance per association: {ms:6.1f} ms", flush=True)
        report(args, len(files), size_mb, rates, load_before)
        report_associations(args, per_association)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def report_associations(args: argparse.Namespace, ms: dict[tuple[str, bool], list[float]]) -> None:
    """Medians of the ms per one-instance association, and storescp's time over radgate's."""
    if not ms:
        return
    print(
        f"\n{args.single} associations of one instance each, one after the other (each a storescu "
        f"process), median of {args.repeat} runs"
    )
    print("| receiver | ms per association, storescu -R | ms per association, default proposal |")
    print("|---|---|---|")
    names = sorted({name for name, _ in ms}, key=args.receivers.index)
    for name in names:
        cells = " | ".join(f"{statistics.median(ms[name, required]):.1f}" for required in (True, False))
        print(f"| {name} | {cells} |")
    for ours in names:
        if ours.startswith("radgate") and "storescp" in names:
            ratios = []
            for required in (True, False):
                paired = [b / a for a, b in zip(ms[ours, required], ms["storescp", required], strict=True)]
                ratios.append(f"{statistics.median(paired):.2f}x")
            print(f"| {ours} / storescp (speed) | {' | '.join(ratios)} |")


def report(
    args: argparse.Namespace,
    n_files: int,
    size_mb: float,
    rates: dict[tuple[str, int], list[float]],
    load: float,
) -> None:
    """Medians as a Markdown table; ratios are medians of per-run ratios (a pair shares the load)."""
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    print(
        f"\ningest, {when}, {platform.node()} ({os.cpu_count()} cores), {n_files} CT slices 512x512 "
        f"({size_mb:.0f} MB), max PDU {args.pdu} (storescp capped at 131072), "
        f"storescu TCP_NODELAY=1, radgate receiving processes {args.workers}, "
        f"median of {args.repeat} interleaved runs, 1-min load average before the run {load:.1f}"
    )
    print("| receiver | " + " | ".join(f"{n} assoc (images/s)" for n in args.associations) + " |")
    print("|---|" + "---|" * len(args.associations))
    for name in args.receivers:
        cells = " | ".join(f"{statistics.median(rates[name, n]):.0f}" for n in args.associations)
        print(f"| {name} | {cells} |")
    for ours in ("radgate", "radgate-scp", "radgate-scp-nofsync", "disk-fsync"):
        if ours in args.receivers and "storescp" in args.receivers:
            ratios = []
            for n in args.associations:
                paired = [a / b for a, b in zip(rates[ours, n], rates["storescp", n], strict=True)]
                ratios.append(f"{statistics.median(paired):.2f}x")
            print(f"| {ours} / storescp | {' | '.join(ratios)} |")


# --- radgate's receiving process -----------------------------------------------------------------


@dataclass(frozen=True)
class StandInHandler:
    """The stand-in for the node's handler: fsync (optional, to see its cost) and a rename into a folder.
    A picklable object, since each receiving process runs its own copy."""

    store: Path
    fsync: bool

    def __call__(self, inst: ReceivedInstance) -> int:
        if self.fsync:
            fsync_file(inst.path)
        os.replace(inst.path, self.store / f"{inst.sop_instance_uid}.dcm")
        return 0


def serve_radgate(out: Path, port: int, pdu: int, workers: int, fsync: bool) -> None:
    """The SCP with the stand-in handler; runs until SIGTERM."""
    store = out / "store"
    store.mkdir(parents=True, exist_ok=True)
    handler = StandInHandler(store, fsync)
    scp = StorageSCP(AE_TITLE, "127.0.0.1", port, out / "incoming", handler, max_pdu=pdu, workers=workers)
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=scp.stop).start())
    scp.serve_forever()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slices", type=int, default=300, help="CT slices to generate (default 300)")
    parser.add_argument("--data", help="send the files of this folder instead of generating a series")
    parser.add_argument("--pdu", type=int, default=131072, help="receivers' maximum PDU length")
    parser.add_argument("--workers", type=int, default=2, help="radgate receiving processes")
    parser.add_argument("--associations", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--repeat", type=int, default=3, help="runs per receiver; the median is reported")
    parser.add_argument(
        "--single",
        type=int,
        default=10,
        help="associations of one instance each, per proposal and run (0: skip that part)",
    )
    parser.add_argument(
        "--receivers",
        nargs="+",
        default=["radgate", "radgate-scp", "radgate-scp-nofsync", "storescp", "orthanc", "disk-fsync"],
        help="radgate: the node; radgate-scp(-nofsync): the transport with a stand-in handler; "
        "disk-fsync: files written and fsync'd without a network",
    )
    parser.add_argument(
        "--fsync", action=argparse.BooleanOptionalAction, default=True, help=argparse.SUPPRESS
    )
    parser.add_argument("--serve-radgate", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_radgate:
        serve_radgate(args.serve_radgate, args.port, args.pdu, args.workers, args.fsync)
    else:
        bench(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
