"""SR: TID 1500 passes pixelmed, dsrdump and dciodvfy; values, references and coordinates read back."""

from __future__ import annotations

import datetime
from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from support.results import (
    LAA,
    LEFT,
    ML,
    RIGHT,
    VOLUME,
    Series,
    lung_findings,
    make_series,
    require,
)
from support.testdata import TESTDATA, needs_testdata

from dicom_io.results import ResultOptions, ResultSet, build_results
from dicom_io.results.common import format_value, make_context
from dicom_io.results.prior import Prior
from dicom_io.results.reading import read_prior, sr_measurements
from dicom_io.testing import validate
from dicom_io.testing.structure import describe_seg, describe_sr
from dicom_io.types import Findings, Measurement

DCMQI = TESTDATA / "dcmqi"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
PRIOR_STUDY = "1.2.826.0.1.3680043.10.1234.77"
OPTIONS = ResultOptions(write_sc=False, device_uid="1.2.826.0.1.3680043.10.1234.1", serial_number="node-7")


def _evidence(sr: Dataset) -> set[str]:
    """The instances listed in CurrentRequestedProcedureEvidenceSequence."""
    return {
        item.ReferencedSOPInstanceUID
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    }


def _findings(series: Series) -> Findings:
    """Two lungs with measurements, a total volume with no segment, a trachea not found, a note."""
    lungs = lung_findings(series.volume, empty=["Trachea"])
    total = sum(m.value for m in lungs.measurements if m.concept == VOLUME)
    return replace(
        lungs,
        measurements=(*lungs.measurements, Measurement(VOLUME, round(total, 3), ML)),
        notes=("Emphysema quantification uses a -950 HU threshold.",),
    )


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> tuple[Series, Findings, ResultSet, Path, Path]:
    series = make_series("oblique")
    findings = _findings(series)
    results = build_results(findings, series.volume, series.datasets, OPTIONS)
    assert results.seg is not None
    out = tmp_path_factory.mktemp("sr")
    results.seg.save_as(out / "seg.dcm", enforce_file_format=True)
    results.sr.save_as(out / "sr.dcm", enforce_file_format=True)
    return series, findings, results, out / "seg.dcm", out / "sr.dcm"


@pytest.mark.slow  # pixelmed: a JVM
def test_sr_passes_pixelmed(written: tuple[Series, Findings, ResultSet, Path, Path]) -> None:
    result = require(validate.pixelmed_sr(written[4]))
    assert "IOD validation complete" in result.output
    assert result.ok, str(result)


def test_sr_passes_dciodvfy(written: tuple[Series, Findings, ResultSet, Path, Path]) -> None:
    result = require(validate.dciodvfy(written[4]))
    assert result.ok, str(result)


def test_sr_dsrdump_prints_it(written: tuple[Series, Findings, ResultSet, Path, Path]) -> None:
    result = require(validate.dsrdump(written[4]))
    assert result.ok, str(result)
    assert '(126000,DCM,"Imaging Measurement Report")' in result.output
    assert "Right lung" in result.output and "No Trachea found" in result.output


def test_sr_values_and_references_read_back(written: tuple[Series, Findings, ResultSet, Path, Path]) -> None:
    import highdicom as hd

    series, findings, _, seg_path, sr_path = written
    sr = hd.sr.srread(sr_path)
    seg = pydicom.dcmread(seg_path)
    assert sr.SOPClassUID == COMPREHENSIVE_3D_SR
    assert sr.StudyInstanceUID == seg.StudyInstanceUID and sr.SeriesNumber == seg.SeriesNumber + 1
    report = sr.content
    groups = report.get_volumetric_roi_measurement_groups()
    assert [g.tracking_identifier for g in groups] == ["Right lung", "Left lung", "Both lungs"]
    tracking_uids = {item.SegmentLabel: item.TrackingUID for item in seg.SegmentSequence}
    inverse = np.linalg.inv(series.volume.affine)
    for group, segment, laterality in zip(groups, findings.segments, (RIGHT, LEFT), strict=False):
        assert group.tracking_uid == tracking_uids[segment.label]
        reference = group.referenced_segment
        assert reference.referenced_sop_instance_uid == seg.SOPInstanceUID
        assert reference.referenced_segment_numbers == [segment.number]
        assert group.finding_sites[0].laterality.value == laterality.value
        expected = findings.measurements_for(segment.number)
        measured = group.get_measurements()
        assert [(m.name.value, m.value, m.unit.value) for m in measured] == [
            (e.concept.value, pytest.approx(e.value), e.unit.value) for e in expected
        ]
        assert measured[1].derivation is not None and measured[1].derivation.value == "373098007"
        for m in measured:  # every NUM located at a point inside its segment, in the source frame
            point = m.referenced_coordinates[0]
            assert point.GraphicType == "POINT"
            assert point.ReferencedFrameOfReferenceUID == seg.FrameOfReferenceUID
            x, y, z = np.round(inverse @ np.r_[np.asarray(point.GraphicData, float), 1.0])[:3]
            assert segment.mask[int(z), int(y), int(x)]
    whole = groups[2]
    assert whole.roi is not None and whole.roi.graphic_type.value == "POINT"
    assert whole.get_measurements()[0].value == pytest.approx(findings.measurements_for(None)[0].value)
    assert _evidence(sr) == {seg.SOPInstanceUID} | {r.sop_instance_uid for r in series.volume.sources}


