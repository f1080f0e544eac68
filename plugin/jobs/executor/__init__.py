"""Where tasks run: the `Executor` interface, the local process-pool backend and the Ray backend.

Public API: `Task`, `TaskResult`, `Placement`, `Executor`, `Watch`, `TaskTimeout`, `WorkerLost`,
`Stopped`, `ExecutorUnavailable`, `LocalExecutor`, `make_executor`. Ray is imported only by
`make_executor` for ``executor.kind: ray`` (importing it takes a second or two).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from plugin.jobs.executor.base import (
    Executor,
    ExecutorUnavailable,
    Placement,
    Stopped,
    Task,
    TaskResult,
    TaskTimeout,
    Watch,
    WorkerLost,
)
from plugin.jobs.executor.local import LocalExecutor

if TYPE_CHECKING:
    from plugin.config import Config

__all__ = [
    "Executor",
    "ExecutorUnavailable",
    "LocalExecutor",
    "Placement",
    "Stopped",
    "Task",
    "TaskResult",
    "TaskTimeout",
    "Watch",
    "WorkerLost",
    "make_executor",
]


def make_executor(config: Config) -> Executor:
    """The executor ``config.executor.kind`` names: local worker processes or a Ray cluster."""
    if config.executor.kind == "ray":
        from plugin.jobs.executor.ray_executor import RayExecutor

        return RayExecutor(config)
    return LocalExecutor(config.executor.workers, config.logging)
