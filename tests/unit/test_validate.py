"""`radgate validate`: reference reading (RTSTRUCT, SEG, NIfTI), scoring, matching, the command.

Rasterisation is checked against hand-made expectations on small grids (holes, several contours
on a slice, duplicates, empty slices, non-axial and reversed grids), against scikit-image's polygon
fill, and on the real case against the enclosed area of the clinical contours (shoelace formula)
and the NIfTI rasterisation shipped with it. Dice and HD95 are checked on shapes whose answer is
known by hand and against MONAI's implementation.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import numpy.typing as npt
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from dicom_io.reference import (
    RTSTRUCT_SOP_CLASS,
    GridMismatchError,
    ReferenceInputError,
    Structure,
    even_odd_fill,
    find_reference,
    rasterise_contours,
    read_reference,
)
from dicom_io.scoring import dice, hd95, match_structures, parse_mapping, words
from dicom_io.testing.synthetic import SyntheticSeries, ct_chest_phantom
from dicom_io.types import Code, Segment, SourceRef, Volume
from dicom_io.volume import load_series
from plugin.cli import main

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
CASE = "ct-chest-nsclc-lung1-001"

pytestmark = pytest.mark.usefixtures("torch_on_one_thread")  # tests/conftest.py


# --- small grids --------------------------------------------------------------------------------


def _volume(affine: npt.NDArray[np.float64], shape: tuple[int, int, int] = (4, 20, 20)) -> Volume:
    refs = tuple(SourceRef("1.2.840.10008.5.1.4.1.1.2", f"1.2.3.{k}") for k in range(shape[0]))
    return Volume(np.zeros(shape, dtype=np.int16), affine, refs, {"Modality": "CT"})


def _affine(
    columns: Sequence[float], rows: Sequence[float], step: Sequence[float], origin: Sequence[float]
) -> Any:
    affine = np.eye(4)
    affine[:3, 0], affine[:3, 1], affine[:3, 2], affine[:3, 3] = columns, rows, step, origin
    return affine


IDENTITY = _affine((1, 0, 0), (0, 1, 0), (0, 0, 1), (0, 0, 0))
# sagittal planes (rows along -z, columns along +y), slices stepping towards the patient's right
# (-x, the reverse of the plane normal), anisotropic spacing and an offset origin
SAGITTAL_REVERSED = _affine((0, 0.8, 0), (0, 0, -1.2), (-2.5, 0, 0), (30.0, -50.0, 100.0))
_turn = np.array([[np.cos(0.4), -np.sin(0.4), 0], [np.sin(0.4), np.cos(0.4), 0], [0, 0, 1]]) @ np.array(
    [[1, 0, 0], [0, np.cos(0.3), -np.sin(0.3)], [0, np.sin(0.3), np.cos(0.3)]]
)
OBLIQUE = _affine(_turn[:, 0] * 0.7, _turn[:, 1] * 0.7, _turn[:, 2] * 3.0, (-12.0, 7.5, -300.0))


def _patient(volume: Volume, xy: Sequence[tuple[float, float]], k: float) -> npt.NDArray[np.float64]:
    """Index-space polygon vertices (column, row) on slice k as LPS mm points (the forward affine)."""
    index = np.array([[x, y, k, 1.0] for x, y in xy])
    return (index @ volume.affine.T)[:, :3]


def _square(x0: float, y0: float, x1: float, y1: float) -> list[tuple[float, float]]:
    return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]


def _expected(shape: tuple[int, int, int], *boxes: tuple[int, int, int, int, int]) -> npt.NDArray[np.bool_]:
    """XOR of boxes (slice, row0, row1, col0, col1), rows/cols half-open like Python slices."""
    out = np.zeros(shape, dtype=bool)
    for k, r0, r1, c0, c1 in boxes:
        out[k, r0:r1, c0:c1] ^= True
    return out


@pytest.mark.parametrize(
    "affine", [IDENTITY, SAGITTAL_REVERSED, OBLIQUE], ids=["axial", "sagittal-rev", "oblique"]
)
def test_rasterise_hole_pair_duplicate_and_empty_slice(affine: npt.NDArray[np.float64]) -> None:
    volume = _volume(affine)
    polygons = [
        _patient(volume, _square(2, 2, 17, 17), 0),  # slice 0: a ring (outer + inner = hole)
        _patient(volume, _square(6, 6, 13, 13), 0),
        _patient(volume, _square(1, 1, 5, 5), 2),  # slice 2: two disjoint contours
        _patient(volume, _square(10, 10, 15, 14), 2),
        _patient(volume, _square(10, 10, 15, 14)[::-1], 2),  # ... the second one again, reversed
        _patient(volume, _square(3, 4, 8, 9), 3),  # slice 3: one contour twice, other start point
        _patient(volume, np.roll(_square(3, 4, 8, 9), 2, axis=0).tolist(), 3),
    ]
    mask = rasterise_contours(polygons, volume)
    expected = _expected(
        volume.shape,
        (0, 2, 17, 2, 17),
        (0, 6, 13, 6, 13),
        (2, 1, 5, 1, 5),
        (2, 10, 14, 10, 15),
        (3, 4, 9, 3, 8),
    )
    np.testing.assert_array_equal(mask, expected)
    assert not mask[1].any(), "a slice without a contour is empty"
    assert mask[0].sum() == 15 * 15 - 7 * 7


def test_pixel_centres_inside_count_and_half_open_edges() -> None:
    volume = _volume(IDENTITY, (1, 12, 12))
    inside = rasterise_contours([_patient(volume, _square(2.4, 2.4, 5.6, 5.6), 0)], volume)
    np.testing.assert_array_equal(inside, _expected(volume.shape, (0, 3, 6, 3, 6)))
    # two squares sharing an edge at column 6: every pixel centre on it belongs to exactly one
    left = rasterise_contours([_patient(volume, _square(2, 2, 6, 8), 0)], volume)
    right = rasterise_contours([_patient(volume, _square(6, 2, 10, 8), 0)], volume)
    assert not (left & right).any()
    assert (left | right).sum() == 8 * 6 == (10 - 2) * (8 - 2)  # pixel count = area


def test_even_odd_fill_agrees_with_scikit_image() -> None:
    draw = pytest.importorskip("skimage.draw")
    rng = np.random.default_rng(3)
    for _ in range(20):
        n = int(rng.integers(3, 12))
        angles = np.sort(rng.uniform(0, 2 * np.pi, n))
        radius = rng.uniform(3, 14, n)
        xy = np.stack([20.37 + radius * np.cos(angles), 18.21 + radius * np.sin(angles)], axis=1)
        ours = even_odd_fill([xy], (36, 40))
        theirs = draw.polygon2mask((36, 40), xy[:, ::-1])
        np.testing.assert_array_equal(ours, theirs)


def test_contours_off_the_slices_are_refused() -> None:
    volume = _volume(IDENTITY)
    tilted = _patient(volume, [(2, 2), (8, 2), (8, 8)], 1)
    tilted[2, 2] += 2.0  # one point two slices away
    with pytest.raises(GridMismatchError, match="not parallel"):
        rasterise_contours([tilted], volume)
    with pytest.raises(GridMismatchError, match="several planes"):
        rasterise_contours(
            [_patient(volume, _square(2, 2, 8, 8), 1), _patient(volume, _square(2, 2, 8, 8), 1.3)], volume
        )
    notes: list[str] = []
    mask = rasterise_contours([_patient(volume, _square(2, 2, 8, 8), 7)], volume, name="x", notes=notes)
    assert not mask.any() and "outside" in notes[0]


# --- RTSTRUCT files -----------------------------------------------------------------------------


def _rtstruct(
    series: Sequence[Dataset], rois: dict[str, list[tuple[npt.NDArray[np.float64], str | None]]]
) -> Dataset:
    """A minimal RTSTRUCT (pydicom) with closed planar contours: {name: [(points, image UID)]}."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = RTSTRUCT_SOP_CLASS
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = RTSTRUCT_SOP_CLASS, ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = "RTSTRUCT"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = series[0].StudyInstanceUID, generate_uid()
    frame_of_reference = series[0].FrameOfReferenceUID
    ds.ReferencedFrameOfReferenceSequence = DicomSequence([Dataset()])
    ds.ReferencedFrameOfReferenceSequence[0].FrameOfReferenceUID = frame_of_reference
    ds.StructureSetROISequence, ds.ROIContourSequence, ds.RTROIObservationsSequence = [], [], []
    for number, (name, contours) in enumerate(rois.items(), start=1):
        roi = Dataset()
        roi.ROINumber, roi.ROIName, roi.ReferencedFrameOfReferenceUID = number, name, frame_of_reference
        ds.StructureSetROISequence.append(roi)
        item = Dataset()
        item.ReferencedROINumber = number
        item.ContourSequence = []
        for points, image_uid in contours:
            contour = Dataset()
            contour.ContourGeometricType = "CLOSED_PLANAR"
            contour.NumberOfContourPoints = len(points)
            contour.ContourData = [f"{v:.4f}" for v in points.ravel()]
            if image_uid is not None:
                image = Dataset()
                image.ReferencedSOPClassUID, image.ReferencedSOPInstanceUID = series[0].SOPClassUID, image_uid
                contour.ContourImageSequence = [image]
            item.ContourSequence.append(contour)
        ds.ROIContourSequence.append(item)
        observation = Dataset()
        observation.ObservationNumber, observation.ReferencedROINumber = number, number
        observation.RTROIInterpretedType = "ORGAN"
        ds.RTROIObservationsSequence.append(observation)
    return ds


