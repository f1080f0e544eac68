"""Group the instances of a study or series into stacks of parallel image planes a model can use.

A folder the node receives is messy: DICOMDIR files, SR/SEG/PR objects, localizers, several
series, echoes or time points sharing positions, enhanced multi-frame files. This module reads
only headers (pixel data is deferred, its file offset remembered for a fast native read later)
and splits the image planes into `Stack`s whose planes share orientation, matrix, pixel spacing
and image type. Everything left out is reported with a reason, never dropped silently.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from pydicom import Dataset, dcmread
from pydicom.dataelem import RawDataElement
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.valuerep import PersonName

log = logging.getLogger(__name__)

Source = str | Path | Dataset
"""A file path or an in-memory dataset (as received by the SCP)."""

POSITION_TOL_MM = 0.01
"""Two planes whose positions differ by less than this (mm) are at the same place."""

_COSINE_TOL = 1e-3
_SPACING_RTOL = 1e-3
_DEFER_BYTES = 1024
_PIXEL_DATA = 0x7FE00010
NATIVE_LITTLE_ENDIAN = frozenset({"1.2.840.10008.1.2", "1.2.840.10008.1.2.1"})
"""Transfer syntaxes whose pixel data the loader reads straight from the file (implicit/explicit VR LE)."""
_DICOMDIR_UID = "1.2.840.10008.1.3.10"
_NON_IMAGE_MODALITIES = frozenset(
    {"SEG", "SR", "PR", "KO", "DOC", "REG", "RWV", "RTSTRUCT", "RTPLAN", "RTDOSE", "RTRECORD", "FID", "PLAN"}
)
_FRAME_TYPE_GROUPS = ("MRImageFrameTypeSequence", "CTImageFrameTypeSequence")
_SPLIT_KEYS = ("EchoNumbers", "TemporalPositionIdentifier", "AcquisitionNumber", "StackID")
_SERIES_ATTRIBUTES = (
    "Modality",
    "BodyPartExamined",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "FrameOfReferenceUID",
    "SeriesDescription",
    "SeriesNumber",
    "Manufacturer",
    "ManufacturerModelName",
    "PatientPosition",
    "ImageType",
    "SliceThickness",
    "ConvolutionKernel",
    "KVP",
    "ContrastBolusAgent",
    "MagneticFieldStrength",
    "RepetitionTime",
    "EchoTime",
    "InversionTime",
    "FlipAngle",
    "ScanningSequence",
    "SequenceName",
    "ProtocolName",
    "PhotometricInterpretation",
    "RescaleType",
    "SOPClassUID",
)


class SeriesError(ValueError):
    """A series that cannot become a correct volume; the message names the series and the problem."""


class DecodeError(SeriesError):
    """Pixel data of one instance that cannot be decoded; the message names the SOP Instance UID."""


@dataclass(frozen=True, eq=False)
class Instance:
    """Header of one image instance, read once and shared by its frames.

    `pixel_offset` is the file offset of native (uncompressed) pixel data when the header pass
    deferred it, so the loader can read it with one seek instead of parsing the file again.
    """

    source: Path | Dataset
    header: Dataset
    sop_class_uid: str
    sop_instance_uid: str
    series_uid: str
    transfer_syntax: str
    rows: int
    columns: int
    bits_allocated: int
    bits_stored: int
    signed: bool
    number_of_frames: int
    pixel_offset: int | None

    @property
    def label(self) -> str:
        """What error messages name: the SOP Instance UID, never patient data."""
        return self.sop_instance_uid


@dataclass(frozen=True, eq=False)
class Frame:
    """One image plane: an instance (and 0-based frame index for multi-frame) with its geometry."""

    instance: Instance
    index: int | None
    position: npt.NDArray[np.float64]
    orientation: npt.NDArray[np.float64]
    pixel_spacing: tuple[float, float]
    slice_thickness: float | None
    slope: float
    intercept: float
    image_type: tuple[str, ...]
    split_values: tuple[Any, ...]

    @property
    def normal(self) -> npt.NDArray[np.float64]:
        """Slice normal n = row direction x column direction."""
        return np.cross(self.orientation[:3], self.orientation[3:])

    @property
    def label(self) -> str:
        if self.index is None:
            return self.instance.label
        return f"{self.instance.label} frame {self.index + 1}"


@dataclass(frozen=True, eq=False)
class Stack:
    """Planes of one series that share orientation, matrix, pixel spacing and image type (unsorted)."""

    series_uid: str
    frames: tuple[Frame, ...]

    def __len__(self) -> int:
        return len(self.frames)

    @property
    def label(self) -> str:
        """What messages name: the SeriesInstanceUID (or the first instance when it is empty)."""
        return self.series_uid or f"(no SeriesInstanceUID, instance {self.frames[0].instance.label})"


@dataclass(frozen=True)
class Excluded:
    """Something left out of every stack: `what` is a SOP Instance UID (or a file name if none)."""

    what: str
    reason: str


@dataclass(frozen=True)
class Grouping:
    """The stacks found in a set of instances and what was left out, with reasons."""

    stacks: tuple[Stack, ...]
    excluded: tuple[Excluded, ...]


def group_series(sources: Source | Iterable[Source]) -> Grouping:
    """Read the headers of `sources` (files, directories, datasets) and split their image planes into stacks.

    Non-image objects, DICOMDIR, non-DICOM files, localizers, colour images, multi-frame
    objects without plane geometry and lone orthogonal slices go to `excluded`. Planes that share a
    position are split by echo, temporal position, acquisition number or stack ID when that tells
    them apart; otherwise they stay together and the loader resolves or rejects them.
    Raises SeriesError when a file looks like DICOM but its header cannot be parsed.
    """
    excluded: list[Excluded] = []
    frames: list[Frame] = []
    seen: set[str] = set()
    for source in _expand(sources):
        result = _read_instance(source)
        if isinstance(result, Excluded):
            excluded.append(result)
            continue
        if result.sop_instance_uid in seen:
            excluded.append(Excluded(result.sop_instance_uid, "same SOP Instance UID given twice"))
            continue
        seen.add(result.sop_instance_uid)
        planes = _frames_of(result)
        if isinstance(planes, Excluded):
            excluded.append(planes)
        else:
            frames.extend(planes)
    stacks: list[Stack] = []
    for series_uid, series_frames in _group_by(frames, lambda f: f.instance.series_uid):
        for similar in _cluster(series_frames):
            stacks.extend(Stack(series_uid, tuple(part)) for part in _split_duplicates(similar, _SPLIT_KEYS))
    stacks, lone = _drop_lone_orthogonal(stacks)
    excluded.extend(lone)
    for item in excluded:
        log.info("left out %s: %s", item.what, item.reason)
    return Grouping(tuple(sorted(stacks, key=len, reverse=True)), tuple(excluded))


def main_stack(grouping: Grouping) -> Stack:
    """The stack with the most planes (the first found on a tie); SeriesError if there is none."""
    if not grouping.stacks:
        reasons = "; ".join(f"{e.what}: {e.reason}" for e in grouping.excluded[:5])
        raise SeriesError(f"no image stack found ({len(grouping.excluded)} left out: {reasons})")
    return max(grouping.stacks, key=len)


def plain(value: Any) -> Any:
    """A DICOM value as a plain Python value (str, int, float, tuple); None for person names."""
    if isinstance(value, PersonName):
        return None
    if isinstance(value, MultiValue | list | tuple):
        return tuple(plain(v) for v in value)
    if isinstance(value, float | int) and not isinstance(value, bool):
        return float(value) if isinstance(value, float) else int(value)
    if isinstance(value, bytes | Dataset) or value is None:
        return None
    return str(value)


def series_attributes(header: Dataset) -> dict[str, Any]:
    """The series attributes a pipeline may need, as plain values (absent ones left out)."""
    out: dict[str, Any] = {}
    for keyword in _SERIES_ATTRIBUTES:
        value = plain(header.get(keyword))
        if value not in (None, "", ()):
            out[keyword] = value
    return out


def _expand(sources: Source | Iterable[Source]) -> Iterator[Path | Dataset]:
    """Sources with directories replaced by the files below them (sorted, recursive)."""
    for source in [sources] if isinstance(sources, str | Path | Dataset) else sources:
        if isinstance(source, Dataset):
            yield source
        elif Path(source).is_dir():
            yield from sorted(p for p in Path(source).rglob("*") if p.is_file())
        else:
            yield Path(source)


def _read_instance(source: Path | Dataset) -> Instance | Excluded:
    """Read one header; Excluded for things that are not image instances."""
    if isinstance(source, Dataset):
        ds, name = source, str(source.get("SOPInstanceUID", "dataset"))
    else:
        path = source
        name = path.name
        if name.upper() == "DICOMDIR":
            return Excluded(name, "DICOMDIR (media directory, not an image)")
        try:
            ds = dcmread(path, defer_size=_DEFER_BYTES)
        except InvalidDicomError:
            forced = _read_without_preamble(path)
            if forced is None:
                return Excluded(name, "not a DICOM file")
            ds = forced
        except Exception as exc:  # pydicom raises many types on a corrupt header
            raise SeriesError(f"cannot parse the DICOM header of file {name}: {type(exc).__name__}") from exc
    meta = getattr(ds, "file_meta", None)
    sop_class = str(ds.get("SOPClassUID", "") or (meta.get("MediaStorageSOPClassUID", "") if meta else ""))
    uid = str(ds.get("SOPInstanceUID", "") or (meta.get("MediaStorageSOPInstanceUID", "") if meta else ""))
    what = uid or name
    if sop_class == _DICOMDIR_UID or "DirectoryRecordSequence" in ds:
        return Excluded(what, "DICOMDIR (media directory, not an image)")
    modality = str(ds.get("Modality", "")).upper()
    if modality in _NON_IMAGE_MODALITIES:
        return Excluded(what, f"non-image object (Modality {modality})")
    if _PIXEL_DATA not in ds:
        return Excluded(what, "no pixel data")
    if "SeriesInstanceUID" not in ds or not uid:
        return Excluded(what, "no Series or SOP Instance UID")
    try:
        if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
            return Excluded(what, f"colour image (SamplesPerPixel {ds.SamplesPerPixel})")
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        rows, columns = int(ds.Rows), int(ds.Columns)
        bits_allocated = int(ds.BitsAllocated)
        bits_stored = int(ds.get("BitsStored", bits_allocated) or bits_allocated)
        signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
    except (AttributeError, TypeError, ValueError) as exc:
        raise SeriesError(f"instance {uid}: invalid image pixel module ({exc})") from exc
    syntax = (str(meta.get("TransferSyntaxUID", "")) if meta else "") or "1.2.840.10008.1.2"
    offset = (
        _deferred_offset(ds) if not isinstance(source, Dataset) and syntax in NATIVE_LITTLE_ENDIAN else None
    )
    return Instance(
        source=source,
        header=ds,
        sop_class_uid=sop_class,
        sop_instance_uid=uid,
        series_uid=str(ds.SeriesInstanceUID),
        transfer_syntax=syntax,
        rows=rows,
        columns=columns,
        bits_allocated=bits_allocated,
        bits_stored=bits_stored,
        signed=signed,
        number_of_frames=frames,
        pixel_offset=offset,
    )


def _read_without_preamble(path: Path) -> Dataset | None:
    """A dataset written without preamble and file meta (old ACR-NEMA style), or None if not DICOM."""
    try:
        ds = dcmread(path, force=True, defer_size=_DEFER_BYTES)
    except Exception:  # anything unparseable here is simply not DICOM
        return None
    return ds if "SOPInstanceUID" in ds and "SOPClassUID" in ds else None


def _deferred_offset(ds: Dataset) -> int | None:
    """File offset of the pixel data value if the header pass deferred it (large native data)."""
    if _PIXEL_DATA not in ds:
        return None
    elem = ds.get_item(_PIXEL_DATA, keep_deferred=True)
    if isinstance(elem, RawDataElement) and elem.value is None and elem.length != 0xFFFFFFFF:
        return int(elem.value_tell)
    return None


def _frames_of(inst: Instance) -> list[Frame] | Excluded:
    """The image planes of an instance with their geometry, or why it has none usable."""
    ds = inst.header
    image_type = _image_type(ds.get("ImageType"))
    if "LOCALIZER" in image_type:
        return Excluded(inst.label, "localizer (ImageType LOCALIZER)")
    try:
        if "PerFrameFunctionalGroupsSequence" in ds:
            return _enhanced_frames(inst, image_type)
        if inst.number_of_frames != 1:
            return Excluded(inst.label, "multi-frame object without per-frame plane geometry")
        if "ImagePositionPatient" not in ds or "ImageOrientationPatient" not in ds:
            return Excluded(inst.label, "no plane geometry (ImagePositionPatient/ImageOrientationPatient)")
        split = tuple(plain(ds.get(k)) for k in _SPLIT_KEYS)
        return [_frame(inst, None, ds, ds, ds, ds, image_type, split)]
    except (AttributeError, TypeError, ValueError, IndexError, KeyError) as exc:
        raise SeriesError(f"instance {inst.label}: invalid plane geometry ({exc})") from exc


def _image_type(value: Any) -> tuple[str, ...]:
    """ImageType/FrameType as upper-case strings, whether it holds one value or several."""
    value = plain(value)
    if value in (None, ""):
        return ()
    return tuple(str(v).upper() for v in (value if isinstance(value, tuple) else (value,)))


def _enhanced_frames(inst: Instance, image_type: tuple[str, ...]) -> list[Frame] | Excluded:
    """Planes of an enhanced (or legacy converted enhanced) multi-frame instance.

    Each functional group is looked up in the frame's own item first, then in the shared one. A
    frame's FrameType stands in for ImageType, so mixed frames (magnitude and phase) form separate stacks.
    """
    ds = inst.header
    per_frame = ds.PerFrameFunctionalGroupsSequence
    if len(per_frame) != inst.number_of_frames:
        raise SeriesError(
            f"instance {inst.label}: {len(per_frame)} per-frame items for {inst.number_of_frames} frames"
        )
    shared = ds.SharedFunctionalGroupsSequence[0] if ds.get("SharedFunctionalGroupsSequence") else Dataset()
    frames = []
    for index, item in enumerate(per_frame):

        def group(name: str, item: Dataset = item) -> Dataset:
            for holder in (item, shared):
                if holder.get(name):
                    return holder[name].value[0]
            return Dataset()

        position, orientation = group("PlanePositionSequence"), group("PlaneOrientationSequence")
        if "ImagePositionPatient" not in position or "ImageOrientationPatient" not in orientation:
            return Excluded(inst.label, f"frame {index + 1} has no plane position or orientation")
        content, echo = group("FrameContentSequence"), group("MREchoSequence")
        types = (_image_type(group(name).get("FrameType")) for name in _FRAME_TYPE_GROUPS)
        frame_type = next((t for t in types if t), image_type)
        split = (
            plain(echo.get("EffectiveEchoTime")),
            plain(content.get("TemporalPositionIndex")),
            plain(content.get("FrameAcquisitionNumber")),
            plain(content.get("StackID")),
        )
        frames.append(
            _frame(
                inst,
                index,
                position,
                orientation,
                group("PixelMeasuresSequence"),
                group("PixelValueTransformationSequence"),
                frame_type,
                split,
            )
        )
    return frames


def _frame(
    inst: Instance,
    index: int | None,
    position: Dataset,
    orientation: Dataset,
    measures: Dataset,
    transform: Dataset,
    image_type: tuple[str, ...],
    split: tuple[Any, ...],
) -> Frame:
    spacing = measures.get("PixelSpacing") or inst.header.get("ImagerPixelSpacing") or (1.0, 1.0)
    thickness = measures.get("SliceThickness")
    cosines = np.asarray([float(v) for v in orientation.ImageOrientationPatient], dtype=np.float64)
    origin = np.asarray([float(v) for v in position.ImagePositionPatient], dtype=np.float64)
    if cosines.shape != (6,) or origin.shape != (3,):
        raise ValueError(f"{cosines.size} orientation and {origin.size} position values (want 6 and 3)")
    cosines[:3] /= np.linalg.norm(cosines[:3]) or np.nan
    cosines[3:] /= np.linalg.norm(cosines[3:]) or np.nan
    if not np.linalg.norm(np.cross(cosines[:3], cosines[3:])) > 0.9:  # also catches NaN
        raise ValueError("row and column directions are zero or not perpendicular")
    if not min(float(spacing[0]), float(spacing[1])) > 0:
        raise ValueError("pixel spacing must be positive")
    slope = transform.get("RescaleSlope")
    intercept = transform.get("RescaleIntercept")
    return Frame(
        instance=inst,
        index=index,
        position=origin,
        orientation=cosines,
        pixel_spacing=(float(spacing[0]), float(spacing[1])),
        slice_thickness=float(thickness) if thickness not in (None, "") else None,
        slope=float(slope) if slope not in (None, "") else 1.0,
        intercept=float(intercept) if intercept not in (None, "") else 0.0,
        image_type=image_type,
        split_values=split,
    )


def _group_by(items: Sequence[Frame], key: Callable[[Frame], Any]) -> list[tuple[Any, list[Frame]]]:
    """Group by a hashable key, keeping the order in which keys are first seen."""
    groups: dict[Any, list[Frame]] = {}
    for item in items:
        groups.setdefault(key(item), []).append(item)
    return list(groups.items())


def _cluster(frames: Sequence[Frame]) -> list[list[Frame]]:
    """Split planes where orientation, matrix, pixel spacing or image type differ (with tolerances)."""
    clusters: list[list[Frame]] = []
    for frame in frames:
        for cluster in clusters:
            ref = cluster[0]
            if (
                ref.instance.rows == frame.instance.rows
                and ref.instance.columns == frame.instance.columns
                and ref.image_type == frame.image_type
                and np.allclose(ref.orientation, frame.orientation, atol=_COSINE_TOL, rtol=0)
                and np.allclose(ref.pixel_spacing, frame.pixel_spacing, rtol=_SPACING_RTOL, atol=0)
            ):
                cluster.append(frame)
                break
        else:
            clusters.append([frame])
    return clusters


def _has_duplicates(frames: Sequence[Frame]) -> bool:
    along = np.sort([float(f.position @ frames[0].normal) for f in frames])
    return bool(np.any(np.diff(along) < POSITION_TOL_MM))


def _split_duplicates(frames: list[Frame], keys: Sequence[str]) -> list[list[Frame]]:
    """Split planes sharing positions by the first key (echo, time, acquisition, stack) that differs."""
    if len(frames) < 2 or not keys or not _has_duplicates(frames):
        return [frames]
    slot = _SPLIT_KEYS.index(keys[0])
    parts = _group_by(frames, lambda f: f.split_values[slot])
    if len(parts) == 1:
        return _split_duplicates(frames, keys[1:])
    return [piece for _, part in parts for piece in _split_duplicates(part, keys[1:])]


def _drop_lone_orthogonal(stacks: list[Stack]) -> tuple[list[Stack], list[Excluded]]:
    """Leave out single-plane stacks not parallel to a bigger stack of the same series (localizers)."""
    kept: list[Stack] = []
    lone: list[Excluded] = []
    for stack in stacks:
        bigger = [s for s in stacks if s.series_uid == stack.series_uid and len(s) > 1]
        if len(stack) == 1 and bigger:
            normal = stack.frames[0].normal
            if all(abs(float(normal @ s.frames[0].normal)) < 1 - _COSINE_TOL for s in bigger):
                lone.append(
                    Excluded(stack.frames[0].label, "single slice not parallel to the series (localizer)")
                )
                continue
        kept.append(stack)
    return kept, lone
