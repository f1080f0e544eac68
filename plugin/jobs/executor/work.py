"""The work of one task, inside a worker: load → infer → encode, results written whole or not at all.

Idempotency (no duplicate results in the archive, whatever crashes when):

* Result files are written into a temporary folder beside ``out_dir``, fsync'd with a manifest
  (SOP Instance UID and file, in sending order), and the folder is renamed to ``out_dir``. A rename
  is atomic, so ``out_dir`` either does not exist or holds a complete result set.
* A task whose ``out_dir`` exists re-uses those files and runs nothing: a worker that died after
  the rename but before the job was recorded SUCCEEDED (and its deliveries queued) is simply
  repeated, and the archive receives the same SOP Instances as before.
* Result UIDs are derived from (study, revision, series, pipeline, pipeline version, source
  instances) through `ResultOptions.uid_seed`, so even a re-run that must encode again (its folder
  lost) gives the same UIDs, which an archive stores once.

A new revision of a study gets new UIDs, a series number 10 higher per revision, and a
description that names the revision it supersedes, so the PACS shows both and which is newer.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import pydicom

from ai_models.base import Pipeline, PipelineError, run_pipeline
from ai_models.registry import UnknownPipelineError, get_pipeline
from dicom_io.results import ResultError, ResultOptions, write_results
from dicom_io.series import SeriesError
from dicom_io.types import GeometryError
from dicom_io.volume import load_series
from plugin.jobs.executor.base import Task, TaskResult
from plugin.jobs.executor.output import MANIFEST, read_manifest, write_whole

if TYPE_CHECKING:  # torch: imported by the functions that use it, not when this module loads
    import torch

log = logging.getLogger(__name__)

SERIES_NUMBER_OFFSET = 1000
"""Results of revision 1 get the largest source series number + this; each later revision +10."""

Report = Callable[[str, float], None]

_INPUT_ERRORS = (PipelineError, SeriesError, ResultError, GeometryError, UnknownPipelineError)
"""Errors that another attempt on the same input cannot fix: the job fails with the message."""


def result_options(task: Task, headers: Sequence[pydicom.Dataset]) -> ResultOptions:
    """Numbering, description and UID seed that make a revision's results distinct and repeatable."""
    numbers = [int(ds.SeriesNumber) for ds in headers if ds.get("SeriesNumber") not in (None, "")]
    base = max(numbers, default=0) + SERIES_NUMBER_OFFSET + 10 * (task.revision - 1)
    prefix = "radgate" if task.supersedes is None else f"radgate (supersedes rev {task.supersedes})"
    return ResultOptions(
        series_number_base=base,
        series_description_prefix=prefix,
        uid_seed=f"radgate/{task.study_uid}/{task.revision}/{task.series_uid}/{task.pipeline}",
        prior=task.prior,
        comparison_note=task.comparison_note,
    )


def run_task(task: Task, device: torch.device, pipelines: dict[str, Pipeline], report: Report) -> TaskResult:
    """Run one task; never raises for a failure of the input or the code (it is in the result)."""
    import torch

    out_dir = Path(task.out_dir)
    if (out_dir / MANIFEST).is_file():
        log.info("job %d: results of an earlier attempt found complete in %s", task.job_id, out_dir)
        return TaskResult(results=read_manifest(out_dir), reused=True)
    timings: dict[str, float] = {}

    def step(name: str, started: float) -> None:
        timings[name] = round(time.monotonic() - started, 3)
        report(name, timings[name])

    oom: str | None = None
    try:
        started = time.monotonic()
        volume = load_series([Path(f) for f in task.files])
        headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in task.files]
        step("load_s", started)
        started = time.monotonic()
        if task.pipeline not in pipelines:
            pipelines[task.pipeline] = get_pipeline(task.base or task.pipeline, **task.options)
        findings = run_pipeline(pipelines[task.pipeline], volume, device)
        step("infer_s", started)
        started = time.monotonic()
        options = result_options(task, headers)
        results = write_whole(out_dir, lambda d: write_results(findings, volume, headers, d, options))
        step("encode_s", started)
    except _INPUT_ERRORS as err:
        log.warning(
            "job %d: %s failed on series %s: %s",
            *(task.job_id, task.pipeline, task.series_uid, err),
            exc_info=True,  # the job records the message; the log keeps where it came from
        )
        prefix = "results: " if isinstance(err, ResultError) else ""
        return TaskResult(timings=timings, error=f"{prefix}{err}")
    except torch.cuda.OutOfMemoryError as err:  # freed below, once the traceback lets go of the tensors
        oom = (str(err).splitlines() or ["no detail"])[0]
    except Exception as err:  # a bug or the machine: logged in full, the job gets one line and a retry
        log.exception("job %d: %s crashed on series %s", task.job_id, task.pipeline, task.series_uid)
        return TaskResult(timings=timings, error=f"{type(err).__name__}: {err}", retry=True)
    if oom is not None:  # the worker lives on: the memory is given back and the weights stay loaded
        free_cuda_memory(device)
        log.warning("job %d: %s ran out of CUDA memory on %s: %s", task.job_id, task.pipeline, device, oom)
        error = f"CUDA out of memory on {device}: {oom}"
        return TaskResult(timings=timings, error=error, retry=True, cuda_oom=True)
    log.info(
        "job %d: %s on series %s: %d result objects in %s",
        *(task.job_id, task.pipeline, task.series_uid, len(results), out_dir),
    )
    return TaskResult(results=results, timings=timings)


def free_cuda_memory(device: torch.device) -> None:
    """Give back what a failed run left on ``device``: its tensors (garbage) and torch's cached blocks.

    The pipelines' weights stay loaded, so the worker serves the next job as before.
    """
    gc.collect()  # the failed run's frames hold tensors until collected
    if device.type == "cuda":
        import torch

        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def worker_device(slot: int) -> torch.device:
    """The device of worker ``slot``: its own GPU when CUDA is present (one job per GPU), else the CPU."""
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda", slot % torch.cuda.device_count())
    return torch.device("cpu")
