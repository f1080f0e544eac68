"""What each built-in pipeline needs to run (CPU, a share of a GPU, GPU memory), without torch.

The Ray executor places a pipeline's actors where these are free; the node reads them in its own
process, where torch must not load, so they live here rather than on the pipeline classes (like
`ai_models.series`). A pipeline not listed here gets `DEFAULT_RESOURCES` unless the configuration
declares its needs (``executor.ray.resources``).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Resources:
    """One run's needs: ``cpus`` cores, ``gpus`` (a share of one GPU, 0: CPU only), ``gpu_memory_mb``
    of that GPU, and whether it may run on the CPU instead when no GPU (or not enough of its memory)
    is free (``cpu_fallback``)."""

    cpus: float = 1.0
    gpus: float = 0.0
    gpu_memory_mb: int = 0
    cpu_fallback: bool = True

    def __post_init__(self) -> None:
        if self.cpus <= 0 or not 0 <= self.gpus <= 1 or self.gpu_memory_mb < 0:
            raise ValueError(f"resources out of range: {self}")
        if self.gpus == 0 and not self.cpu_fallback:
            raise ValueError("a pipeline that needs no GPU must be allowed to run on the CPU")


DEFAULT_RESOURCES = Resources()

BUILTIN_RESOURCES: dict[str, Resources] = {
    "ct-lung": Resources(cpus=1.0, gpus=0.25, gpu_memory_mb=4_000),
    "mr-brain": Resources(cpus=1.0, gpus=0.5, gpu_memory_mb=6_000),
    "monai-bundle": Resources(cpus=1.0, gpus=0.5, gpu_memory_mb=8_000),
}
"""Built-in pipeline name -> its needs (the largest series of bench/README.md, with headroom)."""
