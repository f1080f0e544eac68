"""Reference segmentations on a volume's grid: RTSTRUCT contours, DICOM SEG and NIfTI label maps.

`read_reference(path, volume)` reads the file, checks that it lies on (or, for RTSTRUCT contours,
in) the volume's grid and returns a `Reference`: the names and codes of its structures, and a mask
(bool, (z, y, x) like `Volume.voxels`) per structure on demand. Nothing is resampled: a reference
drawn on another grid is refused with a `GridMismatchError` that says how it differs.

RTSTRUCT rasterisation (docs/design.md, "validate"):

* contour points (LPS mm) go through the inverse of `Volume.affine` to continuous voxel indices;
* a contour belongs to the slice nearest to it along the slice axis, when all its points lie
  within half a slice step of that slice (else it is not parallel to the slices: refused); two
  contours of one structure on one slice must lie in the same plane (a reference drawn on finer
  slices than the series is refused, never merged);
* identical polygons (same points, any start point or direction) are kept once;
* the contours on a slice are combined with the even-odd rule (a contour inside another is a hole,
  disjoint contours add up), and a pixel belongs to the structure when its centre is inside;
  centres exactly on an edge follow a half-open rule (inside when the polygon lies towards higher
  row and column indices), so that shapes sharing an edge do not both claim it and the pixel count
  matches the polygon's area;
* a slice without a contour is empty; `ContourImageSequence` is checked against the geometry when
  it names one of the volume's images (a disagreement is a note), never relied on.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue

from dicom_io.types import Code, Volume

RTSTRUCT_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.481.3"
SEG_SOP_CLASSES = frozenset({"1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.66.7"})
NIFTI_SUFFIXES = (".nii", ".nii.gz")
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

PLANE_TOL_MM = 0.05
"""Two contours of one structure on one slice lie in the same plane when they are this close (mm)."""
GRID_TOL = 1e-2
"""How far (in voxels) a reference's grid may be from the volume's and still count as the same grid."""
_COSINE_TOL = 1e-3
_ROUND = 3  # indices kept to 1/1000 voxel: points written with few decimals on a pixel centre stay on it


class ReferenceInputError(ValueError):
    """A reference that cannot be used: unreadable, of an unknown kind, or without usable structures."""


class GridMismatchError(ReferenceInputError):
    """A reference that does not lie on the volume's grid (or frame of reference)."""


@dataclass(frozen=True)
class Structure:
    """One structure of a reference: its name (ROI name, segment label or label value) and codes."""

    name: str
    property_type: Code | None = None
    laterality: Code | None = None
    aliases: tuple[str, ...] = ()  # other names --map may use (a SEG segment's number)


@dataclass(frozen=True, eq=False)
class Reference:
    """A reference read onto a volume's grid; `mask(structure)` rasterises or reads one structure."""

    path: Path
    kind: str  # "RTSTRUCT", "SEG" or "NIFTI"
    structures: tuple[Structure, ...]
    _masks: Callable[[Structure], npt.NDArray[np.bool_]]
    notes: list[str] = field(default_factory=list)

    def mask(self, structure: Structure) -> npt.NDArray[np.bool_]:
        """The structure as a bool array (z, y, x) on the volume's grid."""
        return self._masks(structure)


def reference_kind(path: Path) -> str | None:
    """The kind of reference a file is (RTSTRUCT, SEG or NIFTI), None for any other file."""
    if path.name.lower().endswith(NIFTI_SUFFIXES):
        return "NIFTI"
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID", "Modality"])
    except (InvalidDicomError, OSError, ValueError, EOFError):
        return None
    sop_class = str(ds.get("SOPClassUID", ""))
    if sop_class == RTSTRUCT_SOP_CLASS or ds.get("Modality") == "RTSTRUCT":
        return "RTSTRUCT"
    if sop_class in SEG_SOP_CLASSES or ds.get("Modality") == "SEG":
        return "SEG"
    return None


def find_reference(case_dir: Path) -> Path:
    """The one reference file below `case_dir`: an RTSTRUCT or SEG, else a NIfTI label map.

    Raises ReferenceInputError when there is none, or more than one of the kind chosen.
    """
    found: dict[str, list[Path]] = {"DICOM": [], "NIFTI": []}
    for path in sorted(p for p in case_dir.rglob("*") if p.is_file()):
        kind = reference_kind(path)
        if kind is not None:
            found["NIFTI" if kind == "NIFTI" else "DICOM"].append(path)
    for candidates in (found["DICOM"], found["NIFTI"]):
        if len(candidates) == 1:
            return candidates[0]
        if candidates:
            names = ", ".join(str(p.relative_to(case_dir)) for p in candidates)
            raise ReferenceInputError(f"{case_dir}: several references ({names}); name one with --reference")
    raise ReferenceInputError(
        f"{case_dir}: no reference found (an RTSTRUCT, a DICOM SEG or a .nii/.nii.gz label map); "
        "name one with --reference"
    )


