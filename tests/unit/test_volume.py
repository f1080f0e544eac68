"""dicom_io.volume: series → Volume on phantoms with known truth, real test data and broken files."""

from __future__ import annotations

import multiprocessing
import shutil
import subprocess
from collections.abc import Callable
from copy import deepcopy
from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)
from support.testdata import TESTDATA, needs_testdata

from dicom_io.testing.synthetic import SyntheticSeries, ct_chest_phantom, mr_head_phantom
from dicom_io.types import SourceRef
from dicom_io.volume import (
    DecodeError,
    SeriesError,
    group_series,
    load_series,
    load_stack,
    main_stack,
    to_metatensor,
)

CT_J2K = TESTDATA / "ct-abdomen-totalseg"
MR_SAG = TESTDATA / "mr-brain-t1-mprage"
TINY = TESTDATA / "dcmqi/segmentations/23x38x3"
EDGE = TESTDATA / "pydicom-testfiles"


def small_ct(**options: object) -> SyntheticSeries:
    return ct_chest_phantom(rows=32, columns=40, slices=10, **options)  # type: ignore[arg-type]


def assert_matches(series: SyntheticSeries, **load: object) -> None:
    volume = load_series(series.datasets, **load)  # type: ignore[arg-type]
    np.testing.assert_array_equal(volume.voxels, series.voxels)
    np.testing.assert_allclose(volume.affine, series.affine, atol=1e-4)


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"orientation": "sagittal"},
        {"orientation": "coronal"},
        {"orientation": "oblique"},
        {"orientation": (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)},
        {"reverse_order": True},
        {"orientation": "sagittal", "reverse_order": True},
        {"gantry_tilt_deg": 15.0},
        {"gantry_tilt_deg": -20.0},
    ],
    ids=repr,
)
def test_phantom_voxels_and_affine_match_the_truth(options: dict[str, object]) -> None:
    series = small_ct(**options)
    assert_matches(series)
    shuffled = load_series([series.datasets[k] for k in np.random.default_rng(1).permutation(10)])
    np.testing.assert_array_equal(shuffled.voxels, series.voxels)


def test_mr_phantom_and_sorting_ignores_instance_number() -> None:
    series = mr_head_phantom(rows=20, columns=16, slices=8, orientation="sagittal", reverse_order=True)
    volume = load_series(series.datasets[::-1])
    np.testing.assert_array_equal(volume.voxels, series.voxels)
    assert [s.sop_instance_uid for s in volume.sources] == [d.SOPInstanceUID for d in series.datasets]


def test_slices_ascend_along_the_normal_and_affine_columns_are_the_conventions() -> None:
    volume = load_series(small_ct(orientation="oblique", reverse_order=True).datasets)
    ds = small_ct(orientation="oblique").datasets[0]
    row, col = np.array(ds.ImageOrientationPatient[:3]), np.array(ds.ImageOrientationPatient[3:])
    np.testing.assert_allclose(volume.affine[:3, 0], row * float(ds.PixelSpacing[1]), atol=1e-6)
    np.testing.assert_allclose(volume.affine[:3, 1], col * float(ds.PixelSpacing[0]), atol=1e-6)
    assert volume.affine[:3, 2] @ np.cross(row, col) > 0
    assert volume.attributes["SliceTiltDeg"] == 0.0


def test_tilt_keeps_the_sheared_step_and_reports_the_angle() -> None:
    volume = load_series(small_ct(gantry_tilt_deg=12.0).datasets)
    assert volume.attributes["SliceTiltDeg"] == pytest.approx(12.0, abs=1e-3)


def test_attributes_are_plain_values_and_sources_are_refs() -> None:
    series = small_ct()
    volume = load_series(series.datasets)
    assert volume.modality == "CT"
    assert volume.attributes["SeriesInstanceUID"] == series.series_uid
    assert volume.attributes["ImageType"] == ("ORIGINAL", "PRIMARY", "AXIAL")
    for value in volume.attributes.values():
        assert isinstance(value, str | int | float | tuple)
    assert volume.sources[0] == SourceRef(series.datasets[0].SOPClassUID, series.datasets[0].SOPInstanceUID)
    assert "PatientName" not in volume.attributes


@pytest.mark.parametrize(
    "syntax",
    [ImplicitVRLittleEndian, ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian, RLELossless, JPEGLSLossless,
     JPEG2000Lossless],
)  # fmt: skip
def test_transfer_syntaxes_from_files_and_datasets(syntax: str, tmp_path: Path) -> None:
    series = small_ct(transfer_syntax=syntax)
    series.write(tmp_path)
    volume = load_series([tmp_path], workers=2)
    np.testing.assert_array_equal(volume.voxels, series.voxels)
    assert_matches(series, workers=2)