def test_sr_identifies_device_and_algorithm(written: tuple[Series, Findings, ResultSet, Path, Path]) -> None:
    result = require(validate.dsrdump(written[4]))
    assert '(121012,DCM,"Device Observer UID")="1.2.826.0.1.3680043.10.1234.1"' in result.output
    assert '(121015,DCM,"Device Observer Model Name")="radgate"' in result.output
    assert '(121016,DCM,"Device Observer Serial Number")="node-7"' in result.output
    assert '(111001,DCM,"Algorithm Name")="ct-lung"' in result.output
    assert '(111003,DCM,"Algorithm Version")="1.2.0"' in result.output


@pytest.mark.slow  # pixelmed: a JVM
def test_empty_finding_gives_a_valid_sr_and_no_seg(tmp_path: Path) -> None:
    series = make_series()
    findings = lung_findings(series.volume, empty=["Right lung", "Left lung"])
    results = build_results(findings, series.volume, series.datasets, OPTIONS)
    assert results.seg is None
    path = tmp_path / "sr.dcm"
    results.sr.save_as(path, enforce_file_format=True)
    for check in (validate.pixelmed_sr, validate.dciodvfy, validate.dsrdump):
        result = require(check(path))
        assert result.ok, str(result)
    dump = validate.dsrdump(path).output
    assert "No Right lung found" in dump and "No Left lung found" in dump
    structure = describe_sr(pydicom.dcmread(path))
    assert structure.groups == () and "Qualitative Evaluations" in structure.root_items
    assert _evidence(results.sr) == {r.sop_instance_uid for r in series.volume.sources}


@needs_testdata
def test_structure_compared_with_dcmqi(written: tuple[Series, Findings, ResultSet, Path, Path]) -> None:
    """The same reader over dcmqi's examples and ours: what viewers need, where the two differ."""
    ours_seg, ours_sr = describe_seg(pydicom.dcmread(written[3])), describe_sr(pydicom.dcmread(written[4]))
    dcmqi_seg = describe_seg(pydicom.dcmread(DCMQI / "segmentations" / "liver.dcm"))
    dcmqi_sr = describe_sr(pydicom.dcmread(DCMQI / "sr-example" / "sr.dcm"))
    for seg in (ours_seg, dcmqi_seg):  # what both do, and every viewer relies on
        assert seg.segmentation_type == "BINARY" and seg.referenced_series == 1
        assert seg.frames_with_source_image == seg.frames and seg.shared_pixel_measures
        assert all(s.cielab for s in seg.segments)
    assert all(s.algorithm_identification and s.algorithm_type == "AUTOMATIC" for s in ours_seg.segments)
    assert not any(s.algorithm_identification for s in dcmqi_seg.segments)
    for sr in (ours_sr, dcmqi_sr):
        assert sr.template == "1500"
        assert all(g.tracking_id and g.tracking_uid for g in sr.groups)
        volumetric = [
            g for g in sr.groups if ": " not in g.tracking_id
        ]  # ours: planar copies "Left lung: Volume"
        assert all(g.referenced_segment for g in volumetric if g.tracking_id != "Both lungs")
    assert any(": " in g.tracking_id for g in ours_sr.groups)
    # the difference that decides whether OHIF shows the report at all
    assert all(g.viewer_locatable for g in ours_sr.groups)
    assert not any(g.viewer_locatable for g in dcmqi_sr.groups)
    assert ours_sr.observer_types == ("Device",) and dcmqi_sr.observer_types == ("Person",)
    assert dcmqi_sr.image_library and not ours_sr.image_library


# --- compared with a prior study ---------------------------------------------------------------


