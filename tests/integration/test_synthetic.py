"""The phantoms are the yardstick for every later test, so their geometry and truth are checked here."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pydicom
import pytest
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
)

from dicom_io.testing.synthetic import SyntheticSeries, ct_chest_phantom, mr_head_phantom
from dicom_io.testing.tools import dciodvfy
from dicom_io.types import SourceRef, Volume

ALL_SYNTAXES = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    ExplicitVRBigEndian,
    DeflatedExplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
    JPEGLSLossless,
]
ORIENTATIONS: list[str | tuple[float, ...]] = [
    "axial",
    "sagittal",
    "coronal",
    "oblique",
    (0.0, 0.8, -0.6, 0.0, 0.6, 0.8),  # axial-ish planes turned 37 degrees about the left-right axis
]


def _centroid_mm(series: SyntheticSeries, name: str) -> npt.NDArray[np.float64]:
    """Centre of a truth mask in patient mm (LPS), through the affine."""
    k, i, j = np.nonzero(series.truth[name])
    ijk = np.stack([j, i, k, np.ones_like(k)]).astype(np.float64)
    return (series.affine @ ijk)[:3].mean(axis=1)


Cube = Callable[..., SyntheticSeries]


@pytest.fixture(scope="module")
def cube() -> Iterator[Cube]:
    """``cube(orientation, gantry_tilt_deg=0.0)``: a 3 mm isotropic 384 mm cube, so every orientation
    sees the same whole lungs. Each phantom is made once for the module (the tests only read them)."""
    made: dict[tuple[str | tuple[float, ...], float], SyntheticSeries] = {}

    def make(orientation: str | tuple[float, ...], gantry_tilt_deg: float = 0.0) -> SyntheticSeries:
        key = (orientation, gantry_tilt_deg)
        if key not in made:
            made[key] = ct_chest_phantom(
                128, 128, 128, (3.0, 3.0), 3.0, orientation=orientation, gantry_tilt_deg=gantry_tilt_deg
            )
        return made[key]

    yield make
    made.clear()


def test_affine_matches_every_written_header() -> None:
    for orientation in ORIENTATIONS:
        series = ct_chest_phantom(
            24, 20, 7, pixel_spacing=(2.0, 1.5), slice_spacing=4.0, orientation=orientation
        )
        a = series.affine
        normal = np.cross(a[:3, 0], a[:3, 1])
        for k, ds in enumerate(series.datasets):
            assert np.allclose(a @ [0, 0, k, 1], [*map(float, ds.ImagePositionPatient), 1], atol=1e-4)
            row, col = (
                np.array(ds.ImageOrientationPatient[:3], float),
                np.array(ds.ImageOrientationPatient[3:], float),
            )
            assert np.allclose(a[:3, 0], row * float(ds.PixelSpacing[1]), atol=1e-6)
            assert np.allclose(a[:3, 1], col * float(ds.PixelSpacing[0]), atol=1e-6)
            assert (ds.Rows, ds.Columns) == series.voxels.shape[1:] == (24, 20)
        assert a[:3, 2] @ normal > 0, "slices must ascend along row x column"
        refs = tuple(SourceRef(str(ds.SOPClassUID), str(ds.SOPInstanceUID)) for ds in series.datasets)
        assert Volume(series.voxels, a, refs).spacing == pytest.approx((4.0, 2.0, 1.5))


def test_truth_volumes_match_the_analytic_shapes() -> None:
    series = ct_chest_phantom(200, 200, 150, pixel_spacing=(2.0, 2.0), slice_spacing=2.0)
    for name in ("lung_left", "lung_right", "emphysema"):
        assert series.truth_ml(name) == pytest.approx(series.analytic_ml[name], rel=0.01), name
    mr = mr_head_phantom(120, 120, 110, pixel_spacing=(2.0, 2.0), slice_spacing=2.0)
    for name in ("head", "brain"):
        assert mr.truth_ml(name) == pytest.approx(mr.analytic_ml[name], rel=0.01), name


def test_every_orientation_shows_the_same_anatomy(cube: Cube) -> None:
    axial = cube("axial")
    for orientation in ORIENTATIONS[1:]:
        other = cube(orientation)
        for name in ("lung_left", "lung_right", "emphysema"):  # closed shapes, wholly inside both grids
            assert other.truth_ml(name) == pytest.approx(axial.truth_ml(name), rel=0.03), (orientation, name)
            offset = _centroid_mm(other, name) - _centroid_mm(axial, name)
            assert np.abs(offset).max() < 1.5, (orientation, name, offset)
        for name in ("trachea", "bone"):  # open-ended: each grid cuts them elsewhere, but both stay midline
            assert _centroid_mm(other, name)[0] == pytest.approx(_centroid_mm(axial, name)[0], abs=1.5)


@pytest.mark.parametrize("orientation", ORIENTATIONS)
def test_left_lung_is_on_the_patient_left(cube: Cube, orientation: str | tuple[float, ...]) -> None:
    series = cube(orientation)
    body_x = _centroid_mm(series, "body")[0]
    assert _centroid_mm(series, "lung_left")[0] > body_x + 40  # LPS: +x is patient left
    assert _centroid_mm(series, "lung_right")[0] < body_x - 40
    assert series.analytic_ml["lung_right"] > series.analytic_ml["lung_left"]
    # the emphysema sits in the right lung, the trachea and bones in the midline
    assert _centroid_mm(series, "emphysema")[0] < body_x - 40
    assert abs(_centroid_mm(series, "trachea")[0] - body_x) < 2


def test_intensities_make_threshold_truth_exact(ct_phantom: SyntheticSeries) -> None:
    hu, t = ct_phantom.voxels, ct_phantom.truth
    lungs = t["lung_left"] | t["lung_right"]
    assert np.array_equal(t["emphysema"], (hu < -950) & lungs)
    assert t["emphysema"].any() and not (t["emphysema"] & t["lung_left"]).any()
    assert (hu[lungs] < -500).all() and (hu[t["body"] & ~lungs & ~t["trachea"]] > -500).all()
    assert (hu[~t["body"]] < -990).all() and (hu[t["trachea"]] < -990).all()
    assert np.median(hu[lungs & ~t["emphysema"]]) == pytest.approx(-850, abs=2)
    assert (hu[t["bone"]] > 300).all()
    assert abs(int(hu.max()) - 700) <= 5 and hu.min() >= -1024
    overlap = np.sum([t[n] for n in ("lung_left", "lung_right", "bone", "trachea")], axis=0)
    assert overlap.max() == 1, "organ masks must not overlap"


def test_mr_head_contrast_and_truth(mr_phantom: SyntheticSeries) -> None:
    v, t = mr_phantom.voxels.astype(int), mr_phantom.truth
    assert (t["brain"] <= t["head"]).all() and t["brain"].sum() > 0.4 * t["head"].sum()
    ds = mr_phantom.datasets[0]
    assert (ds.Modality, ds.SOPClassUID.name, ds.BodyPartExamined) == ("MR", "MR Image Storage", "HEAD")
    assert "RescaleSlope" not in ds
    brain = np.median(v[t["brain"]])
    assert 400 < brain < 800 and np.median(v[~t["head"]]) < 20
    # T1-like: scalp fat bright, skull dark
    shell = t["head"] & ~t["brain"]
    assert v[shell].min() < 100 and v[shell].max() > 700


def test_headers_identity_and_options() -> None:
    first = ct_chest_phantom(16, 16, 5, seed=3, series_number=7, patient_id="SYN42")
    second = mr_head_phantom(16, 16, 5, study_uid=first.study_uid, patient_id="SYN42", series_number=8)
    assert first.study_uid == second.study_uid and first.series_uid != second.series_uid
    ds = first.datasets[0]
    assert (ds.Modality, ds.BodyPartExamined, ds.StudyDescription, ds.PatientID) == (
        "CT",
        "CHEST",
        "CT CHEST",
        "SYN42",
    )
    assert (ds.RescaleSlope, ds.RescaleIntercept, ds.BitsStored, ds.SeriesNumber) == (1, -1024, 12, 7)
    assert len({d.SOPInstanceUID for d in first.datasets}) == 5
    assert len({d.FrameOfReferenceUID for d in first.datasets}) == 1
    again = ct_chest_phantom(16, 16, 5, seed=3)
    assert np.array_equal(again.voxels, first.voxels), "the same seed gives the same voxels"
    with pytest.raises(ValueError, match="orientation"):
        ct_chest_phantom(8, 8, 2, orientation="diagonal")
    with pytest.raises(ValueError, match="perpendicular"):
        ct_chest_phantom(8, 8, 2, orientation=(1, 0, 0, 1, 1, 0))


def test_reverse_order_reverses_instance_numbers_not_positions() -> None:
    series = ct_chest_phantom(16, 16, 6, reverse_order=True)
    assert [int(ds.InstanceNumber) for ds in series.datasets] == [6, 5, 4, 3, 2, 1]
    z = [float(ds.ImagePositionPatient[2]) for ds in series.datasets]
    assert z == sorted(z)
    plain = ct_chest_phantom(16, 16, 6)
    assert np.array_equal(plain.voxels, series.voxels)


def test_gantry_tilt_shears_the_grid_but_keeps_the_anatomy(cube: Cube) -> None:
    tilt = 20.0
    series = cube("axial", gantry_tilt_deg=tilt)
    a = series.affine
    step, col = a[:3, 2], a[:3, 1] / np.linalg.norm(a[:3, 1])
    assert np.allclose(step, [0, 0, 3.0])  # the table moves along z
    assert step @ col == pytest.approx(3.0 * np.sin(np.radians(tilt)))  # positions shift along the columns
    ds = series.datasets[1]
    assert float(ds.GantryDetectorTilt) == tilt
    shift = np.subtract(series.datasets[1].ImagePositionPatient, series.datasets[0].ImagePositionPatient)
    assert np.allclose(shift, step, atol=1e-4)
    axial = cube("axial")
    for name in ("lung_left", "emphysema"):
        # the sheared voxels are smaller by cos(tilt): compare volumes through the affine
        assert series.truth_ml(name) == pytest.approx(axial.truth_ml(name), rel=0.03)
        assert np.allclose(_centroid_mm(series, name), _centroid_mm(axial, name), atol=1.5)


@pytest.mark.parametrize("syntax", ALL_SYNTAXES, ids=lambda uid: uid.name)
def test_every_transfer_syntax_round_trips(syntax: str, tmp_path: Path) -> None:
    series = ct_chest_phantom(48, 40, 3, transfer_syntax=syntax)
    paths = series.write(tmp_path)
    for k, path in enumerate(paths):
        ds = pydicom.dcmread(path)
        assert ds.file_meta.TransferSyntaxUID == syntax
        hu = ds.pixel_array.astype(np.int32) * int(ds.RescaleSlope) + int(ds.RescaleIntercept)
        assert np.array_equal(hu, series.voxels[k])


@pytest.mark.parametrize(
    "make",
    [
        lambda: ct_chest_phantom(32, 32, 3),
        lambda: ct_chest_phantom(32, 32, 3, orientation="oblique", gantry_tilt_deg=12, reverse_order=True),
        lambda: ct_chest_phantom(32, 32, 3, transfer_syntax=DeflatedExplicitVRLittleEndian),
        lambda: ct_chest_phantom(32, 32, 3, transfer_syntax=ExplicitVRBigEndian),
        lambda: ct_chest_phantom(32, 32, 3, transfer_syntax=JPEG2000Lossless),
        lambda: mr_head_phantom(32, 32, 3, orientation="sagittal"),
        lambda: mr_head_phantom(32, 32, 3, transfer_syntax=ImplicitVRLittleEndian),
    ],
    ids=[
        "ct",
        "ct-oblique-tilt-reversed",
        "ct-deflate",
        "ct-big-endian",
        "ct-j2k",
        "mr-sagittal",
        "mr-implicit",
    ],
)
def test_written_files_pass_dciodvfy(make: Callable[[], SyntheticSeries], tmp_path: Path) -> None:
    series = make()
    for path in series.write(tmp_path)[:2]:
        result = dciodvfy(path)
        assert not result.errors, result.output
