"""What SEG, SR and SC share: options, the error type, and the checked mapping of mask slices to sources.

Everything a result object needs from the source series is checked here once, before anything is
built, so that findings that do not fit their source fail with one clear `ResultError` and never with
a half-written result set.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from dicom_io.results.header import Header, ResultError, read_header, valid_uid
from dicom_io.results.prior import Prior
from dicom_io.selection import RESULT_MANUFACTURER, RESULT_MODEL_NAME
from dicom_io.types import Code, Findings, Segment, Volume

# DCM 123110 "Artificial Intelligence" from CID 7162 (Surface Processing Algorithm Families);
# 123109 is "Manual Processing", not AI.
ARTIFICIAL_INTELLIGENCE = Code("123110", "DCM", "Artificial Intelligence")

REPORT_CARD = "Report card"
"""The report card's ImageComments: the one SC whose pixels show a date (the day it was made)."""

# Positions may be rounded to DS precision by the loader or the modality: allow this much (mm).
_POSITION_TOLERANCE_MM = 0.05
_DIRECTION_TOLERANCE = 1e-3
_UID_NAMESPACE = uuid.UUID("5d1c0c36-8a59-4d59-9a3e-2f4f3c6f1a10")  # radgate's, for name-based UIDs


def _software_version() -> str:
    """The installed radgate version, so every object says which node build made it."""
    try:
        return importlib.metadata.version("radgate")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


@dataclass(frozen=True)
class ResultOptions:
    """How results are encoded; the defaults suit a node with no configuration.

    series_number_base: SEG gets this series number, SR +1, SC +2, KOS +3. None means the
        largest series number among the given source datasets plus 1000 (never one of theirs).
    uid_seed: UIDs are derived from it (plus the pipeline, version and source instances), so
        encoding the same input twice gives the same UIDs and no duplicates in the archive.
        None derives them from the sources alone.
    prior: a prior study's result: the SR reports each measurement's change since then and lists
        the prior's SR as evidence (`dicom_io.results.prior`).
    comparison_note: why there is no comparison, when one was asked for (the SR says it).
    """

    algorithm_name: str | None = None
    algorithm_version: str | None = None
    algorithm_family: Code = ARTIFICIAL_INTELLIGENCE
    segmentation_type: Literal["BINARY", "LABELMAP"] = "BINARY"
    device_uid: str | None = None
    manufacturer: str = RESULT_MANUFACTURER
    model_name: str = RESULT_MODEL_NAME
    serial_number: str = "1"
    software_version: str = _software_version()
    series_number_base: int | None = None
    series_description_prefix: str = "radgate"
    write_sc: bool = True
    write_kos: bool = False
    max_key_images: int = 3
    uid_seed: str | None = None
    uid_prefix: str | None = None
    prior: Prior | None = None
    comparison_note: str | None = None

    def __post_init__(self) -> None:
        if self.segmentation_type not in ("BINARY", "LABELMAP"):
            raise ValueError(f"segmentation_type must be BINARY or LABELMAP, got {self.segmentation_type!r}")
        if self.series_number_base is not None and not 1 <= self.series_number_base <= 2**31 - 8:
            raise ValueError(f"series_number_base out of range: {self.series_number_base}")
        if self.max_key_images < 1:
            raise ValueError(f"max_key_images must be >= 1, got {self.max_key_images}")


