"""Helpers for the executor tests: a store with series in its spool, and pipelines made for tests.

The test pipelines are registered the way a third-party package registers one (an entry point in
the group ``radgate.pipelines``), from a dist-info folder put on ``sys.path``: worker processes are
spawned with the parent's ``sys.path``, so they find them through the real registry too.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from pydicom.uid import generate_uid
from sqlalchemy import select

from dicom_io.types import Code, Findings, Measurement, Segment, Volume
from plugin.config import Config
from plugin.ingest.spool import Spool
from plugin.jobs.queue import claim_job
from plugin.store.engine import Store
from plugin.store.models import Job, JobState, Study, StudyState, add_queued_job, utcnow

if TYPE_CHECKING:  # not imported at run time: claiming processes start faster without torch
    import torch

ENTRY_POINTS = {"test-hang": "support.execute:HangPipeline", "test-tiny": "support.execute:TinyPipeline"}

CONTROL_ENV = "RADGATE_TEST_CONTROL"
"""A folder whose files steer `TinyPipeline` in whatever process it runs (Ray workers inherit it)."""


class HangPipeline:
    """Accepts anything and never returns: for the time limit."""

    name = "test-hang"
    version = "1"

    def accepts(self, volume: Volume) -> str | None:
        return None

    def run(self, volume: Volume, device: torch.device) -> Findings:
        time.sleep(3600)
        raise AssertionError("unreachable")


STRUCTURE = Code("123037004", "SCT", "Anatomical Structure")
BONE = Code("272673000", "SCT", "Bone structure")
VOLUME = Code("118565006", "SCT", "Volume")
CM3 = Code("cm3", "UCUM", "cubic centimeter")


class TinyPipeline:
    """Marks the voxels above the series' median: a real result set in milliseconds, for scheduling.

    Steered by files in the folder ``$RADGATE_TEST_CONTROL`` names: while ``gate`` exists a run
    writes ``started`` and waits; while ``oom`` exists a run on a worker given a GPU (Ray sets
    ``CUDA_VISIBLE_DEVICES``) raises CUDA's out-of-memory error, as a series too big for it would.
    """

    name = "test-tiny"
    version = "1"

    def accepts(self, volume: Volume) -> str | None:
        return None

    def run(self, volume: Volume, device: torch.device) -> Findings:
        import torch

        control = Path(os.environ.get(CONTROL_ENV, "/nonexistent"))
        if (control / "gate").exists():
            (control / "started").touch()
            while (control / "gate").exists():
                time.sleep(0.05)
        if (control / "oom").exists() and os.environ.get("CUDA_VISIBLE_DEVICES"):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        mask = volume.voxels > np.median(volume.voxels)
        segment = Segment(1, "Dense", STRUCTURE, BONE, mask)
        volume_ml = float(mask.sum()) * volume.voxel_volume_ml
        measurement = Measurement(VOLUME, volume_ml, CM3, segment=1)
        return Findings(self.name, self.version, volume.shape, (segment,), (measurement,), key_slices=(0,))


def register_test_pipelines(folder: Path) -> Path:
    """Write a dist-info declaring the test pipelines into ``folder`` (to be put on sys.path)."""
    info = folder / "radgate_test_pipelines-0.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: radgate-test-pipelines\nVersion: 0\n")
    lines = [f"{name} = {target}" for name, target in ENTRY_POINTS.items()]
    (info / "entry_points.txt").write_text("[radgate.pipelines]\n" + "\n".join(lines) + "\n")
    return folder


def make_config(data_dir: Path, **executor: object) -> Config:
    return Config.model_validate({"data_dir": str(data_dir), "executor": {"poll_s": 0.1, **executor}})


def spool_files(store: Store, config: Config, files: Sequence[Path]) -> None:
    """Put DICOM files into the spool and record them, as the receiving side does."""
    spool = Spool(config.spool_dir, config.incoming_dir, config.quarantine_dir)
    spool.prepare()
    for path in files:
        rec = spool.describe(path, datetime.now(UTC))
        final = config.spool_dir / rec.spool_path
        final.parent.mkdir(parents=True, exist_ok=True)
        final.write_bytes(path.read_bytes())
        store.recorder.record_instance(rec)


def add_job(
    store: Store,
    study_uid: str,
    series_uid: str,
    pipeline: str,
    revision: int = 1,
    destinations: Sequence[str] = (),
) -> int:
    """Queue a job directly (what routing would queue), its results sent to ``destinations``."""
    with store.session() as s:
        study = s.scalars(select(Study).where(Study.study_uid == study_uid)).one()
        job = add_queued_job(s, study, pipeline, series_uid, "test", list(destinations), revision=revision)
        s.flush()
        return job.id


def tiny_study_job(
    store: Store, config: Config, folder: Path, seed: int, destinations: Sequence[str] = ()
) -> int:
    """A new 4-slice CT study (16 x 16 pixels) written under ``folder`` into the spool, and a QUEUED
    test-tiny job on it."""
    from dicom_io.testing.synthetic import ct_chest_phantom

    phantom = ct_chest_phantom(rows=16, columns=16, slices=4, seed=seed)
    spool_files(store, config, phantom.write(folder / f"study{seed}"))
    return add_job(store, phantom.study_uid, phantom.series_uid, "test-tiny", destinations=destinations)


def make_job(store: Store, study_uid: str | None = None, pipeline: str = "test") -> int:
    """A SUCCEEDED job on a new COMPLETE study (a fresh UID unless given), as the executor leaves it."""
    now = utcnow()
    with store.session() as s:
        study = Study(
            study_uid=study_uid or generate_uid(),
            revision=1,
            state=StudyState.COMPLETE,
            first_received_at=now,
            revision_started_at=now,
        )
        s.add(study)
        s.flush()
        job = Job(
            study_id=study.id,
            study_revision=1,
            pipeline=pipeline,
            state=JobState.SUCCEEDED,
            attempts=1,
            created_at=now,
            updated_at=now,
        )
        s.add(job)
        s.flush()
        return job.id


def job_row(store: Store, job_id: int) -> Job:
    with store.session() as s:
        job = s.get(Job, job_id)
        assert job is not None
        return job


def claim_all(db_url: str, spool_dir: str, owner: str) -> list[int]:
    """Claim until nothing is left; run in its own process (its own engine and connections)."""
    store = Store(db_url)
    claimed = []
    while (job := claim_job(store, owner, Path(spool_dir), lease_s=60, max_attempts=3)) is not None:
        claimed.append(job.id)
    store.dispose()
    return claimed