def read_reference(path: Path, volume: Volume) -> Reference:
    """Read an RTSTRUCT, DICOM SEG or NIfTI label map for `volume`.

    Raises ReferenceInputError (unreadable, not a reference, no structure) or GridMismatchError.
    """
    kind = reference_kind(path) if path.is_file() else None
    if kind is None:
        raise ReferenceInputError(f"{path}: not a readable RTSTRUCT, DICOM SEG or NIfTI label map")
    if kind == "NIFTI":
        return _read_nifti(path, volume)
    try:
        ds = pydicom.dcmread(path)
    except (InvalidDicomError, OSError, ValueError, EOFError) as err:
        raise ReferenceInputError(f"{path}: cannot read it: {err}") from err
    _check_frame_of_reference(path, ds, volume)
    return _read_rtstruct(path, ds, volume) if kind == "RTSTRUCT" else _read_seg(path, ds, volume)


def _check_frame_of_reference(path: Path, ds: Dataset, volume: Volume) -> None:
    ours = str(volume.attributes.get("FrameOfReferenceUID", ""))
    theirs = {str(ds.get("FrameOfReferenceUID", ""))}
    theirs |= {
        str(item.get("FrameOfReferenceUID", "")) for item in ds.get("ReferencedFrameOfReferenceSequence", [])
    }
    theirs.discard("")
    if ours and theirs and ours not in theirs:
        raise GridMismatchError(
            f"{path}: the reference is in frame of reference {sorted(theirs)[0]}, the series in {ours}"
        )


def _code(item: Dataset | None) -> Code | None:
    if item is None or not item.get("CodeValue", item.get("LongCodeValue")):
        return None
    value = str(item.get("CodeValue") or item.get("LongCodeValue"))
    meaning = str(item.get("CodeMeaning") or value)
    return Code(value, str(item.get("CodingSchemeDesignator") or "?"), meaning)


def _first(ds: Dataset | None, keyword: str) -> Dataset | None:
    items = ds.get(keyword) if ds is not None else None
    return items[0] if items else None


# --- RTSTRUCT -----------------------------------------------------------------------------------


def _read_rtstruct(path: Path, ds: Dataset, volume: Volume) -> Reference:
    names = {
        int(r.ROINumber): str(r.get("ROIName") or f"ROI {r.ROINumber}")
        for r in ds.get("StructureSetROISequence", [])
    }
    codes: dict[int, Code | None] = {}
    for obs in ds.get("RTROIObservationsSequence", []):
        codes[int(obs.ReferencedROINumber)] = _code(_first(obs, "RTROIIdentificationCodeSequence"))
    contours: dict[str, list[Dataset]] = {}
    for roi in ds.get("ROIContourSequence", []):
        number = int(roi.ReferencedROINumber)
        closed = [
            c for c in roi.get("ContourSequence", []) if c.get("ContourGeometricType") == "CLOSED_PLANAR"
        ]
        if closed and number in names:
            contours[names[number]] = closed
    if not contours:
        raise ReferenceInputError(f"{path}: the RTSTRUCT has no closed planar contours")
    by_name = {name: number for number, name in names.items()}
    structures = tuple(
        Structure(name, property_type=codes.get(by_name[name])) for name in names.values() if name in contours
    )
    notes: list[str] = []
    slice_of = {ref.sop_instance_uid: k for k, ref in enumerate(volume.sources)}

    def masks(structure: Structure) -> npt.NDArray[np.bool_]:
        return rasterise_contours(
            [_contour_points(c) for c in contours[structure.name]],
            volume,
            name=structure.name,
            referenced_slices=[_referenced_slice(c, slice_of) for c in contours[structure.name]],
            notes=notes,
        )

    return Reference(path, "RTSTRUCT", structures, masks, notes)


def _contour_points(contour: Dataset) -> npt.NDArray[np.float64]:
    return np.asarray(contour.ContourData, dtype=np.float64).reshape(-1, 3)


def _referenced_slice(contour: Dataset, slice_of: dict[str, int]) -> int | None:
    for item in contour.get("ContourImageSequence", []):
        k = slice_of.get(str(item.get("ReferencedSOPInstanceUID", "")))
        if k is not None:
            return k
    return None