@pytest.fixture(scope="module")
def sagittal(tmp_path_factory: pytest.TempPathFactory) -> tuple[SyntheticSeries, Path, Volume]:
    """A small sagittal CT written in reverse InstanceNumber order, and its loaded Volume."""
    series = ct_chest_phantom(rows=24, columns=20, slices=6, orientation="sagittal", reverse_order=True)
    folder = tmp_path_factory.mktemp("sagittal")
    series.write(folder / "ct")
    return series, folder, load_series([folder / "ct"])


def test_rtstruct_file_on_a_sagittal_reversed_series(sagittal: tuple[SyntheticSeries, Path, Volume]) -> None:
    series, folder, volume = sagittal
    np.testing.assert_allclose(volume.affine, series.affine, atol=1e-6)
    uid = [str(ds.SOPInstanceUID) for ds in series.datasets]

    def at(xy: list[tuple[float, float]], k: int) -> npt.NDArray[np.float64]:
        return _patient(volume, xy, k)

    rois = {
        "Lung L": [(at(_square(2, 2, 17, 20), 1), uid[1]), (at(_square(6, 6, 13, 13), 1), uid[1])],
        "Lung_R": [
            (at(_square(1, 1, 5, 5), 0), uid[0]),
            (at(_square(1, 1, 5, 5), 0), uid[0]),  # the same contour twice
            (at(_square(3, 3, 9, 9), 4), uid[2]),  # its ContourImageSequence names another slice
        ],
    }
    path = folder / "rtstruct.dcm"
    _rtstruct(series.datasets, rois).save_as(path, enforce_file_format=True)
    assert find_reference(folder) == path
    reference = read_reference(path, volume)
    assert reference.kind == "RTSTRUCT" and [s.name for s in reference.structures] == ["Lung L", "Lung_R"]
    left, right = (reference.mask(s) for s in reference.structures)
    np.testing.assert_array_equal(left, _expected(volume.shape, (1, 2, 20, 2, 17), (1, 6, 13, 6, 13)))
    np.testing.assert_array_equal(right, _expected(volume.shape, (0, 1, 5, 1, 5), (4, 3, 9, 3, 9)))
    assert any("another image" in note for note in reference.notes)


