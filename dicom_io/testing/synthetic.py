"""Synthetic studies with known ground truth, for tests, benchmarks and the demo.

Real patient data cannot carry an exact answer; these phantoms do. Anatomy is defined once in
patient space (DICOM LPS, millimetres: +x patient left, +y posterior, +z head) and then sampled at
the centre of every voxel of the requested grid, so any orientation, spacing, slice order or
gantry tilt shows the same patient and the truth masks are exact on that grid (no partial volume).

    ct_chest_phantom(rows=128, columns=128, slices=60, pixel_spacing=None, slice_spacing=None,
                     orientation="axial", reverse_order=False, gantry_tilt_deg=0.0,
                     transfer_syntax=ExplicitVRLittleEndian, seed=0, study_uid=None, ...) -> SyntheticSeries
    mr_head_phantom(... same options except gantry_tilt_deg ...) -> SyntheticSeries

Geometry options:
    pixel_spacing: (row spacing, column spacing) in mm, DICOM PixelSpacing order. None fits the
        whole body (CT, 400 mm field of view) or head (MR, 240 mm) in the larger matrix side.
    slice_spacing: table step between slices in mm. None covers 300 mm (CT) or 220 mm (MR).
    orientation: "axial", "sagittal", "coronal", "oblique" (axial turned 20 degrees about the
        left-right axis and 10 degrees about the head-foot axis) or 6 direction cosines (row, column).
    reverse_order: InstanceNumber runs against the slice position (1 = the last slice along n).
    gantry_tilt_deg (CT): the image planes are turned by this angle about the row direction while
        the table still steps along the untilted slice normal, as on a tilted gantry. Slice
        positions then shift along the column direction by step*sin(tilt) per slice; the grid is
        sheared and the affine's column 2 is the table step, not perpendicular to the planes.
        Voxels and truth are sampled on that sheared grid, so the affine maps them exactly.

SyntheticSeries:
    datasets: one pydicom Dataset per slice with file meta, ready to save; datasets[k] is voxels[k]
        (with reverse_order only InstanceNumber runs the other way).
    voxels: (z, y, x) in modality units (HU for CT, int16; raw signal for MR, uint16), z ascending
        along the slice normal n = row direction x column direction.
    truth: bool masks (z, y, x) on the same grid. CT: "body", "lung_left", "lung_right",
        "emphysema", "bone", "trachea"; MR: "head", "brain". Masks of one series never overlap
        except "body"/"head", which hold everything inside the skin.
    affine: 4x4, (x=column, y=row, z=slice index) -> LPS mm, as dicom_io.types.Volume.
    analytic_ml: exact volume of each closed shape in mL (the truth count matches it to sampling
        error when the shape lies wholly inside the grid).
    write(directory) -> list[Path]

CT truth definitions: the lungs are two ellipsoids (right lung larger, on patient right = -x), each
with parenchyma at -850 HU; the emphysema is a sphere inside the right lung at -980 HU and is
included in "lung_right". The noise is bounded to +/-5 HU, so "emphysema" equals exactly the voxels
below -950 HU inside the lungs, and every lung voxel is below -500 HU while the body wall is above.
"bone" is the vertebral body plus the sternum; "trachea" is the air column in the midline above the
lungs' centre. Body, spine and trachea are open-ended along z: the grid cuts them.

MR truth: "head" is everything inside the scalp; "brain" is grey + white matter + the two lateral
ventricles (what skull stripping keeps), inside CSF, skull and scalp shells. Noise is 0..16.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    UID,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)
from pydicom.valuerep import format_number_as_ds

Orientation = str | Sequence[float]
FloatArray = npt.NDArray[np.float64]

_NATIVE_SYNTAXES = {ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian}
_NOISE_HU = 5
_SLAB_VOXELS = 1 << 22


def _rotation(axis: int, degrees: float) -> FloatArray:
    """Right-handed rotation matrix about one patient axis."""
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    i, j = [a for a in range(3) if a != axis]
    r = np.eye(3)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


_OBLIQUE = _rotation(2, 10.0) @ _rotation(0, 20.0)
_ORIENTATIONS: dict[str, tuple[float, ...]] = {
    "axial": (1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
    "sagittal": (0.0, 1.0, 0.0, 0.0, 0.0, -1.0),
    "coronal": (1.0, 0.0, 0.0, 0.0, 0.0, -1.0),
    "oblique": (*_OBLIQUE[:, 0], *_OBLIQUE[:, 1]),
}


@dataclass(frozen=True)
class _Grid:
    """Where every voxel centre lies: per-slice positions plus in-plane directions and spacings."""

    rows: int
    columns: int
    row_dir: FloatArray
    col_dir: FloatArray
    row_spacing: float
    col_spacing: float
    step: FloatArray  # table step between slices (not perpendicular to the planes under tilt)
    positions: FloatArray  # (slices, 3): ImagePositionPatient of each slice, ascending along n

    @property
    def affine(self) -> FloatArray:
        a = np.eye(4)
        a[:3, 0] = self.row_dir * self.col_spacing
        a[:3, 1] = self.col_dir * self.row_spacing
        a[:3, 2] = self.step
        a[:3, 3] = self.positions[0]
        return a

    @property
    def normal(self) -> FloatArray:
        return np.cross(self.row_dir, self.col_dir)


def _cosines(orientation: Orientation) -> tuple[FloatArray, FloatArray]:
    """Row and column direction unit vectors for a named or explicit orientation."""
    if isinstance(orientation, str):
        if orientation not in _ORIENTATIONS:
            raise ValueError(
                f"orientation must be one of {sorted(_ORIENTATIONS)} or 6 cosines, got {orientation!r}"
            )
        values = _ORIENTATIONS[orientation]
    else:
        values = tuple(float(v) for v in orientation)
        if len(values) != 6:
            raise ValueError(f"orientation needs 6 direction cosines, got {len(values)}")
    row, col = np.array(values[:3]), np.array(values[3:])
    if min(np.linalg.norm(row), np.linalg.norm(col)) < 1e-6:
        raise ValueError(f"orientation cosines must not be zero vectors: {values}")
    row, col = row / np.linalg.norm(row), col / np.linalg.norm(col)
    if abs(float(row @ col)) > 1e-4:
        raise ValueError(f"row and column directions must be perpendicular: {values}")
    return row, col


def _make_grid(
    rows: int,
    columns: int,
    slices: int,
    pixel_spacing: tuple[float, float],
    slice_spacing: float,
    orientation: Orientation,
    tilt_deg: float,
    centre: FloatArray,
) -> _Grid:
    """A grid centred on the phantom; tilt turns the planes about the row direction, not the step."""
    if min(rows, columns, slices) < 1:
        raise ValueError(f"rows, columns and slices must be >= 1, got {rows}, {columns}, {slices}")
    if min(*pixel_spacing, slice_spacing) <= 0:
        raise ValueError(f"spacings must be positive, got {pixel_spacing} and {slice_spacing}")
    if abs(tilt_deg) >= 60:
        raise ValueError(f"gantry tilt must be within +/-60 degrees, got {tilt_deg}")
    row, col0 = _cosines(orientation)
    table = np.cross(row, col0)
    t = np.radians(tilt_deg)
    col = np.cos(t) * col0 + np.sin(t) * table
    row_spacing, col_spacing = float(pixel_spacing[0]), float(pixel_spacing[1])
    step = table * slice_spacing
    first = (
        centre
        - row * col_spacing * (columns - 1) / 2
        - col * row_spacing * (rows - 1) / 2
        - step * (slices - 1) / 2
    )
    positions = first + np.arange(slices)[:, None] * step
    return _Grid(rows, columns, row, col, row_spacing, col_spacing, step, positions)


# ----------------------------------------------------------------------------- anatomy


@dataclass(frozen=True)
class _Quadric:
    """Solid sum_a w_a (p_a - c_a)^2 <= 1, cut to z_range: an ellipsoid, or a head-foot cylinder (w_z = 0).

    Restricting shapes to axis-aligned quadrics lets the test on a grid split into per-row and
    per-column terms (plus one cross term for oblique grids), which keeps big grids fast.
    """

    centre: tuple[float, float, float]
    weights: tuple[float, float, float]
    z_range: tuple[float, float] = (-np.inf, np.inf)

    def bounds(self) -> tuple[FloatArray, FloatArray]:
        """Axis-aligned box around the shape (infinite along a cylinder's free axis)."""
        c, w = np.array(self.centre), np.array(self.weights)
        half = np.full(3, np.inf)
        half[w > 0] = 1.0 / np.sqrt(w[w > 0])
        lo, hi = c - half, c + half
        lo[2], hi[2] = max(lo[2], self.z_range[0]), min(hi[2], self.z_range[1])
        return lo, hi

    def inside(
        self, d: FloatArray, u: FloatArray, v: FloatArray, i: FloatArray, j: FloatArray
    ) -> npt.NDArray[np.bool_]:
        """Mask (k, i, j) for points d[k] - centre + j*u + i*v (d: (K, 3) slice positions)."""
        w = np.array(self.weights)
        d = d - np.array(self.centre)
        dd, ud, vd = (d * d * w).sum(1), (d * u * w).sum(1), (d * v * w).sum(1)
        uu, vv, uv = float((u * u * w).sum()), float((v * v * w).sum()), float((u * v * w).sum())
        row = (dd[:, None] + 2 * vd[:, None] * i + vv * i**2).astype(np.float32)
        col = (2 * ud[:, None] * j + uu * j**2).astype(np.float32)
        f = row[:, :, None] + col[:, None, :]
        if abs(uv) > 1e-12:
            f += (2 * uv * np.outer(i, j)).astype(np.float32)
        mask = f <= 1.0
        if np.isfinite(self.z_range).any():
            z = (d[:, 2, None] + v[2] * i)[:, :, None] + (u[2] * j)[None, None, :]
            mask &= (z >= self.z_range[0]) & (z <= self.z_range[1])
        return mask


def _ellipsoid(centre: Sequence[float], semi: Sequence[float]) -> _Quadric:
    """Solid ellipsoid with axes along x, y, z."""
    cx, cy, cz = centre
    a, b, c = semi
    return _Quadric((cx, cy, cz), (a**-2, b**-2, c**-2))


def _elliptic_cylinder(
    centre: Sequence[float], semi: Sequence[float], z_range: tuple[float, float] = (-np.inf, np.inf)
) -> _Quadric:
    """Elliptic cylinder along z (head-foot), optionally cut to a z range relative to the anatomy centre."""
    (cx, cy), (a, b) = centre, semi
    return _Quadric((cx, cy, 0.0), (a**-2, b**-2, 0.0), z_range)


@dataclass(frozen=True)
class _Tissue:
    name: str
    value: int
    shape: _Quadric


def _index_box(grid: _Grid, centre: FloatArray, shape: _Quadric) -> tuple[slice, slice, slice] | None:
    """Slices (k, i, j) of the grid that can hold the shape, or None when it misses the grid."""
    n = len(grid.positions)
    axes = np.column_stack([grid.step, grid.col_dir * grid.row_spacing, grid.row_dir * grid.col_spacing])
    extent = np.array([n - 1, grid.rows - 1, grid.columns - 1], dtype=np.float64)
    corners = np.array(np.meshgrid(*[[0.0, e] for e in extent], indexing="ij")).reshape(3, -1).T
    grid_pts = grid.positions[0] - centre + corners @ axes.T
    lo, hi = shape.bounds()
    lo, hi = np.maximum(lo, grid_pts.min(0)), np.minimum(hi, grid_pts.max(0))
    if (lo > hi).any():
        return None
    box = np.array(np.meshgrid(*zip(lo, hi, strict=True), indexing="ij")).reshape(3, -1).T
    idx = np.linalg.solve(axes, (box - (grid.positions[0] - centre)).T).T
    first = np.clip(np.floor(idx.min(0)), 0, extent).astype(int)
    last = np.clip(np.ceil(idx.max(0)), 0, extent).astype(int)
    return slice(first[0], last[0] + 1), slice(first[1], last[1] + 1), slice(first[2], last[2] + 1)


@dataclass(frozen=True)
class _Anatomy:
    """Tissues painted in order (later wins) over a background, and truth as sets of tissue names."""

    centre: FloatArray
    background: int
    tissues: tuple[_Tissue, ...]
    truth: dict[str, frozenset[str]]
    analytic_ml: dict[str, float]

    def sample(self, grid: _Grid) -> tuple[npt.NDArray[np.int16], dict[str, npt.NDArray[np.bool_]]]:
        """Tissue values and truth at every voxel centre, each shape only inside its bounding box."""
        labels = np.zeros((len(grid.positions), grid.rows, grid.columns), dtype=np.uint8)
        u, v = grid.row_dir * grid.col_spacing, grid.col_dir * grid.row_spacing
        slab = max(1, _SLAB_VOXELS // (grid.rows * grid.columns))
        for index, tissue in enumerate(self.tissues, start=1):
            box = _index_box(grid, self.centre, tissue.shape)
            if box is None:
                continue
            ks, rs, cs = box
            i = np.arange(rs.start, rs.stop, dtype=np.float64)
            j = np.arange(cs.start, cs.stop, dtype=np.float64)
            for k0 in range(ks.start, ks.stop, slab):
                k1 = min(k0 + slab, ks.stop)
                inside = tissue.shape.inside(grid.positions[k0:k1] - self.centre, u, v, i, j)
                labels[k0:k1, rs, cs][inside] = index
        lut = np.array([self.background] + [t.value for t in self.tissues], dtype=np.int16)
        truth = {key: self._mask(labels, members) for key, members in self.truth.items()}
        return lut[labels], truth

    def _mask(self, labels: npt.NDArray[np.uint8], members: frozenset[str]) -> npt.NDArray[np.bool_]:
        """Voxels whose tissue is one of members (equality tests: far faster than a lookup on big grids)."""
        if members >= {t.name for t in self.tissues}:
            return labels != 0
        mask = np.zeros(labels.shape, dtype=bool)
        for index, tissue in enumerate(self.tissues, start=1):
            if tissue.name in members:
                mask |= labels == index
        return mask


def _ellipsoid_ml(semi: Sequence[float]) -> float:
    """Exact ellipsoid volume in mL from its semi-axes in mm."""
    return float(4.0 / 3.0 * np.pi * np.prod(semi) / 1000.0)


# Chest, relative to its centre: body 340 x 240 mm, lungs about 100-110 mm wide and 210-220 mm tall.
_LUNG_R = ((-75.0, 10.0, 0.0), (55.0, 75.0, 110.0))
_LUNG_L = ((75.0, 10.0, 0.0), (50.0, 70.0, 105.0))
_EMPHYSEMA = ((-80.0, 15.0, 20.0), (18.0, 18.0, 18.0))


def _chest() -> _Anatomy:
    tissues = (
        _Tissue("fat", -100, _elliptic_cylinder((0, 0), (170, 120))),
        _Tissue("soft", 40, _elliptic_cylinder((0, 0), (155, 105))),
        _Tissue("lung_right", -850, _ellipsoid(*_LUNG_R)),
        _Tissue("lung_left", -850, _ellipsoid(*_LUNG_L)),
        _Tissue("emphysema", -980, _ellipsoid(*_EMPHYSEMA)),
        _Tissue("trachea", -1000, _elliptic_cylinder((0, 5), (9, 9), (40, np.inf))),
        _Tissue("spine", 700, _elliptic_cylinder((0, 80), (20, 18))),
        _Tissue("spinal_canal", 10, _elliptic_cylinder((0, 105), (8, 7))),
        _Tissue("sternum", 450, _elliptic_cylinder((0, -96), (14, 6), (-90, 70))),
    )
    truth = {
        "body": frozenset(t.name for t in tissues),
        "lung_left": frozenset({"lung_left"}),
        "lung_right": frozenset({"lung_right", "emphysema"}),
        "emphysema": frozenset({"emphysema"}),
        "bone": frozenset({"spine", "sternum"}),
        "trachea": frozenset({"trachea"}),
    }
    analytic = {
        "lung_left": _ellipsoid_ml(_LUNG_L[1]),
        "lung_right": _ellipsoid_ml(_LUNG_R[1]),
        "emphysema": _ellipsoid_ml(_EMPHYSEMA[1]),
    }
    return _Anatomy(np.array([0.0, 0.0, -150.0]), -1000, tissues, truth, analytic)


# Head, relative to its centre: T1-like signal (fat bright, white matter above grey, CSF and bone dark).
_HEAD = (78.0, 98.0, 95.0)
_BRAIN = (64.0, 84.0, 80.0)


def _head() -> _Anatomy:
    tissues = (
        _Tissue("scalp", 750, _ellipsoid((0, 0, 0), _HEAD)),
        _Tissue("skull", 80, _ellipsoid((0, 0, 0), (72, 92, 89))),
        _Tissue("csf", 180, _ellipsoid((0, 0, 0), (67, 87, 84))),
        _Tissue("grey", 520, _ellipsoid((0, 0, 0), _BRAIN)),
        _Tissue("white", 720, _ellipsoid((0, 0, 5), (48, 68, 60))),
        _Tissue("ventricle_right", 180, _ellipsoid((-11, -5, 10), (6, 28, 12))),
        _Tissue("ventricle_left", 180, _ellipsoid((11, -5, 10), (6, 28, 12))),
    )
    truth = {
        "head": frozenset(t.name for t in tissues),
        "brain": frozenset({"grey", "white", "ventricle_right", "ventricle_left"}),
    }
    analytic = {"head": _ellipsoid_ml(_HEAD), "brain": _ellipsoid_ml(_BRAIN)}
    return _Anatomy(np.array([0.0, 10.0, 40.0]), 0, tissues, truth, analytic)


# ----------------------------------------------------------------------------- the series


@dataclass
class SyntheticSeries:
    """A generated series: its datasets, the voxels they hold, and the exact answer."""

    datasets: list[Dataset]
    voxels: npt.NDArray[Any]
    truth: dict[str, npt.NDArray[np.bool_]]
    affine: FloatArray
    analytic_ml: dict[str, float] = field(default_factory=dict)

    @property
    def study_uid(self) -> str:
        return str(self.datasets[0].StudyInstanceUID)

    @property
    def series_uid(self) -> str:
        return str(self.datasets[0].SeriesInstanceUID)

    @property
    def voxel_volume_ml(self) -> float:
        return float(abs(np.linalg.det(self.affine[:3, :3]))) / 1000.0

    def truth_ml(self, name: str) -> float:
        """Volume of a truth mask in mL, counted on the grid."""
        return float(self.truth[name].sum()) * self.voxel_volume_ml

    def write(self, directory: str | Path) -> list[Path]:
        """Save one file per slice, named by InstanceNumber; returns paths in slice order."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        paths = []
        for ds in self.datasets:
            path = out / f"IM{int(ds.InstanceNumber):05d}.dcm"
            ds.save_as(path, enforce_file_format=True)
            paths.append(path)
        return paths


def _fmt(values: Sequence[float] | FloatArray) -> list[str]:
    """Decimal strings that fit DS's 16 characters; rounding noise such as 6e-17 becomes 0."""
    return [format_number_as_ds(0.0 if abs(float(v)) < 1e-9 else float(v)) for v in values]


def _base_dataset(sop_class: UID, ident: _Identity, grid: _Grid, k: int, instance: int) -> Dataset:
    """Patient, study, series, frame of reference, equipment, plane and SOP common modules."""
    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20240115"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
    ds.AccessionNumber = ident.accession_number
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = ident.study_description
    ds.SeriesDescription = ident.series_description
    ds.Manufacturer = "radgate"
    ds.ManufacturerModelName = "synthetic phantom"
    ds.InstitutionName = "radgate test site"
    ds.PatientName = ident.patient_name
    ds.PatientID = ident.patient_id
    ds.PatientBirthDate = "19600101"
    ds.PatientSex = "O"
    ds.PatientAge = "066Y"
    ds.StudyInstanceUID = ident.study_uid
    ds.SeriesInstanceUID = ident.series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = ident.series_number
    ds.InstanceNumber = instance
    ds.AcquisitionNumber = 1
    ds.PatientPosition = "HFS"
    ds.FrameOfReferenceUID = ident.frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    ds.ImagePositionPatient = _fmt(grid.positions[k])
    ds.ImageOrientationPatient = _fmt([*grid.row_dir, *grid.col_dir])
    ds.PixelSpacing = _fmt([grid.row_spacing, grid.col_spacing])
    ds.SliceThickness = _fmt([float(np.linalg.norm(grid.step))])[0]
    ds.SliceLocation = _fmt([grid.positions[k] @ grid.normal])[0]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = grid.rows
    ds.Columns = grid.columns
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    return ds


def _attach_pixels(ds: Dataset, stored: npt.NDArray[np.uint16], transfer_syntax: UID) -> None:
    """Set file meta and pixel data in the wanted transfer syntax (compressing with pydicom's encoders)."""
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    if transfer_syntax in _NATIVE_SYNTAXES:
        ds.file_meta.TransferSyntaxUID = transfer_syntax
        ds.PixelData = stored.astype("<u2").tobytes()
    elif transfer_syntax == ExplicitVRBigEndian:
        ds.file_meta.TransferSyntaxUID = transfer_syntax
        ds.PixelData = stored.astype(">u2").tobytes()
    else:
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.compress(transfer_syntax, stored, generate_instance_uid=False)
    ds["PixelData"].VR = "OB" if ds.file_meta.TransferSyntaxUID.is_compressed else "OW"


@dataclass(frozen=True)
class _Kind:
    """What differs between the CT and MR series besides anatomy: SOP class, units, noise, header."""

    sop_class: UID
    intercept: int  # modality value = stored value + intercept
    noise: tuple[int, int]  # inclusive bounds (int8) of the seeded noise added to every voxel
    voxel_dtype: type[np.integer[Any]]
    field_of_view_mm: float  # default in-plane extent (larger matrix side)
    coverage_mm: float  # default extent along the slices
    study_description: str
    decorate: Callable[[Dataset], None]


@dataclass(frozen=True)
class _Identity:
    """Who and what the series belongs to; shared UIDs let several series form one study."""

    study_uid: str
    series_uid: str
    frame_of_reference_uid: str
    patient_id: str
    patient_name: str
    series_number: int
    study_description: str
    series_description: str
    accession_number: str


def _build(
    anatomy: _Anatomy,
    kind: _Kind,
    rows: int,
    columns: int,
    slices: int,
    pixel_spacing: tuple[float, float] | None,
    slice_spacing: float | None,
    orientation: Orientation,
    reverse_order: bool,
    gantry_tilt_deg: float,
    transfer_syntax: str,
    seed: int,
    study_uid: str | None,
    patient_id: str,
    patient_name: str,
    series_number: int,
    frame_of_reference_uid: str | None,
    accession_number: str,
    series_description: str,
) -> SyntheticSeries:
    """Sample the anatomy on the grid, add bounded seeded noise, and wrap every slice in a dataset."""
    fit = kind.field_of_view_mm / max(rows, columns, 1)
    grid = _make_grid(
        rows,
        columns,
        slices,
        pixel_spacing or (fit, fit),
        slice_spacing or kind.coverage_mm / max(slices, 1),
        orientation,
        gantry_tilt_deg,
        anatomy.centre,
    )
    ident = _Identity(
        study_uid or generate_uid(),
        generate_uid(),
        frame_of_reference_uid or generate_uid(),
        patient_id,
        patient_name,
        series_number,
        kind.study_description,
        series_description,
        accession_number,
    )
    values, truth = anatomy.sample(grid)
    rng = np.random.default_rng(seed)
    values += rng.integers(kind.noise[0], kind.noise[1] + 1, size=values.shape, dtype=np.int8)
    stored = (values - np.int16(kind.intercept) if kind.intercept else values).view(np.uint16)
    ts = UID(transfer_syntax)
    datasets = []
    for k in range(slices):
        ds = _base_dataset(kind.sop_class, ident, grid, k, slices - k if reverse_order else k + 1)
        kind.decorate(ds)
        _attach_pixels(ds, stored[k], ts)
        datasets.append(ds)
    voxels = values.astype(kind.voxel_dtype, copy=False)
    return SyntheticSeries(datasets, voxels, truth, grid.affine, dict(anatomy.analytic_ml))


def ct_chest_phantom(
    rows: int = 128,
    columns: int = 128,
    slices: int = 60,
    pixel_spacing: tuple[float, float] | None = None,
    slice_spacing: float | None = None,
    orientation: Orientation = "axial",
    reverse_order: bool = False,
    gantry_tilt_deg: float = 0.0,
    transfer_syntax: str = ExplicitVRLittleEndian,
    seed: int = 0,
    study_uid: str | None = None,
    patient_id: str = "RG-SYN-CT-0001",
    patient_name: str = "Phantom^Chest",
    series_number: int = 1,
    frame_of_reference_uid: str | None = None,
    accession_number: str = "SYN0001",
    series_description: str = "Synthetic chest 1.0",
) -> SyntheticSeries:
    """A chest CT (HU = stored - 1024, 12 bits) with lungs, emphysema, bone and trachea."""

    def decorate(ds: Dataset) -> None:
        ds.Modality = "CT"
        ds.BodyPartExamined = "CHEST"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.RescaleIntercept = -1024
        ds.RescaleSlope = 1
        ds.RescaleType = "HU"
        ds.KVP = 120
        ds.GantryDetectorTilt = _fmt([gantry_tilt_deg])[0]
        ds.ConvolutionKernel = "STANDARD"
        ds.WindowCenter = -600
        ds.WindowWidth = 1600

    kind = _Kind(CTImageStorage, -1024, (-_NOISE_HU, _NOISE_HU), np.int16, 400.0, 300.0, "CT CHEST", decorate)
    return _build(
        _chest(), kind, rows, columns, slices, pixel_spacing, slice_spacing, orientation, reverse_order,
        gantry_tilt_deg, transfer_syntax, seed, study_uid, patient_id, patient_name, series_number,
        frame_of_reference_uid, accession_number, series_description,
    )  # fmt: skip


def mr_head_phantom(
    rows: int = 128,
    columns: int = 128,
    slices: int = 60,
    pixel_spacing: tuple[float, float] | None = None,
    slice_spacing: float | None = None,
    orientation: Orientation = "axial",
    reverse_order: bool = False,
    transfer_syntax: str = ExplicitVRLittleEndian,
    seed: int = 0,
    study_uid: str | None = None,
    patient_id: str = "RG-SYN-MR-0001",
    patient_name: str = "Phantom^Head",
    series_number: int = 1,
    frame_of_reference_uid: str | None = None,
    accession_number: str = "SYN0002",
    series_description: str = "Synthetic T1 head",
) -> SyntheticSeries:
    """A T1-like head MR (no rescale, 12 bits) with scalp, skull, CSF, grey and white matter, ventricles."""

    def decorate(ds: Dataset) -> None:
        ds.Modality = "MR"
        ds.BodyPartExamined = "HEAD"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
        ds.ScanningSequence = ["GR", "IR"]
        ds.SequenceVariant = ["SP", "MP"]
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "3D"
        ds.RepetitionTime = 2250
        ds.EchoTime = 3.98
        ds.InversionTime = 900
        ds.EchoTrainLength = 1
        ds.MagneticFieldStrength = 3
        ds.ImagedNucleus = "1H"
        ds.WindowCenter = 450
        ds.WindowWidth = 900

    kind = _Kind(MRImageStorage, 0, (0, 16), np.uint16, 240.0, 220.0, "MR HEAD", decorate)
    return _build(
        _head(), kind, rows, columns, slices, pixel_spacing, slice_spacing, orientation, reverse_order,
        0.0, transfer_syntax, seed, study_uid, patient_id, patient_name, series_number,
        frame_of_reference_uid, accession_number, series_description,
    )  # fmt: skip