def rasterise_contours(
    polygons: Sequence[npt.NDArray[np.float64]],
    volume: Volume,
    *,
    name: str = "structure",
    referenced_slices: Sequence[int | None] | None = None,
    notes: list[str] | None = None,
) -> npt.NDArray[np.bool_]:
    """Closed planar contours (each an (N, 3) array of LPS mm points) as a mask on the volume's grid.

    The rule is the module's (slice by position, duplicates once, even-odd, pixel centres).
    `referenced_slices` (the slice each contour's ContourImageSequence names, or None) is only
    checked; a disagreement with the geometry, and contours outside the volume, go to `notes`.
    Raises GridMismatchError for a contour not parallel to the slices, or two planes on one slice.
    """
    notes = notes if notes is not None else []
    depth, rows, columns = volume.shape
    to_index = np.linalg.inv(volume.affine)
    per_slice: dict[int, dict[tuple[float, ...], npt.NDArray[np.float64]]] = {}
    planes: dict[int, list[float]] = {}
    outside = disagree = 0
    refs = referenced_slices if referenced_slices is not None else [None] * len(polygons)
    for points, referenced in zip(polygons, refs, strict=True):
        if len(points) < 3:
            continue
        index = np.round(points @ to_index[:3, :3].T + to_index[:3, 3], _ROUND)
        k = round(float(index[:, 2].mean()))
        if np.abs(index[:, 2] - k).max() > 0.5:
            raise GridMismatchError(
                f"a contour of {name!r} is not parallel to the series' slices (it spans "
                f"{np.ptp(index[:, 2]) * volume.spacing[0]:.2f} mm along the slice axis)"
            )
        if not 0 <= k < depth:
            outside += 1
            continue
        if referenced is not None and referenced != k:
            disagree += 1
        plane = float(index[:, 2].mean()) * volume.spacing[0]
        if any(abs(plane - p) > PLANE_TOL_MM for p in planes.get(k, [])):
            raise GridMismatchError(
                f"contours of {name!r} lie on several planes within slice {k}: the reference was drawn "
                "on other slices than the series'"
            )
        planes.setdefault(k, []).append(plane)
        xy = index[:, :2]
        per_slice.setdefault(k, {}).setdefault(_polygon_key(xy), xy)
    if outside:
        notes.append(f"{name}: {outside} contour(s) lie outside the series' slices and were left out")
    if disagree:
        notes.append(f"{name}: {disagree} contour(s) name another image than the slice they lie on")
    mask = np.zeros((depth, rows, columns), dtype=bool)
    for k, unique in per_slice.items():
        mask[k] = even_odd_fill(list(unique.values()), (rows, columns))
    return mask


def _polygon_key(xy: npt.NDArray[np.float64]) -> tuple[float, ...]:
    """The same key for the same polygon whatever its start point, direction or closing point."""
    points = [tuple(p) for p in np.round(xy, 3).tolist()]
    if len(points) > 1 and points[0] == points[-1]:
        points.pop()
    candidates = []
    for seq in (points, points[::-1]):
        start = min(range(len(seq)), key=lambda i: seq[i])
        candidates.append(tuple(v for p in seq[start:] + seq[:start] for v in p))
    return min(candidates)


def even_odd_fill(
    polygons: Iterable[npt.NDArray[np.float64]], shape: tuple[int, int]
) -> npt.NDArray[np.bool_]:
    """Pixels (row, column) whose centre is inside an odd number of the polygons' edges' crossings.

    Each polygon is an (N, 2) array of (column, row) vertex coordinates in pixel units (pixel
    centres at integers), implicitly closed. A horizontal line through each row's centres crosses
    the edges; a centre is inside when an odd number of crossings lie at or left of it (half-open
    rule: an edge at exactly a centre's row counts from its lower end up to, not including, its
    upper end). All polygons share one count, so together they follow the even-odd rule.
    """
    rows, columns = shape
    toggles = np.zeros((rows, columns + 1), dtype=np.int32)
    for xy in polygons:
        x0, y0 = xy[:, 0], xy[:, 1]
        x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
        low, high = np.minimum(y0, y1), np.maximum(y0, y1)
        first = np.clip(np.ceil(low), 0, rows).astype(int)  # rows r with low <= r < high
        last = np.clip(np.ceil(high), 0, rows).astype(int)
        counts = last - first
        if not counts.sum():
            continue
        edge = np.repeat(np.arange(len(x0)), counts)
        r = np.repeat(first, counts) + (
            np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
        )
        x = x0[edge] + (r - y0[edge]) * (x1[edge] - x0[edge]) / (y1[edge] - y0[edge])
        column = np.clip(np.ceil(np.round(x, _ROUND)), 0, columns).astype(int)
        np.add.at(toggles, (r, column), 1)
    return (np.cumsum(toggles[:, :columns], axis=1) % 2).astype(bool)


