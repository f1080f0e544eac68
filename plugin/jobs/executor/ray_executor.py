"""The Ray executor: each task runs in a warm actor of its pipeline, placed by Ray where its needs fit.

The job store stays the truth (leases, attempts, reasons: `plugin.jobs.execute`); a Ray call is
only the execution, and every way it can end maps onto the `Executor` contract: an actor that died
(killed, out of memory, its machine gone) or a call Ray lost is `WorkerLost` (the job is retried
within ``max_attempts``), a cluster that cannot be reached before anything ran, or an actor
Ray could not place within the time limit (the resources are taken), is `ExecutorUnavailable`
(the job waits in the queue, no attempt used), a run past its time limit kills its actor
(`TaskTimeout`).

Actors: per pipeline and device kind (GPU or CPU) up to ``executor.ray.actors_per_pipeline`` of
them (default: one per GPU of the cluster, one on CPU), created on demand with the pipeline's
`ai_models.resources.Resources` as Ray resources, kept while used, killed after
``idle_timeout_s`` without a task. A CUDA out-of-memory run is repeated on a CPU actor when the
pipeline allows it and ``oom_on_cpu`` says so; the GPU actor stays (its memory was freed).

Data: without ``shared_paths`` the node reads the series' files, sends their bytes with the call
and writes the result files that come back through `plugin.jobs.executor.output.write_whole`, the
way local workers write theirs; with it, actors read and write the node's paths themselves.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import ray

from ai_models.resources import Resources
from plugin.config import Config
from plugin.jobs.executor.actor import ActorAnswer, PipelineActor
from plugin.jobs.executor.base import (
    ExecutorUnavailable,
    Placement,
    Stopped,
    Task,
    TaskResult,
    TaskTimeout,
    Watch,
    WorkerLost,
)
from plugin.jobs.executor.output import MANIFEST, read_manifest, write_whole
from plugin.web.system import gpus

log = logging.getLogger(__name__)

NAMESPACE = "radgate"
GPU_MEMORY_RESOURCE = "gpu_memory_mb"
"""A custom Ray resource: GPU memory in MB a node declares (the node's own Ray declares its GPUs')."""
RECONNECT_S = 10.0
"""After the cluster could not be reached, jobs wait this long before the next try."""

_RemoteActor = ray.remote(PipelineActor)


@dataclass(frozen=True)
class _Deadline:
    """When waiting is over: for a run (then it timed out) or for an actor (then the job waits)."""

    at: float
    limit_s: float
    placing: bool  # waiting for Ray to place (or free) an actor, not for the run

    @classmethod
    def after(cls, seconds: float, *, placing: bool = False) -> _Deadline:
        return cls(time.monotonic() + seconds, seconds, placing)

    def check(self, watch: Watch, step: str) -> None:
        """Past the deadline raise TaskTimeout, or ExecutorUnavailable while placing (the resources are
        taken: the job goes back to the queue unharmed); Stopped when the watch (renewing the lease)
        says stop."""
        if time.monotonic() > self.at:
            if self.placing:
                raise ExecutorUnavailable(f"{step} for {self.limit_s:g} s: the resources it needs are taken")
            raise TaskTimeout(self.limit_s, step, {})
        if not watch.keep_going():
            raise Stopped()


@dataclass
class _Actor:
    handle: Any  # ray.actor.ActorHandle of a PipelineActor
    name: str
    placement: Placement
    busy: bool = True
    last_used: float = 0.0


def _write_files(folder: Path, files: Sequence[tuple[str, bytes]]) -> list[Path]:
    folder.mkdir()
    paths = []
    for name, data in files:
        path = folder / Path(name).name  # a bare name: nothing an actor sends lands outside the folder
        path.write_bytes(data)
        paths.append(path)
    return paths


@contextlib.contextmanager
def _signal_handlers_kept() -> Iterator[None]:
    """Put SIGTERM's and SIGINT's handlers back after the block: a Ray driver started in the main
    thread installs its own (exit at once), and the node decides how it stops."""
    kept = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        if threading.current_thread() is threading.main_thread():
            for signum, handler in kept.items():
                if handler is not None:  # None: set outside Python, nothing to put back
                    signal.signal(signum, handler)


def _kill(handle: Any) -> None:
    """Kill an actor, whatever state it or the cluster is in (never calling Ray once disconnected:
    most of its functions would then start a local Ray of their own)."""
    if ray.is_initialized():
        with contextlib.suppress(ray.exceptions.RayError, ValueError, ConnectionError):  # gone already
            ray.kill(handle, no_restart=True)


def _first_line(err: BaseException) -> str:
    """The error in one line: its first, or a gRPC error's ``details = ...`` (Ray Client's)."""
    lines = [line.strip() for line in str(err).strip().splitlines()] or [type(err).__name__]
    return next((line for line in lines if line.startswith("details = ")), lines[0])


class RayExecutor:
    """`Executor` on a Ray cluster; ``executor.workers`` tasks at once from this node."""

    def __init__(self, config: Config, tick_s: float = 0.5) -> None:
        self._config = config
        self._ray = config.executor.ray
        self._slots = config.executor.workers
        self._tick_s = tick_s
        self._lock = threading.Condition()
        self._pools: dict[tuple[str, bool], list[_Actor]] = {}
        self._starting: dict[tuple[str, bool], int] = {}
        self._created = 0
        self._connected = False
        self._owns_ray = False
        self._down_until = 0.0
        self._down_reason = ""
        self._closing = threading.Event()
        self._reaper: threading.Thread | None = None

    @property
    def slots(self) -> int:
        return self._slots

    # --- the cluster -----------------------------------------------------------------------------

    def start(self) -> None:
        """Join the configured cluster, or start the node's own Ray, in this thread: Ray ends the
        processes it starts when the thread that started them ends, so this must be the thread that
        lives as long as the executor (the node's main thread). A cluster that cannot be reached is
        logged; jobs wait, and with an address each job's turn tries again."""
        try:
            self._connect(own_ray=True)
        except ExecutorUnavailable as err:
            log.warning("executor: %s; jobs wait in the queue", err)

    def _connect(self, own_ray: bool = False) -> None:
        """Join the cluster once; ExecutorUnavailable if not now. Only with ``own_ray`` may the node's
        own Ray be started (see `start`)."""
        with self._lock:
            if self._connected:
                return
            if time.monotonic() < self._down_until:
                raise ExecutorUnavailable(self._down_reason)
            if not own_ray and self._ray.address is None and not ray.is_initialized():
                raise ExecutorUnavailable(self._down_reason or "the node's own Ray was not started")
            try:
                self._init_ray()
            except Exception as err:  # a bare Exception too: a raylet not registered within 30 s
                self._down_until = time.monotonic() + RECONNECT_S
                where = (
                    f"Ray at {self._ray.address} unreachable"
                    if self._ray.address
                    else "own Ray did not start"
                )
                self._down_reason = f"{where}: {_first_line(err)}"
                raise ExecutorUnavailable(self._down_reason) from None
            self._connected = True
            if self._reaper is None:
                self._reaper = threading.Thread(target=self._reap, name="radgate-ray-reaper", daemon=True)
                self._reaper.start()
        log.info("executor: Ray cluster with %s", ray.cluster_resources())

    def _init_ray(self) -> None:
        if ray.is_initialized():  # this process already joined a cluster (an embedding program, tests)
            return
        with _signal_handlers_kept():
            self._init_driver()
        self._owns_ray = True

    def _init_driver(self) -> None:
        common: dict[str, Any] = {"namespace": NAMESPACE, "log_to_driver": False, "configure_logging": False}
        if self._ray.address is not None:
            ray.init(address=self._ray.address, **common)
        else:
            memory_mb = sum(g.total_bytes for g in gpus()) // 2**20
            ray.init(
                num_cpus=self._ray.num_cpus,
                num_gpus=self._ray.num_gpus,
                resources={GPU_MEMORY_RESOURCE: memory_mb} if memory_mb else None,
                object_store_memory=self._ray.object_store_mb * 2**20,
                include_dashboard=False,
                **common,
            )

    # --- actors ----------------------------------------------------------------------------------

    def _plan(self, resources: Resources) -> bool | str:
        """Whether to use a GPU actor (True) or a CPU one (False), or why the pipeline cannot run."""
        has_gpus = ray.cluster_resources().get("GPU", 0) > 0
        if resources.gpus > 0 and has_gpus:
            return True
        if resources.cpu_fallback:
            return False
        return "the pipeline needs a GPU and the Ray cluster has none"

    def _options(self, resources: Resources, on_gpu: bool, name: str) -> dict[str, Any]:
        options: dict[str, Any] = {"name": name, "num_cpus": resources.cpus, "max_restarts": 0}
        if on_gpu:
            options["num_gpus"] = resources.gpus
            if resources.gpu_memory_mb and GPU_MEMORY_RESOURCE in ray.cluster_resources():
                options["resources"] = {GPU_MEMORY_RESOURCE: resources.gpu_memory_mb}
        else:
            options["num_gpus"] = 0
        return options

    def _limit(self, on_gpu: bool) -> int:
        if self._ray.actors_per_pipeline is not None:
            return self._ray.actors_per_pipeline
        return max(1, int(ray.cluster_resources().get("GPU", 0))) if on_gpu else 1

    def _acquire(
        self, pipeline: str, resources: Resources, on_gpu: bool, watch: Watch, deadline: _Deadline
    ) -> _Actor:
        """A free actor of the pipeline on that device kind (started when there are fewer than the
        limit), marked busy; waits for one otherwise. Raises ExecutorUnavailable, Stopped, WorkerLost."""
        key = (pipeline, on_gpu)
        while True:
            with self._lock:
                pool = self._pools.setdefault(key, [])
                for actor in pool:
                    if not actor.busy:
                        actor.busy = True
                        return actor
                start = len(pool) + self._starting.get(key, 0) < self._limit(on_gpu)
                if start:
                    self._starting[key] = self._starting.get(key, 0) + 1
                    self._created += 1
                    number = self._created
                else:
                    self._lock.wait(self._tick_s)
            if start:
                try:
                    actor = self._start(pipeline, resources, on_gpu, number, watch, deadline)
                finally:
                    with self._lock:
                        self._starting[key] -= 1
                with self._lock:
                    pool.append(actor)
                return actor
            deadline.check(watch, "waiting for a free actor")

    def _start(
        self,
        pipeline: str,
        resources: Resources,
        on_gpu: bool,
        number: int,
        watch: Watch,
        deadline: _Deadline,
    ) -> _Actor:
        """Create an actor and wait until Ray placed it (its resources were free) and it came up."""
        name = f"{pipeline}/{'gpu' if on_gpu else 'cpu'}{number}/{socket.gethostname()}:{os.getpid()}"
        handle: Any = _RemoteActor.options(**self._options(resources, on_gpu, name)).remote(
            self._config.logging
        )
        where = handle.where.remote()  # Ray's stubs do not type actor methods: hence Any
        try:
            while not ray.wait([where], timeout=self._tick_s)[0]:
                deadline.check(watch, "waiting for Ray to place the actor")
            info = ray.get(where)
        except (ExecutorUnavailable, Stopped):
            _kill(handle)
            raise
        except (ray.exceptions.RayError, ConnectionError) as err:
            _kill(handle)
            self._check_cluster()
            raise WorkerLost(f"Ray actor {name} did not start: {_first_line(err)}", {}) from None
        placement = Placement(executor="ray", actor=name, **{k: v for k, v in info.items() if v is not None})
        log.info("executor: actor %s started on %s", name, placement.as_record())
        return _Actor(handle, name, placement)

    def _release(self, actor: _Actor) -> None:
        with self._lock:
            actor.busy = False
            actor.last_used = time.monotonic()
            self._lock.notify_all()

    def _discard(self, actor: _Actor, why: str) -> None:
        """Forget the actor and kill it (it may still be running the task)."""
        with self._lock:
            for pool in self._pools.values():
                if actor in pool:
                    pool.remove(actor)
            self._lock.notify_all()
        _kill(actor.handle)
        log.info("executor: actor %s released (%s)", actor.name, why)

    def _check_cluster(self) -> None:
        """After a lost call: when the cluster itself is gone (its head down), forget it and its
        actors and raise ExecutorUnavailable, so that this job and the next wait in the queue
        instead of spending their attempts; the next turn after `RECONNECT_S` joins it again."""
        try:
            if not ray.is_initialized():  # Ray Client gave up on the connection
                raise ConnectionError("disconnected")
            ray.cluster_resources()
            return
        except Exception as err:  # ConnectionError, RaySystemError, ...: whatever Ray says, it is gone
            reason = f"Ray at {self._ray.address or 'this node'} lost: {_first_line(err)}"
        with self._lock:
            self._pools.clear()
            self._connected = False
            self._down_until = time.monotonic() + RECONNECT_S
            self._down_reason = reason
        if self._ray.address is not None:  # a remote cluster: join it afresh next time
            with contextlib.suppress(Exception):
                ray.shutdown()
        raise ExecutorUnavailable(reason)

    def _reap(self) -> None:
        """Release actors idle for ``idle_timeout_s`` (their memory, GPU share and weights go back)."""
        idle_s = self._ray.idle_timeout_s
        while not self._closing.wait(min(idle_s / 4, 5.0)):
            now = time.monotonic()
            with self._lock:
                actors = [a for pool in self._pools.values() for a in pool]
                idle = [a for a in actors if not a.busy and now - a.last_used > idle_s]
            for actor in idle:
                self._discard(actor, f"idle for {idle_s:g} s")

    # --- running ---------------------------------------------------------------------------------

    def run(self, slot: int, task: Task, timeout_s: float, watch: Watch) -> TaskResult:
        self._connect()
        out_dir = Path(task.out_dir)
        if not self._ray.shared_paths and (out_dir / MANIFEST).is_file():
            log.info("job %d: results of an earlier attempt found complete in %s", task.job_id, out_dir)
            return TaskResult(results=read_manifest(out_dir), reused=True)
        resources = self._config.pipeline_resources(task.pipeline)
        plan = self._plan(resources)
        if isinstance(plan, str):
            return TaskResult(error=plan, retry=True)
        try:
            inputs = None if self._ray.shared_paths else [Path(f).read_bytes() for f in task.files]
        except OSError as err:
            return TaskResult(error=f"series not readable: {err}", retry=True)
        result = self._run_on(task, inputs, resources, plan, watch, timeout_s, None)
        if result.cuda_oom and plan and resources.cpu_fallback and self._ray.oom_on_cpu:
            log.warning("job %d: %s; repeating it on the CPU", task.job_id, result.error)
            note = f"{result.error}; ran on the CPU"
            result = self._run_on(task, inputs, resources, False, watch, timeout_s, note)
        return result

    def _run_on(
        self,
        task: Task,
        inputs: list[bytes] | None,
        resources: Resources,
        on_gpu: bool,
        watch: Watch,
        timeout_s: float,
        note: str | None,
    ) -> TaskResult:
        """Run on an actor of that device kind: waiting up to ``timeout_s`` for one, then as long again
        for the run."""
        actor = self._acquire(
            task.pipeline, resources, on_gpu, watch, _Deadline.after(timeout_s, placing=True)
        )
        watch.placed(replace(actor.placement, note=note))
        deadline = _Deadline.after(timeout_s)
        try:
            call: Any = actor.handle.run.remote(task, inputs)
            while not ray.wait([call], timeout=self._tick_s)[0]:
                deadline.check(watch, "on Ray")
            answer: ActorAnswer = ray.get(call)
        except (TaskTimeout, Stopped):
            self._discard(actor, "stopped")
            raise
        except (ray.exceptions.RayError, ConnectionError) as err:
            self._discard(actor, "lost")
            self._check_cluster()
            raise WorkerLost(f"Ray actor {actor.name} lost: {_first_line(err)}", {}) from None
        self._release(actor)
        for step, seconds in answer.result.timings.items():
            watch.step_done(step, seconds)
        if not answer.files:
            return answer.result
        try:
            results = write_whole(Path(task.out_dir), lambda folder: _write_files(folder, answer.files))
        except OSError as err:
            return replace(answer.result, error=f"results: {err}", retry=True)
        log.info("job %d: %d result objects from actor %s", task.job_id, len(results), actor.name)
        return replace(answer.result, results=results)

    def close(self) -> None:
        self._closing.set()
        if self._reaper is not None:
            self._reaper.join()
        with self._lock:
            actors = [a for pool in self._pools.values() for a in pool]
        for actor in actors:
            self._discard(actor, "executor closed")
        if self._owns_ray and ray.is_initialized():
            with contextlib.suppress(Exception):  # a cluster gone meanwhile: nothing to leave
                ray.shutdown()