def eight_bit(series: SyntheticSeries) -> SyntheticSeries:
    """The phantom with 8-bit stored values (HU / 16 + 64, clipped), the depth JPEG baseline needs."""
    stored = np.clip(series.voxels // 16 + 64, 0, 255).astype(np.uint8)
    for k, ds in enumerate(series.datasets):
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
        ds.RescaleSlope, ds.RescaleIntercept = 16, -1024
        ds.PixelData = stored[k].tobytes()
    return replace(series, voxels=stored.astype(np.int16) * 16 - 1024)


@pytest.mark.skipif(shutil.which("dcmcjpeg") is None, reason="dcmtk not installed")
@pytest.mark.parametrize(
    "flag, bits, lossless",
    [("+e1", 12, True), ("+ee", 12, False), ("+eb", 8, False)],
    ids=["jpeg-lossless-sv1", "jpeg-extended-12bit", "jpeg-baseline-8bit"],
)
def test_jpeg_written_by_dcmtk(flag: str, bits: int, lossless: bool, tmp_path: Path) -> None:
    series = small_ct() if bits == 12 else eight_bit(small_ct())
    plain, jpeg = tmp_path / "plain", tmp_path / "jpeg"
    jpeg.mkdir()
    for path in series.write(plain):
        subprocess.run(["dcmcjpeg", flag, str(path), str(jpeg / path.name)], check=True, capture_output=True)
    np.testing.assert_array_equal(load_series(plain).voxels, series.voxels)
    volume = load_series(jpeg)
    assert pydicom.dcmread(next(jpeg.iterdir())).file_meta.TransferSyntaxUID.is_compressed
    np.testing.assert_allclose(volume.affine, series.affine, atol=1e-4)
    error = np.abs(volume.voxels.astype(np.int32) - series.voxels)
    assert error.max() == 0 if lossless else error.mean() < 5 * (1 if bits == 12 else 16)


def test_parallel_and_serial_decoding_agree() -> None:
    series = small_ct(transfer_syntax=JPEG2000Lossless)
    serial, parallel = load_series(series.datasets, workers=1), load_series(series.datasets, workers=2)
    np.testing.assert_array_equal(serial.voxels, parallel.voxels)


def _load_shape(folder: Path) -> tuple[int, int, int]:
    return load_series([folder], workers=2).shape


def test_compressed_series_loads_inside_a_daemonic_pool_worker(tmp_path: Path) -> None:
    small_ct(transfer_syntax=JPEG2000Lossless).write(tmp_path)
    with multiprocessing.get_context("fork").Pool(1) as pool:
        assert pool.map(_load_shape, [tmp_path]) == [(10, 32, 40)]


def test_int16_when_exact_float32_otherwise() -> None:
    assert load_series(small_ct().datasets).voxels.dtype == np.int16
    series = small_ct()
    for ds in series.datasets:
        ds.RescaleSlope = 0.5
    volume = load_series(series.datasets)
    assert volume.voxels.dtype == np.float32
    np.testing.assert_allclose(volume.voxels, (series.voxels + 1024) * 0.5 - 1024)


def with_copy(series: SyntheticSeries, k: int, change: Callable[[Dataset], None]) -> list[Dataset]:
    """The series plus a copy of slice k (new SOP Instance UID) changed by `change`."""
    copy = deepcopy(series.datasets[k])
    copy.SOPInstanceUID = copy.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    change(copy)
    return [*series.datasets, copy]


def test_identical_duplicate_is_dropped() -> None:
    series = small_ct()
    volume = load_series(with_copy(series, 4, lambda ds: None))
    np.testing.assert_array_equal(volume.voxels, series.voxels)


def _brighter(ds: Dataset) -> None:
    ds.PixelData = (np.frombuffer(ds.PixelData, "<u2") + 1).astype("<u2").tobytes()


def test_different_duplicate_is_an_error_naming_series_and_instances() -> None:
    series = small_ct()
    with pytest.raises(SeriesError, match=series.series_uid) as caught:
        load_series(with_copy(series, 4, _brighter))
    assert series.datasets[4].SOPInstanceUID in str(caught.value)
    assert "share a slice position" in str(caught.value)


def test_duplicate_positions_split_by_echo_number() -> None:
    series = small_ct()
    datasets = []
    for echo in (1, 2):
        for ds in series.datasets:
            copy = deepcopy(ds)
            copy.SOPInstanceUID = generate_uid()
            copy.EchoNumbers = echo
            if echo == 2:
                _brighter(copy)
            datasets.append(copy)
    grouping = group_series(datasets)
    assert [len(s) for s in grouping.stacks] == [10, 10]
    second = load_stack(grouping.stacks[1])
    np.testing.assert_array_equal(second.voxels - load_stack(grouping.stacks[0]).voxels, 1)


def test_missing_slice_is_an_error_unless_allowed() -> None:
    series = small_ct()
    datasets = series.datasets[:6] + series.datasets[7:]
    with pytest.raises(SeriesError, match=rf"{series.series_uid}: missing slice.*sorted slices 5 and 6"):
        load_series(datasets)
    volume = load_series(datasets, allow_gaps=True)
    assert volume.shape == series.voxels.shape
    assert volume.attributes["InterpolatedSlices"] == (6,)
    np.testing.assert_allclose(volume.affine, series.affine, atol=1e-4)
    np.testing.assert_allclose(volume.voxels[6], (series.voxels[5] + series.voxels[7].astype(np.float32)) / 2)
    assert volume.sources[6].sop_instance_uid in {
        series.datasets[5].SOPInstanceUID,
        series.datasets[7].SOPInstanceUID,
    }


def test_duplicate_after_a_filled_gap_is_compared_with_its_own_slice() -> None:
    series = small_ct()
    datasets = [ds for ds in with_copy(series, 8, lambda ds: None) if ds is not series.datasets[3]]
    volume = load_series(datasets, allow_gaps=True)
    np.testing.assert_array_equal(volume.voxels[8], series.voxels[8])


def test_uneven_spacing_is_an_error_within_tolerance_is_not() -> None:
    series = small_ct()
    shifted = with_shift(series, 3, 0.3 * series.affine[2, 2])
    with pytest.raises(SeriesError, match=f"{series.series_uid}: non-uniform slice spacing"):
        load_series(shifted)
    load_series(shifted, spacing_tolerance=0.5)
    load_series(with_shift(series, 3, 0.001))


def with_shift(series: SyntheticSeries, k: int, mm: float) -> list[Dataset]:
    datasets: list[Dataset] = [deepcopy(ds) for ds in series.datasets]
    position = [float(v) for v in datasets[k].ImagePositionPatient]
    datasets[k].ImagePositionPatient = [f"{position[0]:.4f}", f"{position[1]:.4f}", f"{position[2] + mm:.4f}"]
    return datasets


@needs_testdata
def test_grouping_leaves_out_non_images_localizers_and_splits_matrix_sizes(tmp_path: Path) -> None:
    series = small_ct()
    series.write(tmp_path / "ct")
    other = ct_chest_phantom(rows=16, columns=16, slices=3, study_uid=series.study_uid)
    for ds in other.datasets:
        ds.SeriesInstanceUID = series.series_uid
    scout = deepcopy(small_ct(orientation="coronal").datasets[0])
    scout.SeriesInstanceUID = series.series_uid
    localizer = deepcopy(small_ct(orientation="sagittal").datasets[0])
    localizer.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    (tmp_path / "notes.txt").write_text("not dicom")
    shutil.copy(EDGE / "test-SR.dcm", tmp_path / "sr.dcm")
    shutil.copy(EDGE / "dicomdirtests/DICOMDIR", tmp_path / "DICOMDIR")
    shutil.copy(TESTDATA / "dcmqi/segmentations/liver.dcm", tmp_path / "seg.dcm")
    grouping = group_series([tmp_path, *other.datasets, scout, localizer])
    assert [len(s) for s in grouping.stacks] == [10, 3]
    assert main_stack(grouping).series_uid == series.series_uid
    reasons = " | ".join(e.reason for e in grouping.excluded)
    for expected in (
        "not a DICOM file",
        "Modality SR",
        "DICOMDIR",
        "Modality SEG",
        "LOCALIZER",
        "not parallel",
    ):
        assert expected in reasons
    assert scout.SOPInstanceUID in {e.what for e in grouping.excluded}
    np.testing.assert_array_equal(load_stack(main_stack(grouping)).voxels, series.voxels)


@pytest.mark.parametrize(
    "keyword, value",
    [
        ("ImagePositionPatient", ["1", "2"]),
        ("ImageOrientationPatient", ["0"] * 6),
        ("ImageOrientationPatient", ["1", "0", "0", "1", "0", "0"]),
        ("PixelSpacing", ["0", "0"]),
    ],
)
def test_invalid_plane_geometry_is_a_series_error_naming_the_instance(keyword: str, value: list[str]) -> None:
    datasets = small_ct().datasets
    setattr(datasets[2], keyword, value)
    with pytest.raises(SeriesError, match=f"{datasets[2].SOPInstanceUID}: invalid plane geometry"):
        load_series(datasets)


@needs_testdata
def test_no_image_stack_is_a_series_error() -> None:
    with pytest.raises(SeriesError, match="no image stack"):
        load_series([EDGE / "test-SR.dcm"])


def test_to_metatensor_is_channel_first_ras() -> None:
    volume = load_series(small_ct(orientation="oblique").datasets)
    tensor = to_metatensor(volume)
    assert tuple(tensor.shape) == (1, 40, 32, 10)
    assert tensor.meta["space"] == "RAS"
    x, y, z = 5, 7, 3
    assert float(tensor[0, x, y, z]) == float(volume.voxels[z, y, x])
    lps = volume.affine @ [x, y, z, 1]
    ras = tensor.affine.numpy() @ [x, y, z, 1]
    np.testing.assert_allclose(ras[:3], lps[:3] * [-1, -1, 1])


def test_to_metatensor_takes_a_flipped_view_of_the_voxels() -> None:
    """A view with negative strides (np.flip) is what a caller gets from flipping without a copy."""
    volume = load_series(small_ct().datasets)
    flipped = replace(volume, voxels=volume.voxels[:, ::-1, :])
    assert flipped.voxels.strides[1] < 0
    tensor = to_metatensor(flipped)
    x, y, z = 5, 7, 3
    assert float(tensor[0, x, y, z]) == float(volume.voxels[z, volume.shape[1] - 1 - y, x])


def test_metatensor_survives_monai_reorientation() -> None:
    from monai.data import MetaTensor
    from monai.transforms import Orientation

    volume = load_series(small_ct(orientation="sagittal", reverse_order=True).datasets)
    turned = Orientation(axcodes="RAS", labels=None)(to_metatensor(volume))  # labels from meta "space"
    assert isinstance(turned, MetaTensor)
    x, y, z = 7, 5, 3
    ras = volume.affine @ [x, y, z, 1] * [-1, -1, 1, 1]
    i, j, k = np.rint(np.linalg.inv(turned.affine.numpy()) @ ras).astype(int)[:3]
    assert float(turned[0, i, j, k]) == float(volume.voxels[z, y, x])


@needs_testdata
def test_real_ct_j2k_loads_in_hu() -> None:
    volume = load_series(CT_J2K)  # one folder, not a list
    assert volume.shape == (20, 512, 512)
    assert volume.voxels.dtype == np.int16
    assert volume.spacing == pytest.approx((2.0, 0.9765625, 0.9765625))
    assert volume.affine[2, 3] == pytest.approx(-804.5)
    first = pydicom.dcmread(CT_J2K / f"CT.{volume.sources[0].sop_instance_uid}")
    np.testing.assert_array_equal(volume.voxels[0], first.pixel_array.astype(np.int32) - 1024)
    assert volume.voxels.min() >= -1024


@needs_testdata
def test_real_sagittal_mr_normal_is_along_x() -> None:
    volume = load_series([MR_SAG])
    assert volume.shape == (176, 256, 256)
    step = volume.affine[:3, 2]
    assert abs(step[0]) > 0.99 and step @ np.cross(volume.affine[:3, 0], volume.affine[:3, 1]) > 0


@needs_testdata
def test_legacy_converted_enhanced_ct_equals_its_single_frames() -> None:
    single = load_series([TINY / "image"])
    multi = load_series([TINY / "multiframe/mf.dcm"])
    np.testing.assert_array_equal(multi.voxels, single.voxels)
    np.testing.assert_allclose(multi.affine, single.affine, atol=1e-6)
    assert sorted(s.frame for s in multi.sources) == [1, 2, 3]  # type: ignore[type-var]
    assert {s.sop_instance_uid for s in multi.sources} == {
        pydicom.dcmread(TINY / "multiframe/mf.dcm").SOPInstanceUID
    }


def enhanced(series: SyntheticSeries, order: list[int]) -> Dataset:
    """A Legacy Converted Enhanced CT (highdicom) of the phantom's slices given in `order`."""
    from highdicom.legacy import LegacyConvertedEnhancedCTImage

    return LegacyConvertedEnhancedCTImage(
        [series.datasets[k] for k in order], generate_uid(), 9, generate_uid(), 1
    )


def test_enhanced_ct_with_per_frame_rescale_and_shuffled_frames() -> None:
    series = small_ct(orientation="oblique")
    mf = enhanced(series, [3, 1, 7, 0, 9, 2, 8, 4, 6, 5])
    shared = mf.SharedFunctionalGroupsSequence[0]
    transform = shared.PixelValueTransformationSequence[0]
    del shared.PixelValueTransformationSequence
    stored = np.frombuffer(mf.PixelData, "<u2").reshape(10, 32, 40).copy()
    for k, item in enumerate(mf.PerFrameFunctionalGroupsSequence):
        own = deepcopy(transform)
        own.RescaleIntercept = -1024 - k
        item.PixelValueTransformationSequence = [own]
        stored[k] += k
    mf.PixelData = stored.tobytes()
    volume = load_series([mf])
    np.testing.assert_array_equal(volume.voxels, series.voxels)
    np.testing.assert_allclose(volume.affine, series.affine, atol=1e-4)
    assert sorted(s.frame for s in volume.sources) == list(range(1, 11))  # type: ignore[type-var]


def test_enhanced_frames_of_another_frame_type_form_their_own_stack() -> None:
    series = small_ct()
    mf = enhanced(series, list(range(10)))
    for item in mf.PerFrameFunctionalGroupsSequence[5:]:
        frame_type = deepcopy(mf.SharedFunctionalGroupsSequence[0].CTImageFrameTypeSequence[0])
        frame_type.FrameType = ["DERIVED", "SECONDARY", "AXIAL", "NONE"]
        item.CTImageFrameTypeSequence = [frame_type]
    assert [len(stack) for stack in group_series([mf]).stacks] == [5, 5]


def test_compressed_enhanced_frames_decode_in_parallel(tmp_path: Path) -> None:
    series = small_ct(reverse_order=True)
    mf = enhanced(series, list(range(10)))
    mf.compress(JPEG2000Lossless, generate_instance_uid=False)
    mf.save_as(tmp_path / "mf.dcm", enforce_file_format=True)
    for workers in (1, 2):
        np.testing.assert_array_equal(load_series([tmp_path], workers=workers).voxels, series.voxels)


def _with_geometry(name: str, tmp_path: Path) -> Path:
    """A broken edge-case file given plane geometry, so that decoding is what fails."""
    ds = pydicom.dcmread(EDGE / name)
    ds.ImagePositionPatient, ds.ImageOrientationPatient, ds.PixelSpacing = (
        [0, 0, 0],
        [1, 0, 0, 0, 1, 0],
        [1, 1],
    )
    ds.SeriesInstanceUID = ds.get("SeriesInstanceUID") or "1.2.3.4"
    path = tmp_path / name
    ds.save_as(path)
    return path


@needs_testdata
@pytest.mark.parametrize("name", ["JPEG-lossy.dcm", "JPEG2000-embedded-sequence-delimiter.dcm"])
def test_undecodable_pixel_data_is_a_decode_error_naming_the_instance(name: str, tmp_path: Path) -> None:
    path = _with_geometry(name, tmp_path)
    with pytest.raises(DecodeError, match=str(pydicom.dcmread(path).SOPInstanceUID)):
        load_series([path])


@needs_testdata
def test_truncated_pixel_data_is_a_decode_error() -> None:
    uid = pydicom.dcmread(EDGE / "MR_truncated.dcm", stop_before_pixels=True).SOPInstanceUID
    with pytest.raises(DecodeError, match=f"{uid}.*truncated"):
        load_series([EDGE / "MR_truncated.dcm"])


@needs_testdata
@pytest.mark.parametrize(
    "name", ["badVR.dcm", "rtplan_truncated.dcm", "meta_missing_tsyntax.dcm", "no_meta.dcm"]
)
def test_broken_non_images_are_series_errors(name: str) -> None:
    with pytest.raises(SeriesError):
        load_series([EDGE / name])


@needs_testdata
@pytest.mark.parametrize(
    "name",
    [
        "MR_small_bigendian.dcm",
        "MR_small_RLE.dcm",
        "MR_small_jp2klossless.dcm",
        "MR_small_jpeg_ls_lossless.dcm",
    ],
)
def test_edge_case_transfer_syntaxes_decode_like_the_uncompressed_file(name: str) -> None:
    reference = load_series([EDGE / "MR_small.dcm"])
    np.testing.assert_array_equal(load_series([EDGE / name]).voxels, reference.voxels)