# --- SEG ----------------------------------------------------------------------------------------


def _read_seg(path: Path, ds: Dataset, volume: Volume) -> Reference:
    seg_type = str(ds.get("SegmentationType", "BINARY"))
    structures: list[Structure] = []
    for item in ds.get("SegmentSequence", []):
        property_type = _first(item, "SegmentedPropertyTypeCodeSequence")
        laterality = _code(_first(property_type, "SegmentedPropertyTypeModifierCodeSequence")) or _code(
            _first(_first(item, "AnatomicRegionSequence"), "AnatomicRegionModifierSequence")
        )
        number = int(item.SegmentNumber)
        structures.append(
            Structure(
                str(item.get("SegmentLabel") or f"Segment {number}"),
                property_type=_code(property_type),
                laterality=laterality,
                aliases=(str(number),),
            )
        )
    if not structures:
        raise ReferenceInputError(f"{path}: the SEG has no segments")
    try:
        frames = np.asarray(ds.pixel_array)
    except Exception as err:  # pydicom raises many kinds for unusable pixel data
        raise ReferenceInputError(f"{path}: cannot decode the SEG's pixel data: {err}") from err
    frames = frames.reshape(-1, *frames.shape[-2:])
    slices = _seg_slices(path, ds, volume, len(frames))
    shared = _first(ds, "SharedFunctionalGroupsSequence")
    per_frame = list(ds.get("PerFrameFunctionalGroupsSequence", []))
    threshold = float(ds.get("MaximumFractionalValue", 1)) / 2.0 if seg_type == "FRACTIONAL" else 0.0

    def segment_of(i: int) -> int | None:
        item = _first(per_frame[i] if i < len(per_frame) else None, "SegmentIdentificationSequence")
        item = item or _first(shared, "SegmentIdentificationSequence")
        return int(item.ReferencedSegmentNumber) if item is not None else None

    def masks(structure: Structure) -> npt.NDArray[np.bool_]:
        number = int(structure.aliases[0])
        mask = np.zeros(volume.shape, dtype=bool)
        for i, k in enumerate(slices):
            if seg_type == "LABELMAP":
                mask[k] |= frames[i] == number
            elif segment_of(i) == number:
                mask[k] |= frames[i] > threshold
        return mask

    return Reference(path, "SEG", tuple(structures), masks)


def _seg_slices(path: Path, ds: Dataset, volume: Volume, count: int) -> list[int]:
    """The volume slice of each SEG frame: by its source image's UID, else by its position."""
    if (int(ds.Rows), int(ds.Columns)) != volume.shape[1:]:
        raise GridMismatchError(
            f"{path}: SEG frames are {ds.Rows}x{ds.Columns} pixels, "
            f"the series' images {volume.shape[1]}x{volume.shape[2]}"
        )
    shared = _first(ds, "SharedFunctionalGroupsSequence")
    per_frame = list(ds.get("PerFrameFunctionalGroupsSequence", []))
    slice_of = {(ref.sop_instance_uid, ref.frame or 1): k for k, ref in enumerate(volume.sources)}
    to_index = np.linalg.inv(volume.affine)
    out: list[int] = []
    for i in range(count):
        groups = per_frame[i] if i < len(per_frame) else Dataset()

        def attribute(sequence: str, keyword: str, groups: Dataset = groups) -> Any:
            item = _first(groups, sequence) or _first(shared, sequence)
            return item.get(keyword) if item is not None else None

        orientation = attribute("PlaneOrientationSequence", "ImageOrientationPatient")
        spacing = attribute("PixelMeasuresSequence", "PixelSpacing")
        if orientation is not None and spacing is not None:
            axes = (
                np.asarray(orientation, dtype=float).reshape(2, 3)
                * np.asarray(spacing, dtype=float)[::-1, None]
            )
            if not np.allclose(axes, volume.affine[:3, :2].T, atol=_COSINE_TOL):
                raise GridMismatchError(f"{path}: SEG frame {i + 1} has another orientation or pixel spacing")
        k = _source_slice(groups, slice_of)
        position = attribute("PlanePositionSequence", "ImagePositionPatient")
        if position is not None:
            index = to_index[:3, :3] @ np.asarray(position, dtype=float) + to_index[:3, 3]
            if np.abs(index[:2]).max() > GRID_TOL or abs(index[2] - round(index[2])) > GRID_TOL:
                raise GridMismatchError(
                    f"{path}: SEG frame {i + 1} does not lie on a pixel grid of the series"
                )
            if k is not None and k != round(float(index[2])):
                raise GridMismatchError(f"{path}: SEG frame {i + 1} lies elsewhere than its source image")
            k = round(float(index[2]))
        if k is None:
            raise ReferenceInputError(f"{path}: SEG frame {i + 1} has neither a source image nor a position")
        if not 0 <= k < volume.shape[0]:
            raise GridMismatchError(f"{path}: SEG frame {i + 1} lies outside the series' slices")
        out.append(k)
    return out


