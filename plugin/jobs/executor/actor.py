"""The Ray actor that runs one pipeline's tasks, inside a Ray worker process (anywhere in the cluster).

It lives as long as the node keeps it (`plugin.jobs.executor.ray_executor`), so torch and the
pipeline's weights load once per actor, not per study. It runs `plugin.jobs.executor.work.run_task`,
the local workers' code: a CUDA out-of-memory error is freed there and the actor serves the next
task. Without a shared file system the node sends the series' bytes and gets the result files'
bytes back; this module is imported by the node too (to declare the actor), so torch is imported
only inside the actor's methods.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from plugin.config import LoggingConfig
from plugin.jobs.executor.base import Task, TaskResult

if TYPE_CHECKING:
    from ai_models.base import Pipeline


@dataclass(frozen=True)
class ActorAnswer:
    """What an actor sends back: the task's result and, without a shared file system, its files
    as (file name, bytes) in sending order (the result's own ``results`` are then empty)."""

    result: TaskResult
    files: tuple[tuple[str, bytes], ...] = ()


class PipelineActor:
    """Runs tasks in this Ray worker, keeping each pipeline it built (its weights) for the next."""

    def __init__(self, logging_config: LoggingConfig) -> None:
        import ray
        import torch

        from plugin.logs import setup_logging

        setup_logging(logging_config)
        gpus = ray.get_runtime_context().get_accelerator_ids().get("GPU", [])
        # Ray sets CUDA_VISIBLE_DEVICES to the GPU it gave this actor, so it is device 0 here
        self._device = torch.device("cuda", 0) if gpus and torch.cuda.is_available() else torch.device("cpu")
        self._where = {
            "hostname": socket.gethostname(),
            "ip": ray.util.get_node_ip_address(),
            "node_id": ray.get_runtime_context().get_node_id(),
            "gpu": gpus[0] if gpus else None,
            "device": str(self._device),
            "worker": f"pid {os.getpid()}",
        }
        self._pipelines: dict[str, Pipeline] = {}
        self._loads: Counter[str] = Counter()

    def where(self) -> dict[str, Any]:
        """The machine, Ray node, GPU and device this actor runs on (the fields of `Placement`)."""
        return dict(self._where)

    def loads(self) -> dict[str, int]:
        """How many times each pipeline was built (its weights loaded) in this actor."""
        return dict(self._loads)

    def run(self, task: Task, inputs: list[bytes] | None) -> ActorAnswer:
        """Run ``task``: on its own files (a shared file system) when ``inputs`` is None, else on
        these bytes of the series' files, in order, with the results sent back as bytes."""
        if inputs is None:
            return ActorAnswer(self._run(task))
        with tempfile.TemporaryDirectory(prefix=f"radgate-job{task.job_id}-") as tmp:
            folder = Path(tmp, "series")
            folder.mkdir()
            files = []
            for index, data in enumerate(inputs):
                path = folder / f"{index:05d}.dcm"
                path.write_bytes(data)
                files.append(str(path))
            here = dataclasses.replace(task, files=tuple(files), out_dir=str(Path(tmp, "results")))
            result = self._run(here)
            sent = tuple((Path(p).name, Path(p).read_bytes()) for _, p in result.results)
        return ActorAnswer(dataclasses.replace(result, results=()), sent)

    def _run(self, task: Task) -> TaskResult:
        from plugin.jobs.executor.work import run_task

        built = task.pipeline in self._pipelines
        result = run_task(task, self._device, self._pipelines, lambda *_: None)  # steps: in the answer
        if not built and task.pipeline in self._pipelines:
            self._loads[task.pipeline] += 1
            logging.getLogger(__name__).info("actor: %s loaded on %s", task.pipeline, self._device)
        return result