def test_rtstruct_in_another_frame_of_reference_is_refused(
    sagittal: tuple[SyntheticSeries, Path, Volume], tmp_path: Path
) -> None:
    series, _, volume = sagittal
    ds = _rtstruct(series.datasets, {"Lung L": [(_patient(volume, _square(2, 2, 8, 8), 1), None)]})
    ds.ReferencedFrameOfReferenceSequence[0].FrameOfReferenceUID = generate_uid()
    ds.save_as(tmp_path / "rt.dcm", enforce_file_format=True)
    with pytest.raises(GridMismatchError, match="frame of reference"):
        read_reference(tmp_path / "rt.dcm", volume)


def test_unreadable_and_missing_references(tmp_path: Path) -> None:
    volume = _volume(IDENTITY)
    (tmp_path / "notes.txt").write_text("not DICOM")
    with pytest.raises(ReferenceInputError, match="not a readable RTSTRUCT"):
        read_reference(tmp_path / "notes.txt", volume)
    with pytest.raises(ReferenceInputError, match="no reference found"):
        find_reference(tmp_path)


# --- scores -------------------------------------------------------------------------------------


def test_dice_and_hd95_on_shapes_known_by_hand() -> None:
    a = np.zeros((20, 20, 20), dtype=bool)
    b = np.zeros_like(a)
    a[2:12, 2:12, 2:12] = True
    b[2:12, 2:12, 5:15] = True  # the same cube 3 voxels along x
    assert dice(a, b) == pytest.approx(2 * 7 * 10 * 10 / 2000)  # 0.7
    assert dice(a, a) == 1.0 and dice(a, np.zeros_like(a)) == 0.0
    one, other = np.zeros((6, 6, 6), dtype=bool), np.zeros((6, 6, 6), dtype=bool)
    one[1, 1, 1], other[3, 1, 1] = True, True
    assert hd95(one, other, (3.0, 0.5, 0.5)) == pytest.approx(6.0)  # two slices of 3 mm
    line, parallel = np.zeros((5, 8, 12), dtype=bool), np.zeros((5, 8, 12), dtype=bool)
    line[2, 2, 1:9], parallel[2, 5, 1:9] = True, True
    assert hd95(line, parallel, (2.0, 0.7, 1.0)) == pytest.approx(2.1)  # every point 3 rows of 0.7 mm
    # one outlier among 21 surface points moves the maximum (10 mm) but not the 95th percentile
    row = np.zeros((1, 12, 20), dtype=bool)
    row[0, 0, :] = True
    with_outlier = row.copy()
    with_outlier[0, 10, 0] = True
    assert hd95(row, with_outlier, (1.0, 1.0, 1.0)) == pytest.approx(0.0)
    assert hd95(row, np.zeros_like(row), (1.0, 1.0, 1.0)) is None


