"""Where tasks run: the `Executor` interface and the local process-pool backend (Ray comes later).

Public API: `Task`, `TaskResult`, `Executor`, `Watch`, `TaskTimeout`, `WorkerLost`, `Stopped`,
`LocalExecutor`.
"""

from plugin.jobs.executor.base import Executor, Stopped, Task, TaskResult, TaskTimeout, Watch, WorkerLost
from plugin.jobs.executor.local import LocalExecutor

__all__ = ["Executor", "LocalExecutor", "Stopped", "Task", "TaskResult", "TaskTimeout", "Watch", "WorkerLost"]