def _source_slice(groups: Dataset, slice_of: dict[tuple[str, int], int]) -> int | None:
    for derivation in groups.get("DerivationImageSequence", []):
        for source in derivation.get("SourceImageSequence", []):
            frame = source.get("ReferencedFrameNumber")
            number = int(frame[0]) if isinstance(frame, MultiValue | list) else int(frame or 1)
            key = (str(source.get("ReferencedSOPInstanceUID", "")), number)
            if key in slice_of:
                return slice_of[key]
    return None


# --- NIfTI --------------------------------------------------------------------------------------


def _read_nifti(path: Path, volume: Volume) -> Reference:
    import nibabel as nib  # only here: reading DICOM needs no NIfTI support

    try:
        image: Any = nib.load(path)
        data = np.asarray(image.dataobj)
    except Exception as err:  # nibabel raises many kinds for unreadable files
        raise ReferenceInputError(f"{path}: cannot read the NIfTI file: {err}") from err
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise ReferenceInputError(f"{path}: a label map must be 3-D, this one is {data.shape}")
    labels = on_volume_grid(data, np.asarray(image.affine, dtype=float), volume, path)
    if np.issubdtype(labels.dtype, np.floating):
        if not np.array_equal(labels, np.round(labels)):
            raise ReferenceInputError(f"{path}: a label map must hold integer label values")
        labels = labels.astype(np.int64)
    values = [int(v) for v in np.unique(labels) if v != 0]
    if not values:
        raise ReferenceInputError(f"{path}: the label map is empty (no label other than 0)")
    structures = tuple(Structure(str(v)) for v in values)
    return Reference(path, "NIFTI", structures, lambda s: labels == int(s.name))


def on_volume_grid(
    data: npt.NDArray[Any], affine_ras: npt.NDArray[np.float64], volume: Volume, path: Path
) -> npt.NDArray[Any]:
    """NIfTI voxels (i, j, k) with a RAS affine as an array (z, y, x) on the volume's grid.

    The two grids must be the same up to axis order and direction. Raises GridMismatchError.
    """
    mapping = np.linalg.inv(affine_ras) @ LPS_TO_RAS @ volume.affine  # our (x, y, z) -> their (i, j, k)
    permutation = np.rint(mapping[:3, :3])
    ours = np.asarray(volume.shape[::-1])  # (x, y, z) sizes
    if (
        not np.allclose(mapping[:3, :3], permutation, atol=GRID_TOL)
        or sorted(np.abs(permutation).sum(axis=0)) != [1, 1, 1]
        or sorted(np.abs(permutation).sum(axis=1)) != [1, 1, 1]
    ):
        raise GridMismatchError(
            f"{path}: the label map's voxels are not the series' voxels (spacing or orientation)"
        )
    axis_of = [int(np.flatnonzero(permutation[:, c])[0]) for c in range(3)]  # their axis for our x, y, z
    sign = [int(permutation[axis_of[c], c]) for c in range(3)]
    theirs = [data.shape[axis_of[c]] for c in range(3)]
    expected_offset = [0 if sign[c] > 0 else ours[c] - 1 for c in range(3)]
    if theirs != list(ours) or not np.allclose(
        [mapping[axis_of[c], 3] for c in range(3)], expected_offset, atol=GRID_TOL * 10
    ):
        raise GridMismatchError(
            f"{path}: the label map's grid ({'x'.join(map(str, data.shape))}) does not cover the series' "
            f"({'x'.join(map(str, volume.shape[::-1]))} voxels) at the same place"
        )
    flipped = np.flip(data, axis=tuple(axis_of[c] for c in range(3) if sign[c] < 0))
    return np.ascontiguousarray(np.transpose(flipped, (axis_of[2], axis_of[1], axis_of[0])))