@dataclass(frozen=True)
class Context:
    """Everything the builders need, checked: sources in slice order, identity, numbering, time."""

    findings: Findings
    volume: Volume
    options: ResultOptions
    header: Header  # the checked patient/study attributes of the first source
    slice_sources: tuple[Dataset, ...]  # slice_sources[k] holds mask slice k (the first: header.stand_in)
    frames: tuple[int | None, ...]  # frame (1-based) of slice_sources[k] for multi-frame sources
    algorithm_name: str
    algorithm_version: str
    series_number_base: int
    device_uid: str
    content_date: str
    content_time: str
    uid_entropy: tuple[str, ...]
    _cache: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def first_source(self) -> Dataset:
        return self.slice_sources[0]

    @property
    def frame_of_reference_uid(self) -> str:
        return str(self.first_source.FrameOfReferenceUID)

    @property
    def source_instances(self) -> list[Dataset]:
        """The distinct source instances, in slice order (one item for a multi-frame source)."""
        return list({str(ds.SOPInstanceUID): ds for ds in self.slice_sources}.values())

    def uid(self, role: str) -> str:
        """A UID for one object or item, stable for the same input (see `ResultOptions.uid_seed`)."""
        return stable_uid([*self.uid_entropy, role], self.options.uid_prefix)

    def series_description(self, kind: str) -> str:
        return f"{self.options.series_description_prefix} {self.findings.pipeline} {kind}"[:64]

    def stamp(self, ds: Dataset, kind: str) -> None:
        """Set what every result object carries: patient/study, description, equipment, software, time.

        Patient and study come from `header` (checked and repaired, logged once per object), as
        UTF-8 (ISO_IR 192), which holds any name the source's character set held.
        """
        self.header.write(ds)
        ds.SeriesDescription = self.series_description(kind)
        ds.Manufacturer = self.options.manufacturer
        ds.ManufacturerModelName = self.options.model_name
        ds.DeviceSerialNumber = self.options.serial_number
        ds.SoftwareVersions = [
            self.options.software_version,
            f"{self.algorithm_name} {self.algorithm_version}",
        ]
        ds.ContentDate = self.content_date
        ds.ContentTime = self.content_time

    def non_empty_segments(self) -> list[Segment]:
        return [
            s for s in sorted(self.findings.segments, key=lambda s: s.number) if self.slice_counts(s).any()
        ]

    def slice_counts(self, segment: Segment) -> npt.NDArray[np.int64]:
        """Voxels of the segment in each slice, computed once, a plane at a time."""
        key = f"counts-{segment.number}"
        if key not in self._cache:
            self._cache[key] = np.array([np.count_nonzero(plane) for plane in segment.mask], dtype=np.int64)
        counts: npt.NDArray[np.int64] = self._cache[key]
        return counts

    def labels(self) -> tuple[npt.NDArray[np.uint8], bool]:
        """The non-empty segments as one label array (1..n in order) and whether any of them overlap.

        Overlapping voxels keep the later label, so fewer labelled voxels than segment voxels means overlap.
        """
        if "labels" not in self._cache:
            segments = self.non_empty_segments()
            labels = np.zeros(self.volume.shape, dtype=np.uint8)
            for index, segment in enumerate(segments, start=1):
                np.copyto(labels, np.uint8(index), where=segment.mask)
            total = sum(int(self.slice_counts(s).sum()) for s in segments)
            self._cache["labels"] = (labels, np.count_nonzero(labels) != total)
        result: tuple[npt.NDArray[np.uint8], bool] = self._cache["labels"]
        return result

    def voxel_to_patient(self, zyx: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        """(z, y, x) voxel index rows → LPS mm rows, through the volume affine (which takes x, y, z)."""
        xyz1 = np.c_[zyx[:, ::-1], np.ones(len(zyx))]
        return (self.volume.affine @ xyz1.T).T[:, :3]

    def image_point(self, z: int, point: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        """An LPS point in mm → (column, row) image coordinates of source slice z, as SCOORD holds them.

        Projected onto the slice's own plane (not the volume's axes), with (0, 0) the top left corner
        of the first pixel, so a reoriented volume still points at the right pixel.
        """
        position, orientation, spacing = _frame_geometry(self.slice_sources[z], self.frames[z])
        offset = point - np.asarray(position, dtype=np.float64)
        along_row, along_column = np.asarray(orientation[:3]), np.asarray(orientation[3:])
        return np.array(
            [offset @ along_row / float(spacing[1]) + 0.5, offset @ along_column / float(spacing[0]) + 0.5]
        )


def stable_uid(parts: Sequence[str], prefix: str | None = None) -> str:
    """The same UID for the same parts: a name-based UUID under 2.25, or a hash under `prefix`."""
    if prefix is None:
        return f"2.25.{uuid.uuid5(_UID_NAMESPACE, chr(31).join(parts)).int}"
    return str(generate_uid(prefix=prefix, entropy_srcs=list(parts)))


def _frame_geometry(ds: Dataset, frame: int | None) -> tuple[list[float], list[float], list[float]]:
    """(ImagePositionPatient, ImageOrientationPatient, PixelSpacing) of one source plane."""
    if frame is None:
        return list(ds.ImagePositionPatient), list(ds.ImageOrientationPatient), list(ds.PixelSpacing)
    shared = ds.get("SharedFunctionalGroupsSequence", [Dataset()])[0]
    per_frame = ds.PerFrameFunctionalGroupsSequence[frame - 1]

    def group(keyword: str) -> Dataset:
        for source in (per_frame, shared):
            if keyword in source:
                return source[keyword].value[0]
        raise ResultError(f"source {ds.SOPInstanceUID} frame {frame} has no {keyword}")

    return (
        list(group("PlanePositionSequence").ImagePositionPatient),
        list(group("PlaneOrientationSequence").ImageOrientationPatient),
        list(group("PixelMeasuresSequence").PixelSpacing),
    )


def _check_geometry(volume: Volume, sources: Sequence[Dataset], frames: Sequence[int | None]) -> None:
    """Every mask slice must lie exactly on the source plane it names: same grid, position, direction."""
    _, rows, columns = volume.shape
    affine = volume.affine
    row_dir = affine[:3, 0] / np.linalg.norm(affine[:3, 0])
    col_dir = affine[:3, 1] / np.linalg.norm(affine[:3, 1])
    expected_spacing = np.array([np.linalg.norm(affine[:3, 1]), np.linalg.norm(affine[:3, 0])])
    for k, (ds, frame) in enumerate(zip(sources, frames, strict=True)):
        where = f"slice {k} (source {ds.SOPInstanceUID}{f' frame {frame}' if frame else ''})"
        if (int(ds.Rows), int(ds.Columns)) != (rows, columns):
            raise ResultError(
                f"{where}: source grid {ds.Rows}x{ds.Columns} does not match the mask grid {rows}x{columns}"
            )
        position, orientation, spacing = _frame_geometry(ds, frame)
        expected_position = affine[:3, 3] + k * affine[:3, 2]
        if np.abs(np.asarray(position, dtype=float) - expected_position).max() > _POSITION_TOLERANCE_MM:
            raise ResultError(
                f"{where}: source position {position} is not the mask slice's {expected_position.round(3)}"
            )
        cosines = np.asarray(orientation, dtype=float)
        if (
            np.abs(cosines[:3] - row_dir).max() > _DIRECTION_TOLERANCE
            or np.abs(cosines[3:] - col_dir).max() > _DIRECTION_TOLERANCE
        ):
            raise ResultError(f"{where}: source orientation {orientation} is not the mask grid's")
        if np.abs(np.asarray(spacing, dtype=float) - expected_spacing).max() > 1e-3 * max(expected_spacing):
            raise ResultError(f"{where}: source pixel spacing {spacing} is not the mask's {expected_spacing}")


def _source_map(volume: Volume, source_datasets: Sequence[Dataset]) -> tuple[list[Dataset], list[int | None]]:
    """Map each mask slice to its source dataset through `volume.sources`, never by list position."""
    by_uid = {str(ds.SOPInstanceUID): ds for ds in source_datasets}
    sources: list[Dataset] = []
    frames: list[int | None] = []
    for k, ref in enumerate(volume.sources):
        ds = by_uid.get(ref.sop_instance_uid) if ref.sop_instance_uid else None
        if ds is None:
            raise ResultError(
                f"slice {k}: source instance {ref.sop_instance_uid} is not among the datasets given"
            )
        if str(ds.SOPClassUID) != ref.sop_class_uid:
            raise ResultError(
                f"slice {k}: source {ref.sop_instance_uid} is a {ds.SOPClassUID}, not {ref.sop_class_uid}"
            )
        number_of_frames = int(ds.get("NumberOfFrames", 1) or 1)
        multi_frame = "PerFrameFunctionalGroupsSequence" in ds
        if multi_frame:
            if ref.frame is None or not 1 <= ref.frame <= number_of_frames:
                raise ResultError(
                    f"slice {k}: multi-frame source {ref.sop_instance_uid} needs frame 1..{number_of_frames}"
                )
            frames.append(ref.frame)
        else:
            if ref.frame not in (None, 1):
                raise ResultError(
                    f"slice {k}: single-frame source {ref.sop_instance_uid} has no frame {ref.frame}"
                )
            frames.append(None)
        sources.append(ds)
    series = {str(ds.SeriesInstanceUID) for ds in sources}
    if len(series) != 1:
        raise ResultError(
            f"the volume's sources come from {len(series)} series; a SEG must reference exactly one"
        )
    instances = {str(ds.SOPInstanceUID) for ds in sources}
    if any(f is not None for f in frames) and len(instances) != 1:
        raise ResultError("multi-frame sources must all be frames of one instance")
    if len(set(zip((str(ds.SOPInstanceUID) for ds in sources), frames, strict=True))) != len(sources):
        raise ResultError("two mask slices name the same source plane")
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
        if not sources[0].get(keyword):
            raise ResultError(f"the source series has no {keyword}: results could not reference it")
        if not valid_uid(str(sources[0][keyword].value)):
            raise ResultError(
                f"the source series' {keyword} is not a valid UID: results could not reference it"
            )
    for ds in {id(ds): ds for ds in sources}.values():
        for keyword in ("SOPClassUID", "SOPInstanceUID"):
            if not valid_uid(str(ds[keyword].value)):
                raise ResultError(f"a source's {keyword} is not a valid UID: results could not reference it")
    return sources, frames


def make_context(
    findings: Findings,
    volume: Volume,
    source_datasets: Sequence[Dataset],
    options: ResultOptions,
    now: _dt.datetime | None = None,
) -> Context:
    """Check findings against volume and sources and collect what every builder needs."""
    if tuple(findings.shape) != volume.shape:
        raise ResultError(f"findings shape {tuple(findings.shape)} is not the volume shape {volume.shape}")
    sources, frames = _source_map(volume, source_datasets)
    _check_geometry(volume, sources, frames)
    header = read_header(sources[0])
    stand_in = header.stand_in(sources[0])
    sources = [stand_in if ds is sources[0] else ds for ds in sources]
    existing = [int(ds.SeriesNumber) for ds in source_datasets if ds.get("SeriesNumber") not in (None, "")]
    base = options.series_number_base or (max(existing, default=0) + 1000)
    if options.series_number_base is not None and base in existing:
        raise ResultError(f"series number {base} collides with a source series")
    entropy = (
        options.uid_seed or "",
        findings.pipeline,
        findings.version,
        *(f"{ref.sop_instance_uid}/{ref.frame}" for ref in volume.sources),
    )
    now = now or _dt.datetime.now(_dt.UTC).astimezone()
    device_uid = options.device_uid or stable_uid(
        [options.manufacturer, options.model_name, options.serial_number], options.uid_prefix
    )
    ctx = Context(
        findings=findings,
        volume=volume,
        options=options,
        header=header,
        slice_sources=tuple(sources),
        frames=tuple(frames),
        algorithm_name=options.algorithm_name or findings.pipeline,
        algorithm_version=options.algorithm_version or findings.version,
        series_number_base=base,
        device_uid=device_uid,
        content_date=now.strftime("%Y%m%d"),
        content_time=now.strftime("%H%M%S"),
        uid_entropy=entropy,
    )
    if options.segmentation_type == "LABELMAP" and ctx.labels()[1]:
        raise ResultError("segments overlap, which a LABELMAP segmentation cannot encode; use BINARY")
    return ctx


def format_value(value: float, unit: Code) -> str:
    """A measurement as a radiologist reads it: 3 significant decimals at most, with its unit."""
    unit_text = {"cm3": "mL", "ml": "mL", "mm3": "mm³", "[hnsf'U]": "HU", "%": "%"}.get(
        unit.value, unit.value
    )
    text = f"{value:.1f}" if abs(value) >= 10 else f"{value:.3g}"
    return f"{text} {unit_text}"