def test_hd95_agrees_with_monai() -> None:
    import torch
    from monai.metrics import compute_hausdorff_distance
    from scipy import ndimage

    rng = np.random.default_rng(7)
    spacing = (3.0, 0.7, 0.9)
    for _ in range(3):
        a = ndimage.gaussian_filter(rng.random((18, 30, 26)), 2) > 0.5
        b = ndimage.gaussian_filter(rng.random((18, 30, 26)), 2) > 0.5
        theirs = compute_hausdorff_distance(
            torch.tensor(a)[None, None], torch.tensor(b)[None, None], percentile=95, spacing=spacing
        )
        assert hd95(a, b, spacing) == pytest.approx(float(theirs), abs=1e-5)


# --- matching -----------------------------------------------------------------------------------


def _lung_segments() -> list[Segment]:
    from ai_models.ct_lung import LEFT, LUNG, RIGHT

    mask = np.zeros((2, 2, 2), dtype=bool)
    tissue = Code("123037004", "SCT", "Anatomical Structure")
    return [
        Segment(1, "Right lung", tissue, LUNG, mask, laterality=RIGHT),
        Segment(2, "Left lung", tissue, LUNG, mask, laterality=LEFT),
        Segment(3, "Body", tissue, Code("38266002", "SCT", "Entire body"), mask),
    ]


