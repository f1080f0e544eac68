"""The devices jobs run on: how many CUDA devices torch sees, the slots they give, and the CPU.

torch is imported only where a GPU driver is loaded: the node's own process (which runs no model)
stays free of it on a machine without a GPU. GPU memory is read elsewhere, without creating a CUDA
context (`plugin.web.system.gpus`).
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from pathlib import Path

GPU_DRIVERS = (Path("/proc/driver/nvidia"), Path("/dev/kfd"))
"""Present when NVIDIA's (CUDA) or AMD's (ROCm, which torch also calls cuda) kernel driver is loaded."""


@dataclass(frozen=True)
class CpuInfo:
    """The machine's processor and memory in bytes (None: not known), where jobs run without CUDA."""

    name: str
    cores: int
    memory_total_bytes: int | None
    memory_used_bytes: int | None


def gpu_count() -> int:
    """How many CUDA devices torch sees (0 without CUDA, and without a GPU driver, asking no torch)."""
    if not any(driver.exists() for driver in GPU_DRIVERS):
        return 0
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def executor_slots(workers: int) -> int:
    """The slots of a local executor of ``workers`` processes: with CUDA, at most one per GPU."""
    gpus = gpu_count()
    return min(workers, gpus) if gpus else workers


def cpu_info() -> CpuInfo:
    """The processor and the memory of this machine (POSIX ``sysconf``)."""
    try:
        page = os.sysconf("SC_PAGE_SIZE")
        total: int | None = page * os.sysconf("SC_PHYS_PAGES")
        used: int | None = None if total is None else total - page * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError):  # not a system that says
        total = used = None
    return CpuInfo(platform.processor() or platform.machine() or "CPU", os.cpu_count() or 1, total, used)
