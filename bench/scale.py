"""Scale: N queued chest CTs through the local executor and the Ray executor with 1, 2 and 4 CPU actors.

The studies are the real LUNG1-001 CT (shared/testdata, 134 slices of 512²) copied N times with new
Study, Series, SOP Instance and Frame of Reference UIDs, written once into a spool that every variant
shares (`cluster.shared_dir`). Each variant gets a fresh data dir and SQLite store, records the
instances, queues one ct-lung job per study at once and runs the node's own `JobRunner` on its
executor until every job has ended: the local executor with its worker processes, or the Ray
executor on one local Ray (4 logical CPUs on this machine's cores; each actor asks for 1 CPU,
``actors_per_pipeline`` = ``workers`` = k). Cold starts (worker or actor start, torch import) are in
the figures, as a node pays them.

Figures per variant: studies per hour (jobs / time from start to the last one ended), p50 and p95
of latency (queued to ended, so with every job queued at t0 it includes waiting), p50 of the run
itself (claimed to ended), and the peak resident memory (VmHWM) of each worker process or actor.

    PYTHONPATH=. .venv/bin/python bench/scale.py                 # 40 studies: local, ray 1, 2, 4
    PYTHONPATH=. .venv/bin/python bench/scale.py --studies 8 --actors 1,2 --local 1
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
LUNG1 = "ct-chest-nsclc-lung1-001"
RAY_CPUS = 4  # logical CPUs of the bench's Ray: room for 4 actors of 1 CPU on the machine's cores


def _testdata() -> Path:
    return Path(os.environ.get("RADGATE_TESTDATA") or ROOT.parent / "shared" / "testdata")


def build_studies(count: int, shared: Path) -> None:
    """``count`` copies of LUNG1-001 with new UIDs, straight into ``shared/spool`` (where the spool
    keeps an instance); skipped when as many are there already (``--dir`` kept from a run)."""
    import pydicom
    from pydicom.uid import generate_uid

    spool = shared / "spool"
    if spool.is_dir() and len(list(spool.iterdir())) >= count:
        return
    sources = sorted((_testdata() / LUNG1 / "ct").glob("*.dcm"))
    if not sources:
        raise SystemExit(f"no LUNG1-001 CT in {_testdata() / LUNG1 / 'ct'}")
    datasets = [pydicom.dcmread(p) for p in sources]
    for _ in range(count):
        study, series, frame = generate_uid(), generate_uid(), generate_uid()
        folder = spool / study / series
        folder.mkdir(parents=True)
        for ds in datasets:
            sop = generate_uid()
            ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = sop
            ds.save_as(folder / f"{sop}.dcm", enforce_file_format=True)


@dataclass(frozen=True)
class Variant:
    name: str
    kind: str  # local | ray
    workers: int  # local worker processes, or Ray actors (and calls in flight)


def _config(run: Path, shared: Path, variant: Variant) -> Any:
    from plugin.config import Config

    executor: dict[str, Any] = {
        "kind": variant.kind,
        "workers": variant.workers,
        "poll_s": 0.2,
        "job_timeout_s": 3600,
        "lease_s": 600,
        "results_dir": str(run / "results"),
    }
    if variant.kind == "ray":
        executor["ray"] = {
            "actors_per_pipeline": variant.workers,
            "resources": {"ct-lung": {"cpus": 1, "gpus": 0}},
            "idle_timeout_s": 3600,
        }
    return Config.model_validate(
        {"data_dir": str(run / "data"), "cluster": {"shared_dir": str(shared)}, "executor": executor}
    )


def _queue(store: Any, config: Any) -> int:
    """Record every instance of the shared spool and queue one ct-lung job per study; how many."""
    from sqlalchemy import select

    from plugin.ingest.receive import make_spool
    from plugin.store.models import Study, StudyState, add_queued_job, utcnow

    spool = make_spool(config)
    now = datetime.now(UTC)
    studies = sorted(p for p in config.spool_dir.iterdir() if p.is_dir())
    for study_dir in studies:
        for path in sorted(study_dir.rglob("*.dcm")):
            store.recorder.record_instance(spool.describe(path, now))
    queued_at = utcnow()
    with store.session() as s:
        for study_dir in studies:
            study = s.scalars(select(Study).where(Study.study_uid == study_dir.name)).one()
            study.state = StudyState.COMPLETE
            [series_dir] = list(study_dir.iterdir())
            add_queued_job(s, study, "ct-lung", series_dir.name, "bench", [], now=queued_at)
    return len(studies)


def _peak_rss_mb(pid: int) -> float | None:
    """The process's peak resident memory (VmHWM), MB; None when it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def run_variant(base: Path, shared: Path, variant: Variant) -> dict[str, Any]:
    from sqlalchemy import select

    from plugin.jobs.execute import JobRunner
    from plugin.jobs.executor import make_executor
    from plugin.store.engine import migrated_store
    from plugin.store.models import Job, JobState

    run = Path(tempfile.mkdtemp(prefix=f"{variant.name}-", dir=base))
    config = _config(run, shared, variant)
    with migrated_store(config.db_url) as store:
        count = _queue(store, config)
        runner = JobRunner(store, config, make_executor(config))
        load_before = os.getloadavg()[0]
        cpu_before = time.process_time()
        started = time.monotonic()
        runner.start()
        try:
            while True:
                with store.session() as s:
                    jobs = list(s.scalars(select(Job)))
                if all(j.state in (JobState.SUCCEEDED, JobState.FAILED) for j in jobs):
                    break
                time.sleep(1.0)
            elapsed = time.monotonic() - started
            pids = {int(str((j.placement or {}).get("worker", "pid 0")).split()[-1]) for j in jobs}
            peaks = [p for pid in pids if pid and (p := _peak_rss_mb(pid)) is not None]
        finally:
            runner.stop()
    failed = [j for j in jobs if j.state != JobState.SUCCEEDED]
    latency = [(j.finished_at - j.created_at).total_seconds() for j in jobs if j.finished_at]
    service = [(j.finished_at - j.started_at).total_seconds() for j in jobs if j.finished_at and j.started_at]
    return {
        "variant": variant.name,
        "studies": count,
        "failed": len(failed),
        "first_error": failed[0].error if failed else None,
        "elapsed_s": elapsed,
        "per_hour": 3600 * (count - len(failed)) / elapsed,
        "p50_s": statistics.median(latency),
        "p95_s": _percentile(latency, 0.95),
        "run_p50_s": statistics.median(service),
        "peak_rss_mb": peaks,
        "load": (load_before, os.getloadavg()[0]),
        "driver_cpu_s": time.process_time() - cpu_before,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--studies", type=int, default=40, help="queued chest CTs per variant (40)")
    parser.add_argument(
        "--actors", default="1,2,4", help="Ray variants: CPU actors each (1,2,4; '' for none)"
    )
    parser.add_argument("--local", default="1", help="local variants: worker processes each (1; '' for none)")
    parser.add_argument(
        "--dir", type=Path, help="keep the studies and runs here (default: a temporary folder)"
    )
    args = parser.parse_args(argv)
    variants = [Variant(f"local-{n}", "local", int(n)) for n in args.local.split(",") if n]
    variants += [Variant(f"ray-{n}", "ray", int(n)) for n in args.actors.split(",") if n]
    base = args.dir or Path(tempfile.mkdtemp(prefix="radgate-scale-"))
    shared = base / "shared"
    t = time.monotonic()
    build_studies(args.studies, shared)
    print(f"{args.studies} studies of LUNG1-001 in {shared} ({time.monotonic() - t:.0f} s)", flush=True)
    if any(v.kind == "ray" for v in variants):
        import ray

        from plugin.jobs.executor.ray_executor import NAMESPACE

        os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
        ray.init(  # one Ray for every variant; the executor joins it (ray.is_initialized)
            num_cpus=RAY_CPUS,
            num_gpus=0,
            include_dashboard=False,
            namespace=NAMESPACE,
            log_to_driver=False,
            object_store_memory=512 * 2**20,
        )
    print(f"{os.cpu_count()} cores; load average at start {os.getloadavg()[0]:.1f}", flush=True)
    columns = ["variant", "studies", "studies/h", "p50 latency s", "p95 latency s", "run p50 s"]
    columns += ["peak RSS per worker MB", "load avg"]
    print("| " + " | ".join(columns) + " |")
    print("|---|---|---|---|---|---|---|---|")
    for variant in variants:
        r = run_variant(base, shared, variant)
        peaks = r["peak_rss_mb"]
        rss = (
            f"{statistics.mean(peaks):.0f} ({len(peaks)} × {min(peaks):.0f}–{max(peaks):.0f})"
            if peaks
            else "–"
        )
        failed = f", {r['failed']} failed: {r['first_error']}" if r["failed"] else ""
        print(
            f"| {r['variant']} | {r['studies']}{failed} | {r['per_hour']:.0f} | {r['p50_s']:.0f} "
            f"| {r['p95_s']:.0f} | {r['run_p50_s']:.1f} | {rss} | {r['load'][0]:.1f} → {r['load'][1]:.1f} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