@pytest.mark.parametrize(
    "name", ["Lung L", "Lung_L", "LungL", "Left Lung", "lung_left", "LUNG_LT", "Lungs left"]
)
def test_left_lung_names_match_by_label(name: str) -> None:
    [match] = match_structures([Structure(name), Structure("GTV-1")], _lung_segments())
    assert (match.segment.label, match.by) == ("Left lung", "label")
    assert words(name) == {"lung", "left"}


def test_match_by_code_then_mapping_and_errors() -> None:
    from ai_models.ct_lung import LEFT, LUNG, RIGHT

    segments = _lung_segments()
    coded = [Structure("Seg 1", LUNG, RIGHT), Structure("Seg 2", LUNG, LEFT)]
    assert [(m.segment.label, m.by) for m in match_structures(coded, segments)] == [
        ("Right lung", "code"),
        ("Left lung", "code"),
    ]
    labels = [Structure("1"), Structure("2")]
    with pytest.raises(ReferenceInputError, match=r"no reference structure matches.*--map"):
        match_structures(labels, segments)
    mapped = match_structures(labels, segments, parse_mapping(["1=Left lung", "2=1"]))
    assert [(m.structure.name, m.segment.label, m.by) for m in mapped] == [
        ("1", "Left lung", "map"),
        ("2", "Right lung", "map"),
    ]
    with pytest.raises(ReferenceInputError, match="no structure '3'"):
        match_structures(labels, segments, {"3": "Left lung"})
    with pytest.raises(ReferenceInputError, match="no segment 'Liver'"):
        match_structures(labels, segments, {"1": "Liver"})
    with pytest.raises(ReferenceInputError, match="both match segment 'Left lung'"):
        match_structures([Structure("Lung L"), Structure("Left lung")], segments)
    with pytest.raises(ValueError, match="REFERENCE=SEGMENT"):
        parse_mapping(["Lung L"])


# --- NIfTI on a phantom, and the command on it ----------------------------------------------------


def _save_nifti(
    labels: npt.NDArray[Any], affine_lps: npt.NDArray[np.float64], path: Path, permute: bool
) -> None:
    """Labels (z, y, x) as a NIfTI in RAS: (x, y, z) order, or permuted and flipped with a matching affine."""
    data = np.transpose(labels, (2, 1, 0))  # (x, y, z) = (i, j, k)
    affine = LPS_TO_RAS @ affine_lps
    if permute:  # store as (z, x, y) with y reversed
        data = np.flip(np.transpose(data, (2, 0, 1)), axis=2)
        permuted = affine.copy()
        permuted[:3, :3] = affine[:3, [2, 0, 1]]
        permuted[:3, 2] *= -1
        permuted[:3, 3] += affine[:3, 1] * (labels.shape[1] - 1)
        affine = permuted
    nib.save(nib.Nifti1Image(data.astype(np.uint8), affine), path)


@pytest.fixture(scope="module")
def phantom_case(tmp_path_factory: pytest.TempPathFactory) -> tuple[SyntheticSeries, Path]:
    """A small chest phantom written as a case folder with a NIfTI label map (1 left, 2 right lung)."""
    series = ct_chest_phantom(rows=96, columns=96, slices=40, seed=1)
    folder = tmp_path_factory.mktemp("phantom_case")
    series.write(folder / "ct")
    labels = series.truth["lung_left"] * 1 + series.truth["lung_right"] * 2
    _save_nifti(labels, series.affine, folder / "lungs.nii.gz", permute=False)
    return series, folder