@pytest.fixture(scope="module")
def compared(
    written: tuple[Series, Findings, ResultSet, Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Prior, Findings, Path]:
    """The SR of `written` read as another study's result (the prior), and a current run whose
    right lung grew by 10 % and whose %LAA-950 rose by 2.5 points, compared with it."""
    series, findings = written[0], written[1]
    prior = replace(read_prior(pydicom.dcmread(written[4])), study_uid=PRIOR_STUDY, study_date="20190102")
    grown = tuple(
        replace(m, value=m.value * 1.1 if m.concept == VOLUME else m.value + 2.5)
        if m.segment == 1 and m.concept in (VOLUME, LAA)
        else m
        for m in findings.measurements
    )
    current = replace(findings, measurements=grown)
    options = replace(OPTIONS, prior=prior, uid_seed="current")
    path = tmp_path_factory.mktemp("compared") / "sr.dcm"
    build_results(current, series.volume, series.datasets, options).sr.save_as(path, enforce_file_format=True)
    return prior, current, path


@pytest.mark.slow  # pixelmed: a JVM
def test_sr_with_a_prior_passes_the_validators(compared: tuple[Prior, Findings, Path]) -> None:
    path = compared[2]
    for check in (validate.pixelmed_sr, validate.dciodvfy, validate.dsrdump):
        result = require(check(path))
        assert result.ok, str(result)


def test_sr_reports_the_change_since_the_prior_and_references_it(
    compared: tuple[Prior, Findings, Path],
) -> None:
    prior, current, path = compared
    sr = pydicom.dcmread(path)
    rows = {(g, label): v for g, label, v, _ in sr_measurements(sr)}
    right_ml = next(m.value for m in current.measurements if m.segment == 1 and m.concept == VOLUME)
    assert rows[("Right lung", "volume change")] == pytest.approx(right_ml - right_ml / 1.1, abs=1e-3)
    assert rows[("Right lung", "volume change, relative")] == pytest.approx(10.0, abs=1e-3)
    assert rows[("Right lung", "Low attenuation area below -950 HU change")] == pytest.approx(2.5)
    assert rows[("Left lung", "volume change")] == pytest.approx(0.0, abs=1e-6)
    assert rows[("Both lungs", "volume change")] == pytest.approx(0.0, abs=1e-6)  # the total, unchanged
    assert ("Right lung", "mean density change") not in rows  # a mean: its Derivation is taken
    [other] = sr.PertinentOtherEvidenceSequence
    assert other.StudyInstanceUID == PRIOR_STUDY
    [series] = other.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == prior.sr_series_uid
    assert series.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == prior.sr_sop_instance_uid
    assert PRIOR_STUDY not in {s.StudyInstanceUID for s in sr.CurrentRequestedProcedureEvidenceSequence}
    comment = str(sr.ContentSequence[-1].ContentSequence[-1].TextValue)
    days = (datetime.date(2026, 1, 1) - datetime.date(2019, 1, 2)).days  # support.results' StudyDate
    assert comment == (
        f"Compared with the patient's prior study of {days} days earlier;"
        " its report is listed as Pertinent Other Evidence"
    )  # no UID, accession or date: the text stays in a de-identified export
    assert '(CHANGE_PRIOR,99RADGATE,"Change since prior study")' in require(validate.dsrdump(path)).output
    again = read_prior(sr)  # read as the next study's prior: its values, not its changes
    assert len(again.values) == len(prior.values)


def test_sr_says_why_nothing_was_compared(written: tuple[Series, Findings, ResultSet, Path, Path]) -> None:
    series, findings = written[0], written[1]
    note = "No prior study of the same kind on pacs"
    options = replace(OPTIONS, comparison_note=note)
    sr = build_results(findings, series.volume, series.datasets, options).sr
    assert "PertinentOtherEvidenceSequence" not in sr
    assert not [row for row in sr_measurements(sr) if "change" in row[1]]
    assert note in str(sr.ContentSequence[-1].ContentSequence[-1].TextValue)


def test_the_report_card_shows_the_change_in_brackets(
    written: tuple[Series, Findings, ResultSet, Path, Path], compared: tuple[Prior, Findings, Path]
) -> None:
    from dicom_io.results.sc import card_rows

    series, (prior, current, _) = written[0], compared
    rows = card_rows(make_context(current, series.volume, series.datasets, replace(OPTIONS, prior=prior)))
    texts = [(row.text, row.value) for row in rows]
    assert texts[0] == ("In brackets: the change since the prior study of 2019-01-02", "")
    right_ml = next(m.value for m in current.measurements if m.segment == 1 and m.concept == VOLUME)
    delta = format_value(right_ml - right_ml / 1.1, ML)
    assert ("Volume", f"{format_value(right_ml, ML)} (+{delta}, +10.0 %)") in texts
    assert not any(PRIOR_STUDY in f"{text} {value}" for text, value in texts)
