"""The local executor: one worker process per slot, started by the node, killed on a time limit.

A worker lives on between tasks (torch and a model's weights load once) and is replaced after it
was killed or died; why processes, and why ``spawn``: docs/design.md, "Jobs and pipelines". A
worker ignores SIGINT (the node decides what stops) and exits when the node's end of its pipe
closes or, mid-task, when the node is gone, so a killed node leaves no worker behind.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess

from plugin.config import LoggingConfig
from plugin.jobs.executor.base import Placement, Stopped, Task, TaskResult, TaskTimeout, Watch, WorkerLost

log = logging.getLogger(__name__)

STEP_AFTER = {"load_s": "infer", "infer_s": "encode", "encode_s": "encode"}
NODE_WATCH_S = 0.5
"""How often a worker checks that its node is still alive (`_exit_with_node`)."""
START_TIMEOUT_S = 300.0
"""How long a new worker may take to import torch and the pipelines before it counts as broken."""


def _exit_with_node(node_pid: int) -> None:
    """End this worker once the node that started it is gone (it was SIGKILLed): a worker left
    computing would hold its GPU and write results while another node runs the job again. The
    closed pipe alone ends a worker only between tasks."""
    while os.getppid() == node_pid:
        time.sleep(NODE_WATCH_S)
    os._exit(1)


def cpu_threads(slots: int) -> int:
    """torch's CPU threads per worker when ``slots`` workers share this process's cores: each its
    share, so that busy workers do not oversubscribe the cores (docs/design.md, "Jobs and pipelines")."""
    return max(1, len(os.sched_getaffinity(0)) // slots)


def _worker_main(
    conn: Connection, slot: int, threads: int, logging_config: LoggingConfig, node_pid: int
) -> None:
    """A worker process: say ready, then run each task it is sent, reporting every finished step."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_with_node, args=(node_pid,), name="node-watch", daemon=True).start()
    import torch

    from ai_models.base import Pipeline
    from plugin.jobs.executor.work import run_task, worker_device
    from plugin.logs import setup_logging

    torch.set_num_threads(threads)

    setup_logging(logging_config)
    logging.getLogger("highdicom").setLevel(max(logging.WARNING, logging.getLogger().level))  # per object
    device = worker_device(slot)
    pipelines: dict[str, Pipeline] = {}

    def report(step: str, seconds: float) -> None:
        with contextlib.suppress(OSError):  # the node is gone: the result cannot be sent either
            conn.send(("step", step, seconds))

    try:
        conn.send(("ready", str(device), torch.get_num_threads()))
        while True:
            task = conn.recv()
            conn.send(("result", run_task(task, device, pipelines, report)))
    except (EOFError, OSError):  # the node closed our pipe or died: nobody is waiting for us
        return


@dataclass
class _Worker:
    process: BaseProcess
    conn: Connection
    device: str = "?"
    threads: int = 0

    def placement(self) -> Placement:
        gpu = self.device.partition(":")[2] if self.device.startswith("cuda") else ""
        return Placement(
            "local",
            socket.gethostname(),
            f"pid {self.process.pid}",
            self.device,
            gpu=gpu or None,
            threads=str(self.threads),
        )


class LocalExecutor:
    """`Executor` on worker processes of this machine; with CUDA, at most one slot per GPU."""

    def __init__(self, workers: int, logging_config: LoggingConfig, tick_s: float = 0.5) -> None:
        from plugin.jobs.executor.devices import executor_slots  # torch: only for this executor

        self._slots = executor_slots(workers)
        self._logging = logging_config
        self._tick_s = tick_s
        self._context = multiprocessing.get_context("spawn")
        self._workers: dict[int, _Worker] = {}
        self._lock = threading.Lock()

    @property
    def slots(self) -> int:
        return self._slots

    def start(self) -> None:
        """Nothing to do: a slot's worker starts with its first task."""

    def _start(self, slot: int, watch: Watch) -> _Worker:
        ours, theirs = self._context.Pipe()
        process = self._context.Process(
            target=_worker_main,
            args=(theirs, slot, cpu_threads(self._slots), self._logging, os.getpid()),
            name=f"radgate-worker-{slot}",
        )
        process.start()
        theirs.close()
        worker = _Worker(process, ours)
        with self._lock:
            self._workers[slot] = worker
        deadline = time.monotonic() + START_TIMEOUT_S
        while not ours.poll(self._tick_s):
            if not process.is_alive() or time.monotonic() > deadline:
                code = self._kill(slot)
                raise WorkerLost(f"worker process {slot} did not start (exit code {code})", {})
            if not watch.keep_going():
                self._kill(slot)
                raise Stopped()
        try:
            _, device, threads = ours.recv()
        except (EOFError, OSError):
            code = self._kill(slot)
            raise WorkerLost(f"worker process {slot} died while starting (exit code {code})", {}) from None
        log.info("worker %d started (pid %s) on %s, %d torch threads", slot, process.pid, device, threads)
        worker.device, worker.threads = device, threads
        return worker

    def _kill(self, slot: int) -> int | None:
        """SIGKILL the slot's worker (it may be stuck anywhere) and forget it; its exit code."""
        with self._lock:
            worker = self._workers.pop(slot, None)
        if worker is None:
            return None
        if worker.process.is_alive():
            worker.process.kill()
        worker.process.join(10)
        worker.conn.close()
        return worker.process.exitcode

    def run(self, slot: int, task: Task, timeout_s: float, watch: Watch) -> TaskResult:
        with self._lock:
            worker = self._workers.get(slot)
        if worker is None or not worker.process.is_alive():
            self._kill(slot)
            worker = self._start(slot, watch)
        timings: dict[str, float] = {}
        step = "load"
        deadline = time.monotonic() + timeout_s
        watch.placed(worker.placement())
        try:
            worker.conn.send(task)
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self._kill(slot)
                    raise TaskTimeout(timeout_s, step, timings)
                if not watch.keep_going():
                    self._kill(slot)
                    raise Stopped()
                if not worker.conn.poll(min(self._tick_s, remaining)):
                    continue
                message = worker.conn.recv()
                if message[0] == "result":
                    result: TaskResult = message[1]
                    return result
                _, name, seconds = message
                timings[name] = seconds
                step = STEP_AFTER[name]
                watch.step_done(name, seconds)
        except (EOFError, OSError):
            code = self._kill(slot)
            raise WorkerLost(f"worker process died during {step} (exit code {code})", timings) from None

    def close(self) -> None:
        with self._lock:
            slots = list(self._workers)
        for slot in slots:
            self._kill(slot)
