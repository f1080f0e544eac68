"""The plain data types that cross the seam between DICOM handling and the AI pipelines.

`Volume` is what a pipeline gets, `Findings` is what it returns. Neither holds a pydicom
Dataset, so pipelines stay independent of DICOM, and both validate at construction so a
wrong shape or geometry fails where it is made, with a message that says what is wrong.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt


class GeometryError(ValueError):
    """A volume, mask or finding whose geometry is inconsistent."""


@dataclass(frozen=True)
class Code:
    """A coded concept (value, scheme designator, meaning), e.g. ("39607008", "SCT", "Lung")."""

    value: str
    scheme: str
    meaning: str

    def __post_init__(self) -> None:
        for name in ("value", "scheme", "meaning"):
            if not getattr(self, name):
                raise ValueError(f"Code.{name} must not be empty: {self!r}")


@dataclass(frozen=True)
class SourceRef:
    """One source image plane of a volume: the instance (and frame, 1-based, for multi-frame)."""

    sop_class_uid: str
    sop_instance_uid: str
    frame: int | None = None


@dataclass(frozen=True, eq=False)
class Volume:
    """Voxels on a regular grid with their place in the patient.

    voxels: array indexed (z, y, x) = (slice, row, column) in modality units (HU for CT).
    affine: 4x4 matrix mapping (column, row, slice) = (x, y, z) voxel indices to DICOM patient
        coordinates in mm (LPS). Column 0 is the row direction times column spacing, column 1 the
        column direction times row spacing, column 2 the slice step, column 3 the first voxel's centre.
    sources: one SourceRef per slice, in slice order (sources[k] is voxels[k]).
    attributes: series attributes a pipeline may need (Modality, BodyPartExamined, StudyInstanceUID,
        SeriesInstanceUID, FrameOfReferenceUID, ...), plain Python values only.
    """

    voxels: npt.NDArray[Any]
    affine: npt.NDArray[np.float64]
    sources: tuple[SourceRef, ...]
    attributes: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.voxels.ndim != 3:
            raise GeometryError(f"Volume voxels must be 3-D (z, y, x), got shape {self.voxels.shape}")
        if any(n == 0 for n in self.voxels.shape):
            raise GeometryError(f"Volume voxels must not be empty, got shape {self.voxels.shape}")
        affine = np.asarray(self.affine, dtype=np.float64)
        if affine.shape != (4, 4):
            raise GeometryError(f"Volume affine must be 4x4, got {affine.shape}")
        if not np.allclose(affine[3], [0.0, 0.0, 0.0, 1.0]):
            raise GeometryError(f"Volume affine's last row must be 0 0 0 1, got {affine[3]}")
        if abs(np.linalg.det(affine[:3, :3])) < 1e-9:
            raise GeometryError("Volume affine is singular (zero spacing or parallel axes)")
        object.__setattr__(self, "affine", affine)
        if len(self.sources) != self.voxels.shape[0]:
            raise GeometryError(
                f"Volume has {self.voxels.shape[0]} slices but {len(self.sources)} source references"
            )
        object.__setattr__(self, "sources", tuple(self.sources))

    @property
    def shape(self) -> tuple[int, int, int]:
        """(slices, rows, columns)."""
        z, y, x = self.voxels.shape
        return (int(z), int(y), int(x))

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm as (slice step, row spacing, column spacing), matching the voxel axes."""
        norms = np.linalg.norm(self.affine[:3, :3], axis=0)
        return (float(norms[2]), float(norms[1]), float(norms[0]))

    @property
    def voxel_volume_ml(self) -> float:
        """Volume of one voxel in millilitres (cm3)."""
        return float(abs(np.linalg.det(self.affine[:3, :3]))) / 1000.0

    @property
    def modality(self) -> str:
        return str(self.attributes.get("Modality", ""))


@dataclass(frozen=True, eq=False)
class Segment:
    """One segmented structure: a boolean mask on the volume grid, (z, y, x) like `Volume.voxels`."""

    number: int
    label: str
    category: Code
    property_type: Code
    mask: npt.NDArray[np.bool_]
    anatomic_region: Code | None = None
    laterality: Code | None = None
    color_rgb: tuple[int, int, int] = (255, 0, 0)

    def __post_init__(self) -> None:
        if self.number < 1:
            raise ValueError(f"Segment number must be >= 1, got {self.number} ({self.label!r})")
        if not self.label:
            raise ValueError(f"Segment {self.number} needs a label")
        if self.mask.ndim != 3:
            raise GeometryError(f"Segment {self.number} mask must be 3-D, got shape {self.mask.shape}")
        if self.mask.dtype != np.bool_:
            object.__setattr__(self, "mask", self.mask.astype(bool))
        if any(not 0 <= c <= 255 for c in self.color_rgb):
            raise ValueError(f"Segment {self.number} colour must be 0..255 RGB, got {self.color_rgb}")

    @property
    def is_empty(self) -> bool:
        return not bool(self.mask.any())


@dataclass(frozen=True)
class Measurement:
    """A coded measurement, e.g. lung volume in mL; `segment` names the Segment number it describes."""

    concept: Code
    value: float
    unit: Code
    segment: int | None = None
    modifier: Code | None = None

    def __post_init__(self) -> None:
        if not np.isfinite(self.value):
            raise ValueError(f"Measurement {self.concept.meaning!r} is not a finite number: {self.value}")


@dataclass(frozen=True, eq=False)
class Findings:
    """What a pipeline found on a volume: segments, measurements and the slices worth a picture."""

    pipeline: str
    version: str
    shape: tuple[int, int, int]
    segments: tuple[Segment, ...] = ()
    measurements: tuple[Measurement, ...] = ()
    key_slices: tuple[int, ...] = ()
    notes: tuple[str, ...] = ()
    summary_label: str = "Whole volume"  # what measurements of no segment describe, e.g. "Both lungs"

    def __post_init__(self) -> None:
        if not self.pipeline or not self.version:
            raise ValueError("Findings need the pipeline name and version")
        if not self.summary_label.strip():
            raise ValueError("Findings.summary_label must not be empty")
        object.__setattr__(self, "segments", tuple(self.segments))
        object.__setattr__(self, "measurements", tuple(self.measurements))
        object.__setattr__(self, "key_slices", tuple(int(k) for k in self.key_slices))
        numbers = [s.number for s in self.segments]
        if len(set(numbers)) != len(numbers):
            raise ValueError(f"Findings segment numbers must be unique, got {numbers}")
        for segment in self.segments:
            if segment.mask.shape != tuple(self.shape):
                raise GeometryError(
                    f"Segment {segment.number} ({segment.label}) mask shape {segment.mask.shape} "
                    f"does not match the volume shape {tuple(self.shape)}"
                )
        for m in self.measurements:
            if m.segment is not None and m.segment not in numbers:
                raise ValueError(f"Measurement {m.concept.meaning!r} refers to unknown segment {m.segment}")
        for k in self.key_slices:
            if not 0 <= k < self.shape[0]:
                raise GeometryError(f"Key slice {k} is outside the volume's {self.shape[0]} slices")

    def segment(self, number: int) -> Segment:
        for s in self.segments:
            if s.number == number:
                return s
        raise KeyError(f"no segment {number}")

    def measurements_for(self, number: int | None) -> Sequence[Measurement]:
        return [m for m in self.measurements if m.segment == number]
