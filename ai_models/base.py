"""What every pipeline is: the `Pipeline` protocol, its error for unusable input, and the device choice.

Pipelines get a `Volume` and return `Findings` (see `dicom_io.types`). They must say *why* they cannot
use a volume (`accepts` returns a reason) instead of producing a wrong result, and they run on the
GPU when there is one and on the CPU otherwise, through the same code.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Collection
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from dicom_io.selection import ANY_SERIES, SeriesWanted
from dicom_io.types import Code, Findings, GeometryError, Volume

if TYPE_CHECKING:  # torch is imported where a device is chosen, so this module loads without it
    import torch

VOLUME = Code("118565006", "SCT", "Volume")
UNIT_CM3 = Code("cm3", "UCUM", "cubic centimeter")
"""The unit of every volume: UCUM is case-sensitive and has no "ml" (its code is "mL"); cm3 is what
CONFORMANCE.md asks for and viewers show. 1 cm3 = 1 mL, so values in mL need no conversion."""


class PipelineError(Exception):
    """The pipeline cannot use this input (wrong modality, too few slices, no anatomy found, ...).

    The message is the human reason; it ends the job as FAILED and is shown to the operator.
    """

    def __init__(self, pipeline: str, reason: str) -> None:
        super().__init__(f"{pipeline}: {reason}")
        self.pipeline = pipeline
        self.reason = reason


@runtime_checkable
class Pipeline(Protocol):
    """A named, versioned analysis: `Volume` in, `Findings` out.

    A pipeline may also have a `series` attribute, a `dicom_io.selection.SeriesWanted`: the series
    of a study it can use and the order it prefers them in (see `declared_series`); the node runs it
    on the best one. Optional, so a pipeline written before it still loads.
    """

    name: str
    version: str

    def accepts(self, volume: Volume) -> str | None:
        """None when the volume is usable, else the reason it is not (for the operator)."""
        ...

    def run(self, volume: Volume, device: torch.device) -> Findings:
        """Analyse the volume on `device`; raise `PipelineError` when the input turns out unusable."""
        ...


def declared_series(pipeline: Pipeline) -> SeriesWanted:
    """The pipeline's `series` declaration; `ANY_SERIES` when it has none (TypeError: not one)."""
    series = getattr(pipeline, "series", ANY_SERIES)
    if not isinstance(series, SeriesWanted):
        kind = type(series).__name__
        raise TypeError(f"pipeline {pipeline.name!r}: `series` is a {kind}, not a SeriesWanted")
    return series


def select_device() -> torch.device:
    """CUDA when PyTorch sees a GPU, else the CPU: the one place this choice is made."""
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast(device: torch.device) -> contextlib.AbstractContextManager[object]:
    """Mixed precision (float16) for network inference on CUDA; full precision on the CPU."""
    if device.type == "cuda":
        import torch

        return torch.autocast(device_type="cuda", dtype=torch.float16)
    return contextlib.nullcontext()


def basic_reason(
    volume: Volume,
    *,
    modalities: Collection[str],
    min_slices: int,
    max_spacing_mm: float = 10.0,
) -> str | None:
    """The checks most pipelines share: modality, slice count, sane geometry, finite voxels."""
    if volume.modality not in modalities:
        wanted = " or ".join(sorted(modalities))
        return f"modality is {volume.modality or 'missing'!r}, this pipeline needs {wanted}"
    if volume.shape[0] < min_slices:
        return f"only {volume.shape[0]} slices, this pipeline needs at least {min_slices}"
    spacing = volume.spacing
    if not all(np.isfinite(s) and 0.0 < s <= max_spacing_mm for s in spacing):
        return f"voxel spacing {tuple(round(s, 3) for s in spacing)} mm is outside (0, {max_spacing_mm}] mm"
    if not np.all(np.isfinite(volume.affine)):
        return "the volume's position/orientation (affine) holds non-finite numbers"
    if not np.issubdtype(volume.voxels.dtype, np.integer) and not np.all(np.isfinite(volume.voxels)):
        return "the voxels hold NaN or infinite values"
    return None


def run_pipeline(pipeline: Pipeline, volume: Volume, device: torch.device | None = None) -> Findings:
    """Check the volume, run the pipeline and check that its findings fit the volume's grid.

    The single entry the node and the offline runner use, so an unusable volume always ends in a
    `PipelineError` with the reason, never in a result computed on the wrong input.
    """
    reason = pipeline.accepts(volume)
    if reason is not None:
        raise PipelineError(pipeline.name, reason)
    findings = pipeline.run(volume, device or select_device())
    if tuple(findings.shape) != volume.shape:
        raise GeometryError(
            f"{pipeline.name} returned findings of shape {findings.shape} "
            f"for a volume of shape {volume.shape}"
        )
    return findings


def patient_axes(affine: npt.NDArray[np.float64]) -> tuple[tuple[int, int, int], tuple[bool, bool, bool]]:
    """Which voxel axis (0 = slice, 1 = row, 2 = column) runs along each patient axis L, P, S.

    Returns (axes, flips): axes[p] is the voxel axis closest to patient axis p (LPS order) and
    flips[p] says that voxel axis points the other way (towards R, A or I). Taken from the affine,
    never from the array order, so every acquisition plane and slice order works.
    """
    directions = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)  # [patient axis, affine column]
    best = max(
        itertools.permutations(range(3)),
        key=lambda perm: sum(abs(directions[p, perm[p]]) for p in range(3)),
    )
    # affine column c is the direction of voxel axis 2 - c (columns are x, y, z; voxels are z, y, x)
    axes = (2 - best[0], 2 - best[1], 2 - best[2])
    flips = (
        bool(directions[0, best[0]] < 0),
        bool(directions[1, best[1]] < 0),
        bool(directions[2, best[2]] < 0),
    )
    return axes, flips