@pytest.mark.parametrize("permute", [False, True])
def test_nifti_read_through_its_affine(
    phantom_case: tuple[SyntheticSeries, Path], tmp_path: Path, permute: bool
) -> None:
    series, folder = phantom_case
    volume = load_series([folder / "ct"])
    _save_nifti(
        series.truth["lung_left"] * 1 + series.truth["lung_right"] * 2,
        series.affine,
        tmp_path / "l.nii",
        permute,
    )
    reference = read_reference(tmp_path / "l.nii", volume)
    assert [s.name for s in reference.structures] == ["1", "2"]
    np.testing.assert_array_equal(reference.mask(reference.structures[0]), series.truth["lung_left"])
    np.testing.assert_array_equal(reference.mask(reference.structures[1]), series.truth["lung_right"])


def test_nifti_on_another_grid_is_refused(phantom_case: tuple[SyntheticSeries, Path], tmp_path: Path) -> None:
    series, folder = phantom_case
    volume = load_series([folder / "ct"])
    labels = series.truth["lung_left"].astype(np.uint8)
    _save_nifti(labels[1:], series.affine, tmp_path / "short.nii.gz", permute=False)  # one slice less
    with pytest.raises(GridMismatchError, match="does not cover"):
        read_reference(tmp_path / "short.nii.gz", volume)
    coarse = series.affine.copy()
    coarse[:3, 0] *= 2
    _save_nifti(labels, coarse, tmp_path / "coarse.nii.gz", permute=False)
    with pytest.raises(GridMismatchError, match="spacing or orientation"):
        read_reference(tmp_path / "coarse.nii.gz", volume)


