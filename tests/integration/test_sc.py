"""SC: valid Secondary Capture pictures, overlay where the anatomy is, square pixels, readable text.

Each test also saves its pictures as PNG under pytest's temporary folder, for a person to look at.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset
from support.results import ORGAN, TRACHEA, load_real, lung_findings, make_series, require
from support.testdata import TESTDATA, needs_testdata

from dicom_io.results import build_results
from dicom_io.testing import validate
from dicom_io.types import Findings, Segment

SC_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.7"


def _save(images: tuple[Dataset, ...], directory: Path) -> list[Path]:
    paths = []
    for ds in images:
        path = directory / f"sc{ds.InstanceNumber}.dcm"
        ds.save_as(path, enforce_file_format=True)
        Image.fromarray(pydicom.dcmread(path).pixel_array).save(path.with_suffix(".png"))
        paths.append(path)
    return paths


def test_key_image_and_report_card(tmp_path: Path) -> None:
    series = make_series("axial", shape=(12, 40, 48), spacing=(0.8, 0.6))
    findings = lung_findings(series.volume)
    images = build_results(findings, series.volume, series.datasets).sc
    assert len(images) == 2  # the slice with the most lung, then the report card
    source = series.datasets[0]
    for number, ds in enumerate(images, start=1):
        assert ds.SOPClassUID == SC_IMAGE_STORAGE and ds.InstanceNumber == number
        assert list(ds.ImageType) == ["DERIVED", "SECONDARY"]
        assert ds.BurnedInAnnotation == "YES" and ds.ConversionType == "WSD"
        assert ds.PhotometricInterpretation == "RGB" and ds.SamplesPerPixel == 3
        assert ds.SeriesNumber == source.SeriesNumber + 1002
        assert ds.SeriesDescription == "radgate ct-lung key images"
        for keyword in ("PatientName", "PatientID", "StudyInstanceUID", "AccessionNumber", "StudyDate"):
            assert ds[keyword].value == source[keyword].value
    assert len({ds.SeriesInstanceUID for ds in images}) == 1
    for path in _save(images, tmp_path):
        result = require(validate.dciodvfy(path))
        assert result.ok, str(result)


def test_overlay_lies_on_the_anatomy_with_square_pixels(tmp_path: Path) -> None:
    """Outline colour centred where the segment is in mm, on both axes: not shifted, not stretched."""
    series = make_series("axial", shape=(12, 40, 48), spacing=(0.8, 0.6))
    findings = lung_findings(series.volume)
    key = build_results(findings, series.volume, series.datasets).sc[0]
    _save((key,), tmp_path)
    pixels = key.pixel_array
    spacing = float(key.PixelSpacing[0])
    assert key.PixelSpacing[0] == key.PixelSpacing[1]
    _, row_mm, column_mm = series.volume.spacing
    assert pixels.shape[1] * spacing == pytest.approx(48 * column_mm, rel=0.01)
    for segment in findings.segments:
        k = int(key.ImageComments.split("slice ")[1]) - 1
        ys, xs = np.nonzero(segment.mask[k])
        expected = (np.array([ys.mean(), xs.mean()]) + 0.5) * np.array(
            [row_mm, column_mm]
        )  # mm from the corner
        hits = np.all(pixels == np.array(segment.color_rgb, dtype=np.uint8), axis=-1)
        hits[:64, :32] = False  # the legend's colour boxes
        found = (np.array(np.nonzero(hits)).mean(axis=1) + 0.5) * spacing
        np.testing.assert_allclose(found, expected, atol=1.5)
    # lung window: soft tissue (40 HU) renders near 189 of 255, air near 59
    grey = pixels[pixels.shape[0] // 2, 2]
    assert 45 <= grey[0] <= 75 and grey[0] == grey[1] == grey[2]


def test_nothing_found_gives_only_a_report_card(tmp_path: Path) -> None:
    series = make_series()
    findings = lung_findings(series.volume, empty=["Right lung", "Left lung"])
    images = build_results(findings, series.volume, series.datasets).sc
    assert len(images) == 1 and images[0].ImageComments == "Report card"
    (path,) = _save(images, tmp_path)
    assert require(validate.dciodvfy(path)).ok


@needs_testdata
@pytest.mark.parametrize("name", ["ct-abdomen-totalseg", "mr-brain-t1-mprage"])
def test_real_series_key_images(name: str, tmp_path: Path) -> None:
    """A blob on real CT and sagittal MR: valid pictures, the source's aspect kept (PNG to look at)."""
    datasets, volume = load_real(TESTDATA / name)
    z, y, x = volume.shape
    zz, yy, xx = np.ogrid[:z, :y, :x]
    mask = ((zz - z / 2) / (z / 4)) ** 2 + ((yy - y / 2) / (y / 6)) ** 2 + ((xx - x / 2) / (x / 8)) ** 2 <= 1
    findings = Findings(
        "test-" + name.split("-")[0],
        "1",
        volume.shape,
        (Segment(1, "Blob", ORGAN, TRACHEA, mask, color_rgb=(0, 255, 0)),),
    )
    images = build_results(findings, volume, datasets).sc
    assert len(images) == 2
    column_mm = volume.spacing[2]
    key = images[0]
    assert key.pixel_array.shape[1] * float(key.PixelSpacing[1]) == pytest.approx(x * column_mm, rel=0.01)
    for path in _save(images, tmp_path):
        assert require(validate.dciodvfy(path)).ok


def test_report_card_with_many_values_stays_above_the_disclaimer(tmp_path: Path) -> None:
    series = make_series()
    lungs = lung_findings(series.volume)
    extra = tuple(replace(m, value=m.value + i) for i in range(12) for m in lungs.measurements[:2])
    findings = replace(lungs, measurements=lungs.measurements + extra, notes=("A long note. " * 12,))
    card = build_results(findings, series.volume, series.datasets).sc[-1]
    _save((card,), tmp_path)
    pixels = card.pixel_array
    gap = pixels[768 - 104 : 768 - 93]  # between the table's last line and the disclaimer's rule
    assert (gap == gap[0, 0]).all(), "table text runs into the disclaimer"
