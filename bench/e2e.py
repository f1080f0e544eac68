"""End-to-end benchmark: a CT sent by DCMTK storescu to `radgate serve`, until Orthanc acknowledged its SEG.

The same real parts as `radgate demo` (plugin/demo/local.py: a Debian Orthanc on free loopback ports,
`radgate serve` as its own process with that Orthanc as a C-STORE destination), on CPU:

1. latency: ``--studies`` chest CTs (default 5 of 300 slices of 512x512) sent one after the other,
   each once the previous one's results were all SENT; for each, the seconds from the end of
   storescu (the last instance acknowledged by the node) to the SEG's delivery SENT (Orthanc's
   C-STORE response), split into completion wait (study complete, job queued), queue, the job's
   steps (load, infer, encode as recorded by the worker), the rest of the run, and dispatch;
2. throughput: ``--queued`` studies (default 20) sent back to back, then the time until every
   result of every one is SENT: studies per hour;
3. peak resident memory of the node and its worker processes (VmHWM per process from /proc, and
   the largest sum of VmRSS over the process tree, sampled every 0.2 s).

Studies are clones of one generated phantom with new UIDs (generation and writing are not timed).
A small study is run first so the worker has imported torch and the pipeline. Figures only.

    .venv/bin/python bench/e2e.py [--slices 300] [--rows 512] [--studies 5] [--queued 20] [--workers 1]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from sqlalchemy import select

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dicom_io.testing.orthanc_server import OrthancServer, wait_until
from dicom_io.testing.synthetic import ct_chest_phantom
from dicom_io.testing.tools import free_port, storescu
from plugin.demo.local import LocalNode, node_settings
from plugin.store.models import Delivery, DeliveryState, Job, JobState, Study


def clone_study(template: list[Dataset], folder: Path) -> tuple[str, list[Path]]:
    """Write the template series as a new study (new study, series, frame and instance UIDs)."""
    folder.mkdir(parents=True)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    paths = []
    for ds in template:
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        path = folder / f"IM{int(ds.InstanceNumber):05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return study, paths


def send(node: LocalNode, files: list[Path]) -> datetime:
    """C-STORE the files in one association; the moment storescu finished (the last one acknowledged)."""
    result = storescu("127.0.0.1", node.port, "RADGATE", files, calling_ae="BENCH")
    if not result.all_succeeded or len(result.statuses) != len(files):
        raise RuntimeError(f"storescu failed: {result.output[-2000:]}")
    return datetime.now(UTC)


@dataclass
class Outcome:
    """One study's job and deliveries as the store recorded them."""

    job: Job
    deliveries: list[Delivery]

    @property
    def seg_sent_at(self) -> datetime:
        [seg] = [d for d in self.deliveries if Path(d.file_path or "").name.startswith("SEG-")]
        assert seg.sent_at is not None
        return seg.sent_at


def outcome(node: LocalNode, study_uid: str) -> Outcome | None:
    """The study's job and deliveries once every delivery is SENT; None before (FAILED/DEAD raise)."""
    with node.store() as store, store.session() as s:
        jobs = s.scalars(
            select(Job).join(Study, Study.id == Job.study_id).where(Study.study_uid == study_uid)
        )
        job = next(iter(jobs), None)
        if job is None:
            return None
        if job.state == JobState.FAILED:
            raise RuntimeError(f"job {job.id} failed: {job.error}")
        deliveries = list(s.scalars(select(Delivery).where(Delivery.job_id == job.id)))
        s.expunge_all()
    if any(d.state == DeliveryState.DEAD for d in deliveries):
        raise RuntimeError(f"job {job.id}: a delivery is DEAD")
    done = (
        job.state == JobState.SUCCEEDED
        and deliveries
        and all(d.state == DeliveryState.SENT for d in deliveries)
    )
    return Outcome(job, deliveries) if done else None


def wait_results(node: LocalNode, study_uid: str, timeout: float) -> Outcome:
    def check() -> Outcome | None:
        node.check_alive()
        return outcome(node, study_uid)

    return wait_until(check, timeout, f"the results of study {study_uid}", interval=0.1)


def breakdown(sent_at: datetime, result: Outcome) -> dict[str, float]:
    """Seconds of each stage, from the end of the send to the SEG acknowledged by Orthanc."""
    job = result.job
    assert job.started_at is not None and job.finished_at is not None
    timings = dict(job.timings or {})
    steps = sum(timings.values())
    return {
        "total": (result.seg_sent_at - sent_at).total_seconds(),
        "completion": (job.created_at - sent_at).total_seconds(),
        "queue": (job.started_at - job.created_at).total_seconds(),
        "load": timings.get("load_s", 0.0),
        "infer": timings.get("infer_s", 0.0),
        "encode": timings.get("encode_s", 0.0),
        "run_other": (job.finished_at - job.started_at).total_seconds() - steps,
        "dispatch": (result.seg_sent_at - job.finished_at).total_seconds(),
    }


# --- memory ------------------------------------------------------------------------------------