def test_command_on_the_phantom(
    phantom_case: tuple[SyntheticSeries, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    series, folder = phantom_case
    maps = ["--map", "1=Left lung", "--map", "2=Right lung"]
    out = tmp_path / "report"
    # the NIfTI inside the case folder is found without --reference
    assert (
        main(["validate", "--pipeline", "ct-lung", "--device", "cpu", *maps, str(folder), "--out", str(out)])
        == 0
    )
    document = json.loads((out / "validation.json").read_text())
    [case] = document["cases"]
    assert case["reference_kind"] == "NIFTI" and case["reference"].endswith("lungs.nii.gz")
    voxel_ml = abs(np.linalg.det(series.affine[:3, :3])) / 1000
    for row in case["structures"]:
        truth = series.truth["lung_left" if row["segment"] == "Left lung" else "lung_right"]
        assert row["reference_ml"] == pytest.approx(truth.sum() * voxel_ml)
        assert row["dice"] > 0.9 and row["matched_by"] == "map"
    assert [s["segment"] for s in document["summary"]] == ["Left lung", "Right lung"]
    assert "Left lung" in capsys.readouterr().out
    # left and right swapped: below --min-dice, exit status 1, the report says which
    swapped = ["--map", "2=Left lung", "--map", "1=Right lung", "--min-dice", "0.5"]
    assert main(["validate", "--pipeline", "ct-lung", "--device", "cpu", *swapped, str(folder)]) == 1
    assert "below --min-dice 0.5" in capsys.readouterr().out


def test_command_refuses_unusable_input(
    phantom_case: tuple[SyntheticSeries, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    series, folder = phantom_case
    base = ["validate", "--pipeline", "ct-lung", "--device", "cpu"]
    assert main([*base, str(folder)]) == 2  # a NIfTI has no names: nothing matches without --map
    assert "no reference structure matches" in capsys.readouterr().err
    _save_nifti(
        series.truth["lung_left"][2:].astype(np.uint8), series.affine, tmp_path / "short.nii.gz", False
    )
    assert main([*base, "--reference", str(tmp_path / "short.nii.gz"), str(folder)]) == 2
    assert "does not cover" in capsys.readouterr().err
    nifti = str(folder / "lungs.nii.gz")
    assert main([*base, "--reference", nifti, "--reference", nifti, str(folder)]) == 2
    assert "2 --reference for 1 cases" in capsys.readouterr().err
    assert main([*base, "--reference", str(tmp_path / "nothing.dcm"), str(folder)]) == 2
    assert "no such reference file" in capsys.readouterr().err
    assert main([*base, "--map", "3=Left lung", "--reference", nifti, str(folder)]) == 2
    assert "no structure '3'" in capsys.readouterr().err


# --- the real case ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real(testdata: Path) -> tuple[Path, Volume]:
    case = testdata / CASE
    if not case.is_dir():
        pytest.skip(f"{case} is missing")
    return case, load_series([case / "ct"])


def _shoelace_ml(rtstruct: Dataset, name: str, volume: Volume) -> float:
    """The enclosed volume of a structure's contours (area x slice step), assuming no holes."""
    [number] = [r.ROINumber for r in rtstruct.StructureSetROISequence if r.ROIName == name]
    [roi] = [r for r in rtstruct.ROIContourSequence if r.ReferencedROINumber == number]
    area = 0.0
    for contour in roi.ContourSequence:
        x, y = np.asarray(contour.ContourData, dtype=float).reshape(-1, 3)[:, :2].T
        area += abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2
    return area * volume.spacing[0] / 1000


def test_real_rtstruct_lungs(real: tuple[Path, Volume]) -> None:
    case, volume = real
    contours = read_reference(case / "rtstruct.dcm", volume)
    nifti = read_reference(case / "lungs-reference.nii.gz", volume)
    rtstruct = pydicom.dcmread(case / "rtstruct.dcm")
    masks = {}
    for name, value, nifti_ml in (("Lung L", "1", 2281), ("Lung R", "2", 3019)):
        ours = masks[name] = contours.mask(next(s for s in contours.structures if s.name == name))
        theirs = nifti.mask(next(s for s in nifti.structures if s.name == value))
        ours_ml = float(ours.sum()) * volume.voxel_volume_ml
        # pixel centres inside the contours: the contours' own enclosed volume
        assert ours_ml == pytest.approx(_shoelace_ml(rtstruct, name, volume), rel=0.005), name
        # the shipped NIfTI was rasterised by another rule that takes every pixel a contour touches
        # (about half a pixel more all round, +2-3 % volume): a superset of ours, Dice about 0.985
        assert float(theirs.sum()) * volume.voxel_volume_ml == pytest.approx(nifti_ml, rel=0.001), name
        assert dice(ours, theirs) > 0.98, name
        assert (ours & ~theirs).sum() < 0.005 * ours.sum(), name
    # slices without a contour of Lung L (below -609.5 mm, above -354.5 mm) stay empty, the others not
    left = masks["Lung L"]
    z_mm = volume.affine[2, 3] + volume.affine[2, 2] * np.arange(volume.shape[0])
    np.testing.assert_array_equal(left.any(axis=(1, 2)), (z_mm >= -609.6) & (z_mm <= -354.4))


def test_external_seg_placed_on_its_series(testdata: Path) -> None:
    """dcmqi's liver SEG (made by another toolkit) lands on the slices of the CT it references."""
    folder = testdata / "dcmqi" / "segmentations"
    volume = load_series([folder / "ct-3slice"])
    reference = read_reference(folder / "liver.dcm", volume)
    [liver] = reference.structures
    assert reference.kind == "SEG" and liver.name.lower() == "liver" and liver.property_type is not None
    mask = reference.mask(liver)
    seg = pydicom.dcmread(folder / "liver.dcm")
    assert mask.sum() == int(np.count_nonzero(seg.pixel_array))
    assert all(mask[k].any() for k in range(volume.shape[0]))
