"""Series → `Volume`: sorted, checked, decoded voxels in modality units with an exact LPS affine.

Conventions (other modules rely on them):

* voxels are indexed (z, y, x) = (slice, row, column); slices are sorted ASCENDING along the slice
  normal n = row direction × column direction, never by InstanceNumber.
* affine maps (x, y, z, 1) → LPS mm. Column 2 is the actual step between consecutive slice
  positions. For a gantry-tilted series that step is not parallel to n: we keep the sheared grid
  and put the true step in the affine (exact, no resampling, no interpolated HU); the tilt angle is
  in `attributes["SliceTiltDeg"]` for pipelines that need an orthogonal grid and resample.
* voxel dtype: int16 when every plane's rescale slope and intercept are integers and the header's
  BitsStored/PixelRepresentation prove that every rescaled value fits int16 (typical CT, 12-bit MR);
  float32 otherwise (float32 holds integers up to 2**24 exactly). The choice depends on headers
  only, never on pixel values, so one series always gives one dtype.
* errors: `SeriesError` (a ValueError) names the SeriesInstanceUID and the problem; `DecodeError`
  (a SeriesError) names the SOP Instance UID whose pixel data cannot be decoded.

Native little-endian pixel data is read with one seek + `np.fromfile` per plane straight from the
offset the header pass remembered. Compressed planes are decoded by pydicom/pylibjpeg in a process
pool ("fork": workers start at once and need no `__main__` guard in the caller; they run only
pydicom and the codecs), not threads: the decoders hold the GIL (docs/design.md, "Jobs and pipelines").
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
from pydicom import Dataset, dcmread
from pydicom.pixels import pixel_array

from dicom_io.series import (
    NATIVE_LITTLE_ENDIAN,
    POSITION_TOL_MM,
    DecodeError,
    Excluded,
    Frame,
    Grouping,
    Instance,
    SeriesError,
    Source,
    Stack,
    group_series,
    main_stack,
    series_attributes,
)
from dicom_io.types import SourceRef, Volume

if TYPE_CHECKING:
    from monai.data import MetaTensor

__all__ = [
    "DecodeError",
    "Excluded",
    "Grouping",
    "SeriesError",
    "Stack",
    "group_series",
    "load_series",
    "load_stack",
    "main_stack",
    "to_metatensor",
]

log = logging.getLogger(__name__)

GAP_FACTOR = 1.5
"""A step larger than this times the median slice spacing is a missing slice."""
SPACING_TOLERANCE = 0.02
"""Default relative tolerance on each slice position versus the regular grid (of the slice step)."""
SPACING_ATOL_MM = 0.02
"""Absolute floor of that tolerance, for positions written with few decimals."""
TILT_TOL_DEG = 0.01
_PARALLEL_MIN_PLANES = 4
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass(frozen=True)
class _Slot:
    """One output slice: a decoded plane, or (with allow_gaps) a blend of two neighbours."""

    frame: Frame
    lower: int = -1
    upper: int = -1
    weight: float = 0.0


@dataclass(frozen=True, eq=False)
class _Layout:
    slots: tuple[_Slot, ...]
    duplicates: tuple[tuple[int, Frame], ...]  # (output slice of the plane kept, the duplicate plane)
    affine: npt.NDArray[np.float64]
    tilt_deg: float


def load_series(
    sources: Source | Iterable[Source],
    *,
    allow_gaps: bool = False,
    spacing_tolerance: float = SPACING_TOLERANCE,
    workers: int | None = None,
) -> Volume:
    """Load the main stack (most planes) of the instances in `sources` (files, directories, datasets)."""
    return load_stack(
        main_stack(group_series(sources)),
        allow_gaps=allow_gaps,
        spacing_tolerance=spacing_tolerance,
        workers=workers,
    )


def load_stack(
    stack: Stack,
    *,
    allow_gaps: bool = False,
    spacing_tolerance: float = SPACING_TOLERANCE,
    workers: int | None = None,
) -> Volume:
    """Sort, check and decode one stack into a Volume.

    allow_gaps: fill missing slices by linear interpolation between their neighbours instead of
        raising (their `sources` entry is the nearest real plane; indices in
        `attributes["InterpolatedSlices"]`).
    spacing_tolerance: how far (relative to the slice step) a position may be off the regular grid.
    workers: processes for compressed decoding (default: the CPUs this process may use).
    Raises SeriesError (gaps, uneven spacing, different pixels at one position) or DecodeError.
    """
    layout = _layout(stack, allow_gaps, spacing_tolerance)
    out_index = [k for k, slot in enumerate(layout.slots) if slot.lower < 0]
    interpolated = [k for k, slot in enumerate(layout.slots) if slot.lower >= 0]
    real = [layout.slots[k].frame for k in out_index]
    dtype = np.float32 if interpolated else _voxel_dtype(real)
    first = stack.frames[0].instance
    voxels = np.empty((len(layout.slots), first.rows, first.columns), dtype=dtype)
    needed = real + [frame for _, frame in layout.duplicates]
    for position, plane in _decode(needed, stack.label, workers):
        if position < len(real):
            _rescale(plane, needed[position], voxels[out_index[position]])
        else:
            kept, frame = layout.duplicates[position - len(real)]
            _check_duplicate(stack.label, voxels[kept], plane, frame, layout.slots[kept].frame)
    for k in interpolated:
        slot = layout.slots[k]
        voxels[k] = (1 - slot.weight) * voxels[slot.lower] + slot.weight * voxels[slot.upper]
    attributes = series_attributes(first.header)
    attributes["SliceTiltDeg"] = layout.tilt_deg
    if interpolated:
        attributes["InterpolatedSlices"] = tuple(interpolated)
    return Volume(voxels, layout.affine, tuple(_ref(slot.frame) for slot in layout.slots), attributes)


def ras_image(volume: Volume) -> tuple[npt.NDArray[Any], npt.NDArray[np.float64]]:
    """The volume as NIfTI and MONAI readers give an image: voxels (x, y, z) and a RAS affine.

    The voxels are transposed (z, y, x) → (x, y, z) (a view of a contiguous array, no copy) and the
    affine becomes diag(-1, -1, 1, 1) @ affine with its columns unchanged (they already map x, y, z).
    A label map on that grid goes back to the Volume grid with `.transpose(2, 1, 0)`.
    """
    # a flipped view has negative strides, which torch.from_numpy refuses; contiguous arrays are not copied
    return np.ascontiguousarray(volume.voxels).transpose(2, 1, 0), _LPS_TO_RAS @ volume.affine


def to_metatensor(volume: Volume) -> MetaTensor:
    """The volume as a MONAI MetaTensor: channel-first (1, x, y, z) with a RAS affine (`ras_image`).

    To bring a (1, x, y, z) model output back to the Volume grid: `array[0].transpose(2, 1, 0)`.
    meta["space"] is "RAS", which MONAI's Orientation/Spacing read when given labels=None.
    """
    import torch
    from monai.data import MetaTensor

    voxels, ras = ras_image(volume)
    affine = torch.as_tensor(ras, dtype=torch.float64)
    data = torch.from_numpy(voxels[None])
    meta = {
        "original_affine": affine.clone(),
        "spatial_shape": np.asarray(data.shape[1:]),
        "space": "RAS",
        "original_channel_dim": "no_channel",
        "filename_or_obj": str(volume.attributes.get("SeriesInstanceUID", "")),
    }
    return MetaTensor(data, affine=affine, meta=meta)


def _layout(stack: Stack, allow_gaps: bool, tolerance: float) -> _Layout:
    """Sort planes along the normal, set aside duplicates, check gaps and spacing, build the affine."""
    uid = stack.label
    normal = stack.frames[0].normal
    ordered = sorted(stack.frames, key=lambda f: float(f.position @ normal))
    unique: list[Frame] = [ordered[0]]
    duplicates: list[tuple[int, Frame]] = []
    for frame in ordered[1:]:
        if float((frame.position - unique[-1].position) @ normal) < POSITION_TOL_MM:
            duplicates.append((len(unique) - 1, frame))
        else:
            unique.append(frame)
    first = unique[0]
    columns = first.orientation[:3] * first.pixel_spacing[1]
    rows = first.orientation[3:] * first.pixel_spacing[0]
    if len(unique) == 1:
        step = normal * (first.slice_thickness or 1.0)
        return _Layout((_Slot(first),), tuple(duplicates), _affine(columns, rows, step, first.position), 0.0)
    along = np.asarray([float(f.position @ normal) for f in unique])
    gaps = np.diff(along)
    median = float(np.median(gaps))
    counts = np.ones(len(gaps), dtype=int)
    for k in np.flatnonzero(gaps > GAP_FACTOR * median):
        if not allow_gaps:
            raise SeriesError(
                f"series {uid}: missing slice(s) between sorted slices {k} and {k + 1} "
                f"({along[k]:.2f} → {along[k + 1]:.2f} mm along the normal, {gaps[k]:.2f} mm "
                f"where the median spacing is {median:.2f} mm)"
            )
        counts[k] = round(gaps[k] / median)
    grid = np.concatenate([[0], np.cumsum(counts)])
    positions = np.stack([f.position for f in unique])
    step = (positions[-1] - positions[0]) / grid[-1]
    off_grid = np.linalg.norm(positions - (positions[0] + np.outer(grid, step)), axis=1)
    limit = max(SPACING_ATOL_MM, tolerance * float(np.linalg.norm(step)))
    worst = int(np.argmax(off_grid))
    if off_grid[worst] > limit:
        raise SeriesError(
            f"series {uid}: non-uniform slice spacing: sorted slice {worst} lies {off_grid[worst]:.3f} mm "
            f"off the regular grid of step {np.linalg.norm(step):.3f} mm (tolerance {limit:.3f} mm)"
        )
    cosine = float(step @ normal) / float(np.linalg.norm(step))
    tilt = float(np.degrees(np.arccos(min(1.0, cosine))))
    if tilt > TILT_TOL_DEG:
        log.info("series %s: slice step tilted %.2f° from the normal; sheared affine kept", uid, tilt)
    else:
        tilt = 0.0
    slots = _slots(unique, grid)
    real_slot = [k for k, slot in enumerate(slots) if slot.lower < 0]
    moved = tuple((real_slot[kept], frame) for kept, frame in duplicates)
    return _Layout(slots, moved, _affine(columns, rows, step, positions[0]), tilt)


def _slots(unique: Sequence[Frame], grid: npt.NDArray[Any]) -> tuple[_Slot, ...]:
    """Output slices on the regular grid; missing ones blend the decoded neighbours."""
    slots: list[_Slot] = []
    for k, frame in enumerate(unique):
        if k:
            lower, missing = len(slots) - 1, int(grid[k] - grid[k - 1]) - 1
            for m in range(1, missing + 1):
                weight = m / (missing + 1)
                near = frame if weight > 0.5 else unique[k - 1]
                slots.append(_Slot(near, lower, lower + missing + 1, weight))
        slots.append(_Slot(frame))
    return tuple(slots)


def _affine(
    columns: npt.NDArray[np.float64],
    rows: npt.NDArray[np.float64],
    step: npt.NDArray[np.float64],
    origin: npt.NDArray[np.float64],
) -> npt.NDArray[np.float64]:
    affine = np.eye(4)
    affine[:3, 0], affine[:3, 1], affine[:3, 2], affine[:3, 3] = columns, rows, step, origin
    return affine


def _voxel_dtype(frames: Sequence[Frame]) -> type[np.int16] | type[np.float32]:
    """int16 when the headers prove every rescaled value is an integer in int16 range."""
    for frame in frames:
        inst = frame.instance
        if not (float(frame.slope).is_integer() and float(frame.intercept).is_integer()):
            return np.float32
        bits = inst.bits_stored
        lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if inst.signed else (0, 2**bits - 1)
        ends = (lo * frame.slope + frame.intercept, hi * frame.slope + frame.intercept)
        if min(ends) < -32768 or max(ends) > 32767:
            return np.float32
    return np.int16


def _rescale(plane: npt.NDArray[Any], frame: Frame, out: npt.NDArray[Any]) -> None:
    """Stored values → modality units, written into the output slice without a full-size temporary.

    int16 output is proven in range by `_voxel_dtype`, so the in-place add cannot overflow; only a
    slope other than 1 goes through int32, where stored × slope may leave int16 before the intercept.
    """
    if out.dtype == np.int16 and frame.slope != 1.0:
        np.add(plane.astype(np.int32) * int(frame.slope), int(frame.intercept), out=out, casting="unsafe")
        return
    if frame.slope == 1.0:
        out[...] = plane
    else:
        np.multiply(plane, np.float32(frame.slope), out=out, dtype=np.float32)
    if frame.intercept:
        out += out.dtype.type(frame.intercept)


def _check_duplicate(
    uid: str, kept: npt.NDArray[Any], plane: npt.NDArray[Any], dup: Frame, ref: Frame
) -> None:
    """Drop a plane identical to the one kept at its position; refuse one that differs."""
    rescaled = np.empty_like(kept)
    _rescale(plane, dup, rescaled)
    if not np.array_equal(rescaled, kept):
        raise SeriesError(
            f"series {uid}: {ref.label} and {dup.label} share a slice position but differ in pixel data "
            f"and no echo, temporal position, acquisition number or stack ID tells them apart"
        )
    log.info("series %s: dropped %s, identical duplicate of %s", uid, dup.label, ref.label)


def _ref(frame: Frame) -> SourceRef:
    inst = frame.instance
    return SourceRef(
        inst.sop_class_uid, inst.sop_instance_uid, None if frame.index is None else frame.index + 1
    )


def _decode(frames: Sequence[Frame], uid: str, workers: int | None) -> Iterator[tuple[int, npt.NDArray[Any]]]:
    """(position in `frames`, stored-value plane) for every frame; compressed ones in parallel."""
    native = [k for k, f in enumerate(frames) if _is_native(f.instance)]
    for k in native:
        yield from _checked(frames, [k], uid, partial(_read_native, frames[k]))
    pending = len(frames) - len(native)
    if not pending:
        return
    count = min(workers or len(os.sched_getaffinity(0)), pending)
    if multiprocessing.current_process().daemon:
        count = 1  # a multiprocessing.Pool worker may not start processes of its own
    if count < 2 or pending < _PARALLEL_MIN_PLANES:
        for chunk in _chunks(frames, set(native), pending):
            yield from _checked(frames, chunk, uid, partial(_decode_planes, *_task(frames, chunk)))
        return
    chunks = _chunks(frames, set(native), -(-pending // count))
    context = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(count, mp_context=context) as pool:
        futures = [(chunk, pool.submit(_decode_planes, *_task(frames, chunk))) for chunk in chunks]
        for chunk, future in futures:
            yield from _checked(frames, chunk, uid, future.result)


def _is_native(inst: Instance) -> bool:
    return inst.transfer_syntax in NATIVE_LITTLE_ENDIAN and inst.bits_allocated in (8, 16, 32)


def _chunks(frames: Sequence[Frame], skip: set[int], most: int) -> list[list[int]]:
    """Frames to decode elsewhere, grouped by instance so a file is parsed once per chunk.

    A multi-frame instance is cut into chunks of at most `most` frames so its frames, too, are
    shared between the worker processes.
    """
    by_instance: dict[int, list[int]] = {}
    for k, frame in enumerate(frames):
        if k not in skip:
            by_instance.setdefault(id(frame.instance), []).append(k)
    return [ks[i : i + most] for ks in by_instance.values() for i in range(0, len(ks), most)]


def _task(frames: Sequence[Frame], chunk: Sequence[int]) -> tuple[Path | Dataset, list[int | None]]:
    return frames[chunk[0]].instance.source, [frames[k].index for k in chunk]


def _decode_planes(source: Path | Dataset, indices: Sequence[int | None]) -> list[npt.NDArray[Any]]:
    """Decode frames of one instance with pydicom (runs in a worker process for compressed data)."""
    ds = source if isinstance(source, Dataset) else dcmread(source)
    return [pixel_array(ds, index=index) for index in indices]


def _read_native(frame: Frame) -> list[npt.NDArray[Any]]:
    """One plane of native little-endian pixel data: one seek and one read, or a view of the bytes."""
    inst = frame.instance
    dtype = np.dtype(f"<{'i' if inst.signed else 'u'}{inst.bits_allocated // 8}")
    count = inst.rows * inst.columns
    start = (frame.index or 0) * count * dtype.itemsize
    if inst.pixel_offset is not None and isinstance(inst.source, Path):
        with inst.source.open("rb") as handle:
            handle.seek(inst.pixel_offset + start)
            flat = np.fromfile(handle, dtype=dtype, count=count)
    else:
        flat = np.frombuffer(inst.header.PixelData, dtype=dtype, count=count, offset=start)
    if flat.size != count:
        raise ValueError(f"pixel data is truncated ({flat.size} of {count} values)")
    return [flat.reshape(inst.rows, inst.columns)]


def _checked(
    frames: Sequence[Frame], chunk: Sequence[int], uid: str, decode: Callable[[], list[npt.NDArray[Any]]]
) -> Iterator[tuple[int, npt.NDArray[Any]]]:
    """Planes of one chunk with their shape checked; any decoder failure becomes a DecodeError."""
    try:
        planes = decode()
    except Exception as exc:  # numpy, pydicom and the codecs raise many types on short or corrupt data
        raise _decode_error(uid, frames[chunk[0]], exc) from exc
    for k, plane in zip(chunk, planes, strict=True):
        expected = (frames[k].instance.rows, frames[k].instance.columns)
        if plane.shape != expected:
            raise DecodeError(
                f"series {uid}: {frames[k].label} decoded to shape {plane.shape}, expected {expected}"
            )
        yield k, plane


def _decode_error(uid: str, frame: Frame, exc: Exception) -> DecodeError:
    return DecodeError(
        f"series {uid}: cannot decode pixel data of {frame.label} "
        f"(transfer syntax {frame.instance.transfer_syntax}): {type(exc).__name__}: {exc}"
    )