def _status_kib(pid: int, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass  # the process ended between listing and reading
    return 0


def process_tree(root: int) -> list[int]:
    """The root and all its descendants, from /proc/*/stat (no psutil needed)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    tree, frontier = [root], [root]
    while frontier:
        frontier = [pid for pid, parent in parents.items() if parent in frontier]
        tree += frontier
    return tree


@dataclass
class MemoryWatch:
    """Samples the node's process tree: the largest summed RSS, and each process's VmHWM."""

    root: int
    peak_sum_kib: int = 0
    peak_kib: dict[int, int] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        while not self._stop.wait(0.2):
            pids = process_tree(self.root)
            self.peak_sum_kib = max(self.peak_sum_kib, sum(_status_kib(p, "VmRSS") for p in pids))
            for pid in pids:
                self.peak_kib[pid] = max(self.peak_kib.get(pid, 0), _status_kib(pid, "VmHWM"))

    def __enter__(self) -> MemoryWatch:
        threading.Thread(target=self.run, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()


# --- the run -----------------------------------------------------------------------------------


def _pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile (p95 of 5 values is the largest)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def _load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def bench(args: argparse.Namespace, root: Path) -> None:
    print(
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}; {_load()}",
        flush=True,
    )
    started = time.perf_counter()
    template = ct_chest_phantom(rows=args.rows, columns=args.rows, slices=args.slices, seed=0).datasets
    studies = [clone_study(template, root / "studies" / str(k)) for k in range(args.studies + args.queued)]
    warm_study, warm_files = clone_study(
        ct_chest_phantom(rows=64, columns=64, slices=40).datasets, root / "warm"
    )
    print(
        f"{len(studies)} studies of {args.slices}x{args.rows}x{args.rows} written in "
        f"{time.perf_counter() - started:.0f} s",
        flush=True,
    )

    with OrthancServer(workdir=root / "orthanc") as orthanc:
        settings = node_settings(
            root / "node" / "data",
            free_port(),
            orthanc,
            completion={"quiet_period_s": args.quiet_period, "after_release_s": args.after_release},
            executor={"workers": args.workers},
        )
        node = LocalNode(root / "node", settings).start()
        try:
            assert node.process is not None
            with MemoryWatch(node.process.pid) as memory:
                send(node, warm_files)
                wait_results(node, warm_study, 600)
                print(f"warm-up study done; {_load()}", flush=True)
                rows = []
                for study_uid, files in studies[: args.studies]:
                    sent_at = send(node, files)
                    rows.append(breakdown(sent_at, wait_results(node, study_uid, 1800)))
                    print("  " + "  ".join(f"{k} {v:6.2f}" for k, v in rows[-1].items()), flush=True)
                print(f"latency runs done; {_load()}", flush=True)
                queued = studies[args.studies :]
                t0 = time.monotonic()
                for _, files in queued:
                    send(node, files)
                sending = time.monotonic() - t0
                for study_uid, _ in queued:
                    wait_results(node, study_uid, 3600)
                elapsed = time.monotonic() - t0
        finally:
            status = node.stop()
    report(args, rows, len(queued), sending, elapsed, memory, node.process.pid, status)


def report(
    args: argparse.Namespace,
    rows: list[dict[str, float]],
    queued: int,
    sending: float,
    elapsed: float,
    memory: MemoryWatch,
    node_pid: int,
    status: int | None,
) -> None:
    print(f"\n{args.slices}x{args.rows}x{args.rows} CT, {args.workers} worker(s)")
    if rows:
        totals = [r["total"] for r in rows]
        print(f"last instance sent -> SEG acknowledged by Orthanc, {len(rows)} studies one at a time:")
        print(f"  p50 {_pct(totals, 50):.1f} s   p95 {_pct(totals, 95):.1f} s   max {max(totals):.1f} s")
        print(
            "  median seconds per stage: "
            + ", ".join(f"{k} {statistics.median(r[k] for r in rows):.2f}" for k in rows[0])
        )
    if queued:
        print(
            f"throughput: {queued} studies queued (sent in {sending:.0f} s), all results SENT after "
            f"{elapsed:.0f} s: {queued / elapsed * 3600:.0f} studies/hour"
        )
    node_kib = memory.peak_kib.pop(node_pid, 0)
    worker_kib = max(memory.peak_kib.values(), default=0)
    print(
        f"peak RSS: node {node_kib / 1024:.0f} MiB, largest worker {worker_kib / 1024:.0f} MiB, "
        f"node + workers together {memory.peak_sum_kib / 1024:.0f} MiB; {_load()}"
    )
    print(f"node exit status {status}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--rows", type=int, default=512, help="rows and columns")
    parser.add_argument("--studies", type=int, default=5, help="studies timed one at a time (0: skip)")
    parser.add_argument("--queued", type=int, default=20, help="studies sent back to back (0: skip)")
    parser.add_argument("--workers", type=int, default=1, help="executor.workers")
    parser.add_argument("--quiet-period", type=float, default=10.0, help="completion.quiet_period_s")
    parser.add_argument("--after-release", type=float, default=1.0, help="completion.after_release_s")
    parser.add_argument("--dir", type=Path, help="work folder (default: a temporary one, removed)")
    args = parser.parse_args(argv)
    if args.dir:
        bench(args, args.dir)
    else:
        with tempfile.TemporaryDirectory(prefix="radgate-bench-e2e-") as tmp:
            bench(args, Path(tmp))
    return 0


if __name__ == "__main__":
    sys.exit(main())
