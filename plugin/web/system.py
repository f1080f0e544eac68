"""The machine under the node, as the console and ``/metrics`` show it: free disk space, GPU memory.

GPU memory comes from NVIDIA's management library (NVML, the ``pynvml`` module of nvidia-ml-py),
which reads the driver's figures without creating a CUDA context: asking torch.cuda would take
hundreds of MB of GPU memory in this process, away from the pipelines.
"""

from __future__ import annotations

import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class DiskSpace:
    path: Path
    free_bytes: int  # available to this (unprivileged) user
    total_bytes: int


@dataclass(frozen=True)
class GpuMemory:
    index: int
    name: str
    used_bytes: int
    total_bytes: int


def disk_free(path: Path) -> DiskSpace:
    """Free and total bytes of the file system that holds ``path``; OSError if it cannot be read."""
    usage = shutil.disk_usage(path)
    return DiskSpace(path, usage.free, usage.total)


_nvml_lock = threading.Lock()
_nvml: Any = None  # the pynvml module once NVML is initialised; False: no NVML on this machine


def _nvml_module() -> Any:
    """pynvml with NVML initialised, or None where there is no NVIDIA driver (or no pynvml)."""
    global _nvml
    with _nvml_lock:
        if _nvml is None:
            try:
                import pynvml

                pynvml.nvmlInit()
                _nvml = pynvml
            except Exception:  # ImportError, NVMLError (no library, no driver, no device)
                _nvml = False
        return _nvml or None


def gpus() -> list[GpuMemory]:
    """Each NVIDIA GPU's memory in use (by any process) and in all; empty without a GPU or driver.
    Never raises: a GPU that cannot be read is left out."""
    nvml = _nvml_module()
    if nvml is None:
        return []
    found = []
    try:
        count = nvml.nvmlDeviceGetCount()
    except nvml.NVMLError:
        return []
    for index in range(count):
        try:
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            name = nvml.nvmlDeviceGetName(handle)
        except nvml.NVMLError:
            continue
        name = name.decode() if isinstance(name, bytes) else str(name)
        found.append(GpuMemory(index, name, int(memory.used), int(memory.total)))
    return found
