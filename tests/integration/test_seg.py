"""SEG: valid (dciodvfy), read back by highdicom with the masks written, every frame on its source plane."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from support.results import (
    LUNG,
    ORGAN,
    Series,
    check_frames_on_sources,
    check_masks,
    load_real,
    lung_findings,
    make_series,
    require,
)
from support.testdata import TESTDATA, needs_testdata

from dicom_io.results import ResultOptions, build_results
from dicom_io.testing import validate
from dicom_io.types import Findings, Segment


def _write(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture(scope="module", params=["axial", "sagittal", "oblique"])
def synthetic(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Series, Path]:
    series = make_series(request.param)
    findings = lung_findings(series.volume)
    results = build_results(findings, series.volume, series.datasets, ResultOptions(write_sc=False))
    assert results.seg is not None
    path = _write(results.seg, tmp_path_factory.mktemp("seg") / "seg.dcm")
    return series, path


def test_seg_passes_dciodvfy(synthetic: tuple[Series, Path]) -> None:
    result = require(validate.dciodvfy(synthetic[1]))
    assert result.ok, str(result)


def test_seg_masks_read_back(synthetic: tuple[Series, Path]) -> None:
    series, path = synthetic
    check_masks(path, lung_findings(series.volume), series.volume)


def test_seg_frames_lie_on_their_source_planes(synthetic: tuple[Series, Path]) -> None:
    series, path = synthetic
    check_frames_on_sources(pydicom.dcmread(path), series.datasets)


def test_seg_header(synthetic: tuple[Series, Path]) -> None:
    series, path = synthetic
    seg = pydicom.dcmread(path)
    source = series.datasets[0]
    assert seg.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert seg.SegmentationType == "BINARY"
    assert seg.StudyInstanceUID == source.StudyInstanceUID
    assert seg.FrameOfReferenceUID == source.FrameOfReferenceUID
    assert seg.SeriesInstanceUID != source.SeriesInstanceUID
    assert seg.SeriesNumber == source.SeriesNumber + 1000
    assert seg.PatientID == source.PatientID and seg.AccessionNumber == source.AccessionNumber
    assert seg.Manufacturer == "radgate" and seg.SeriesDescription == "radgate ct-lung SEG"
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == source.SeriesInstanceUID
    # empty frames are kept: one frame per source slice and segment
    assert seg.NumberOfFrames == 2 * len(series.datasets)
    for number, item in enumerate(seg.SegmentSequence, start=1):
        assert item.SegmentNumber == number
        assert item.SegmentAlgorithmType == "AUTOMATIC"
        assert item.SegmentAlgorithmName == "ct-lung"
        algorithm = item.SegmentationAlgorithmIdentificationSequence[0]
        assert algorithm.AlgorithmFamilyCodeSequence[0].CodeValue == "123110"
        assert algorithm.AlgorithmVersion == "1.2.0"
        assert len(item.RecommendedDisplayCIELabValue) == 3
        assert item.SegmentedPropertyTypeCodeSequence[0].CodeValue == LUNG.value
        assert item.SegmentedPropertyCategoryCodeSequence[0].CodeValue == ORGAN.value


def test_overlapping_segments_stay_binary(tmp_path: Path) -> None:
    series = make_series()
    findings = lung_findings(series.volume, overlap=True)
    seg = build_results(findings, series.volume, series.datasets, ResultOptions(write_sc=False)).seg
    assert seg is not None and seg.SegmentsOverlap == "YES"
    check_masks(_write(seg, tmp_path / "seg.dcm"), findings, series.volume)


def test_labelmap_when_configured(tmp_path: Path) -> None:
    series = make_series("oblique")
    findings = lung_findings(series.volume)
    options = ResultOptions(segmentation_type="LABELMAP", write_sc=False)
    seg = build_results(findings, series.volume, series.datasets, options).seg
    assert seg is not None
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.7"
    path = _write(seg, tmp_path / "labelmap.dcm")
    check_masks(path, findings, series.volume)
    check_frames_on_sources(pydicom.dcmread(path), series.datasets)


def test_segment_numbers_are_renumbered_and_empty_segments_left_out() -> None:
    series = make_series()
    findings = lung_findings(series.volume, empty=["Right lung", "Trachea"])
    seg = build_results(findings, series.volume, series.datasets, ResultOptions(write_sc=False)).seg
    assert seg is not None
    assert [(item.SegmentNumber, item.SegmentLabel) for item in seg.SegmentSequence] == [(1, "Left lung")]


@needs_testdata
@pytest.mark.parametrize("name", ["ct-abdomen-totalseg", "mr-brain-t1-mprage"])
def test_real_series(name: str, tmp_path: Path) -> None:
    """Real J2K CT and sagittal MR: frames on the source planes, masks back, dciodvfy clean."""
    datasets, volume = load_real(TESTDATA / name)
    z, y, x = volume.shape
    zz, yy, xx = np.ogrid[:z, :y, :x]
    mask = ((zz - z / 2) / (z / 4)) ** 2 + ((yy - y / 2) / (y / 5)) ** 2 + ((xx - x / 3) / (x / 6)) ** 2 <= 1
    findings = Findings("test", "1", volume.shape, (Segment(1, "Blob", ORGAN, LUNG, mask),))
    seg = build_results(findings, volume, datasets, ResultOptions(write_sc=False)).seg
    assert seg is not None
    path = _write(seg, tmp_path / "seg.dcm")
    check_frames_on_sources(pydicom.dcmread(path), datasets)
    check_masks(path, findings, volume)
    result = require(validate.dciodvfy(path))
    assert result.ok, str(result)


@needs_testdata
def test_multiframe_source(tmp_path: Path) -> None:
    """A Legacy Converted Enhanced CT (3 frames, 23 columns): each mask slice on the frame it came from."""
    import highdicom as hd

    from dicom_io.volume import load_series

    source = pydicom.dcmread(TESTDATA / "dcmqi/segmentations/23x38x3/multiframe/mf.dcm")
    volume = load_series([source])
    assert {ref.frame for ref in volume.sources} == {1, 2, 3}
    masks = np.zeros(volume.shape, bool)
    for k in range(volume.shape[0]):  # a different square on each slice
        masks[k, 5 + 8 * k : 12 + 8 * k, 3 + 5 * k : 9 + 5 * k] = True
    findings = Findings("test", "1", volume.shape, (Segment(1, "Squares", ORGAN, LUNG, masks),))
    seg = build_results(findings, volume, [source], ResultOptions(write_sc=False)).seg
    assert seg is not None
    path = _write(seg, tmp_path / "seg.dcm")
    read = hd.seg.segread(path)
    for k, ref in enumerate(volume.sources):
        assert ref.frame is not None
        pixels = read.get_pixels_by_source_frame(source.SOPInstanceUID, [ref.frame])
        np.testing.assert_array_equal(pixels[0, ..., 0].astype(bool), masks[k])
    frames = source.PerFrameFunctionalGroupsSequence
    for item in pydicom.dcmread(path).PerFrameFunctionalGroupsSequence:
        number = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedFrameNumber
        expected = frames[int(number) - 1].PlanePositionSequence[0].ImagePositionPatient
        np.testing.assert_allclose(
            np.array(item.PlanePositionSequence[0].ImagePositionPatient, float), np.array(expected, float)
        )
    result = require(validate.dciodvfy(path))
    assert result.ok, str(result)
