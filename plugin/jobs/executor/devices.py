"""The devices jobs run on: the GPUs torch sees (CUDA), else the CPU, and how many slots they give.

Reading GPU memory must not take any of it: the used memory comes from the driver (NVML, through
``torch.cuda.device_memory_used``), so the process asking (the node, the console) creates no CUDA
context on the GPUs its workers use.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from typing import Literal

import torch


@dataclass(frozen=True)
class DeviceInfo:
    """A GPU (``cuda``, its index) or the CPU, with its memory in bytes (None: not known)."""

    kind: Literal["cuda", "cpu"]
    index: int
    name: str
    memory_total_bytes: int | None
    memory_used_bytes: int | None


def gpu_count() -> int:
    """How many CUDA devices torch sees (0 without CUDA)."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def executor_slots(workers: int) -> int:
    """The slots of a local executor of ``workers`` processes: with CUDA, at most one per GPU."""
    gpus = gpu_count()
    return min(workers, gpus) if gpus else workers


def _cpu() -> DeviceInfo:
    try:
        page = os.sysconf("SC_PAGE_SIZE")
        total: int | None = page * os.sysconf("SC_PHYS_PAGES")
        used: int | None = None if total is None else total - page * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError):  # not a POSIX system that says
        total = used = None
    name = platform.processor() or platform.machine() or "CPU"
    return DeviceInfo("cpu", 0, f"{name}, {os.cpu_count() or '?'} cores", total, used)


def devices() -> list[DeviceInfo]:
    """Every CUDA device with its memory, or (no CUDA) the CPU with the machine's memory."""
    found = []
    for index in range(gpu_count()):
        properties = torch.cuda.get_device_properties(index)
        try:
            used: int | None = int(torch.cuda.device_memory_used(index))
        except Exception:  # no NVML library: the total is still worth showing
            used = None
        found.append(DeviceInfo("cuda", index, str(properties.name), int(properties.total_memory), used))
    return found or [_cpu()]
