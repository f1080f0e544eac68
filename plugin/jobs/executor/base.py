"""The executor seam: the node hands a `Task` to an `Executor` and gets a `TaskResult` back.

The node keeps all job-store bookkeeping (leases, retries, recording); an executor only runs
tasks somewhere (local worker processes, or actors on a Ray cluster) and must be able to stop
one. So the interface is one blocking call per slot that watches the clock and the caller's `Watch`,
which also hears where the task runs (`Placement`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from dicom_io.results.prior import Prior


@dataclass(frozen=True)
class Task:
    """One run of a pipeline on one series: plain data, so it crosses process (and machine) borders.

    ``out_dir`` is where the results must appear, whole or not at all; if it already exists, an
    earlier attempt finished writing it and its files are the results (nothing runs again).
    ``pipeline`` is the name the job was routed to; a name from the config's ``pipelines`` comes
    with the registered pipeline it is built on (``base``) and its ``options``, so a worker needs
    no configuration of its own.
    """

    job_id: int
    pipeline: str
    study_uid: str
    series_uid: str
    revision: int
    files: tuple[str, ...]
    out_dir: str
    supersedes: int | None = None
    base: str | None = None  # None: ``pipeline`` is itself a registered pipeline
    options: dict[str, Any] = field(default_factory=dict)
    prior: Prior | None = None  # a prior study's result to compare with (`plugin.route.requires`)
    comparison_note: str | None = None  # why there is no comparison when the rule asked for one


@dataclass(frozen=True)
class TaskResult:
    """Result files as (SOP Instance UID, path), seconds per step, or the reason it failed."""

    results: tuple[tuple[str, str], ...] = ()
    timings: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    retry: bool = False  # True: not the input's fault (a bug, a full disk); another attempt may work
    reused: bool = False  # the files of an earlier attempt were found complete and used
    cuda_oom: bool = False  # the error is CUDA running out of memory (freed again; the worker is fine)


@dataclass(frozen=True)
class Placement:
    """Where a task runs: the executor, the machine, the worker, the device; Ray's node and GPU.

    ``note`` says why it runs there when that is not the first choice (after a CUDA out-of-memory
    error, on the CPU). Stored on the job as a JSON object (`as_record`).
    """

    executor: str  # "local" or "ray"
    hostname: str
    worker: str  # the worker process, "pid 4242"
    device: str  # "cpu" or "cuda:0", as the worker's torch sees it
    node_id: str | None = None  # Ray's node id
    ip: str | None = None
    gpu: str | None = None  # the GPU index the worker was given, None: none
    actor: str | None = None  # the Ray actor's name
    threads: str | None = None  # torch's CPU threads in the worker (local executor)
    note: str | None = None

    def as_record(self) -> dict[str, str]:
        """The non-empty fields, as the job store keeps them."""
        return {k: v for k, v in asdict(self).items() if v is not None}


class TaskTimeout(Exception):
    """The task ran past its time limit and was killed."""

    def __init__(self, seconds: float, step: str, timings: dict[str, float]) -> None:
        super().__init__(f"timed out after {seconds:g} s (in {step})")
        self.timings = timings


class WorkerLost(Exception):
    """The process running the task died (killed, out of memory, crashed) before answering."""

    def __init__(self, reason: str, timings: dict[str, float]) -> None:
        super().__init__(reason)
        self.timings = timings


class ExecutorUnavailable(Exception):
    """The executor cannot take tasks now (its cluster is unreachable); nothing ran, the job may wait."""


class Stopped(Exception):
    """The caller's watch asked to stop (the node is stopping or the lease was lost); the task was killed."""


class Watch(Protocol):
    """What the caller wants to hear while a task runs."""

    def keep_going(self) -> bool:
        """Called about every second: renew the lease, say whether to go on."""
        ...

    def step_done(self, step: str, seconds: float) -> None:
        """A step (``load_s``, ``infer_s``, ``encode_s``) finished after ``seconds``."""
        ...

    def placed(self, placement: Placement) -> None:
        """The task (again, when it moved) runs at ``placement``."""
        ...


class Executor(Protocol):
    """Runs tasks on ``slots`` parallel workers; each slot runs one task at a time."""

    @property
    def slots(self) -> int: ...

    def start(self) -> None:
        """Get ready, in the thread that will later call `close` (the node's main thread).

        Never raises for a cluster that cannot be reached: its tasks then raise ExecutorUnavailable.
        """
        ...

    def run(self, slot: int, task: Task, timeout_s: float, watch: Watch) -> TaskResult:
        """Run ``task`` on worker ``slot`` and wait for it.

        Raises TaskTimeout, WorkerLost or Stopped (the task's worker is gone in each case), or
        ExecutorUnavailable before anything ran.
        """
        ...

    def close(self) -> None:
        """Stop every worker (killing running tasks)."""
        ...
