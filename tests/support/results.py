"""Shared builders for the results tests: small source series with known geometry, findings, validators.

The series are built here (not by dicom_io.testing.synthetic) so each test controls the exact geometry;
the datasets come back shuffled so nothing can map mask slices to sources by list position.
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from dicom_io.testing import validate
from dicom_io.types import Code, Findings, Measurement, Segment, SourceRef, Volume
from support.testdata import require_path, shared_tools_dir

ORGAN = Code("123037004", "SCT", "Anatomical Structure")
LUNG = Code("39607008", "SCT", "Lung")
TRACHEA = Code("44567001", "SCT", "Trachea")
EMPHYSEMA = Code("87433001", "SCT", "Pulmonary emphysema")
RIGHT = Code("24028007", "SCT", "Right")
LEFT = Code("7771000", "SCT", "Left")
VOLUME = Code("118565006", "SCT", "Volume")
ML = Code("cm3", "UCUM", "cubic centimeter")
ATTENUATION = Code("112031", "DCM", "Attenuation Coefficient")
HU = Code("[hnsf'U]", "UCUM", "Hounsfield unit")
MEAN = Code("373098007", "SCT", "Mean")
LAA = Code("RG-LAA950", "99RADGATE", "Low attenuation area below -950 HU")
PERCENT = Code("%", "UCUM", "percent")

ORIENTATIONS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "axial": ((1, 0, 0), (0, 1, 0)),
    "sagittal": ((0, 1, 0), (0, 0, -1)),
    "oblique": (
        (np.cos(0.3), np.sin(0.3), 0.0),
        (-np.sin(0.3) * np.cos(0.4), np.cos(0.3) * np.cos(0.4), -np.sin(0.4)),
    ),
}


@dataclass(frozen=True)
class Series:
    datasets: list[Dataset]  # shuffled
    volume: Volume


def make_series(
    orientation: str = "axial",
    shape: tuple[int, int, int] = (12, 40, 48),
    spacing: tuple[float, float] = (0.8, 0.6),
    slice_step: float = 2.5,
    modality: str = "CT",
    seed: int = 0,
) -> Series:
    """A CT (or MR) series whose voxels are a bright ellipsoid in air, with its exact Volume."""
    slices, rows, columns = shape
    row_dir, col_dir = (np.asarray(v, dtype=float) for v in ORIENTATIONS[orientation])
    normal = np.cross(row_dir, col_dir)
    origin = np.array([-100.0, -80.0, 50.0])
    affine = np.eye(4)
    affine[:3, 0] = row_dir * spacing[1]
    affine[:3, 1] = col_dir * spacing[0]
    affine[:3, 2] = normal * slice_step
    affine[:3, 3] = origin
    z, y, x = np.ogrid[:slices, :rows, :columns]
    body = ((z - slices / 2) / (slices / 2.2)) ** 2 + ((y - rows / 2) / (rows / 2.5)) ** 2 + (
        (x - columns / 2) / (columns / 2.5)
    ) ** 2 <= 1
    voxels = np.where(body, 40, -1000).astype(np.int16)
    study, series, frame_of_reference = generate_uid(), generate_uid(), generate_uid()
    datasets, refs = [], []
    for k in range(slices):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = CTImageStorage if modality == "CT" else "1.2.840.10008.5.1.4.1.1.4"
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame_of_reference
        ds.Modality = modality
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Test^Phantom", "PHANTOM1", "", "O"
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20260101", "120000", "1", "ACC1"
        ds.ReferringPhysicianName = ""
        ds.StudyDescription = "Phantom study"
        ds.SeriesNumber, ds.InstanceNumber = 3, slices - k  # instance numbers run against the normal
        ds.ImageOrientationPatient = [round(float(v), 6) for v in (*row_dir, *col_dir)]
        ds.ImagePositionPatient = [round(float(v), 4) for v in origin + k * slice_step * normal]
        ds.PixelSpacing = list(spacing)
        ds.SliceThickness = slice_step
        ds.Rows, ds.Columns = rows, columns
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        if modality == "CT":
            ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "HU"
            ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
            ds.KVP = 120
        ds.PixelData = voxels[k].tobytes()
        datasets.append(ds)
        refs.append(SourceRef(str(ds.SOPClassUID), str(ds.SOPInstanceUID)))
    volume = Volume(voxels, affine, tuple(refs), {"Modality": modality})
    random.Random(seed).shuffle(datasets)
    return Series(datasets, volume)


def ellipsoid(
    shape: tuple[int, int, int], centre: Sequence[float], radii: Sequence[float]
) -> npt.NDArray[np.bool_]:
    z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    return ((z - centre[0]) / radii[0]) ** 2 + ((y - centre[1]) / radii[1]) ** 2 + (
        (x - centre[2]) / radii[2]
    ) ** 2 <= 1


def lung_findings(volume: Volume, empty: Sequence[str] = (), overlap: bool = False) -> Findings:
    """Right and left lung (overlapping when `overlap`) with measurements; labels in `empty` not found.

    An `empty` label other than the lungs' is an extra segment (a structure looked for, not found).
    """
    shape = volume.shape
    z, y, x = shape
    masks = {
        "Right lung": ellipsoid(shape, (z / 2, y / 2, x * 0.3), (z / 3, y / 4, x / 6)),
        "Left lung": ellipsoid(shape, (z / 2, y / 2, x * (0.45 if overlap else 0.7)), (z / 3, y / 4, x / 6)),
    }
    for label in empty:
        masks[label] = np.zeros(shape, bool)
    segments = [
        Segment(
            1, "Right lung", ORGAN, LUNG, masks.pop("Right lung"), laterality=RIGHT, color_rgb=(80, 160, 255)
        ),
        Segment(
            2, "Left lung", ORGAN, LUNG, masks.pop("Left lung"), laterality=LEFT, color_rgb=(255, 170, 40)
        ),
    ]
    segments += [Segment(3 + i, label, ORGAN, TRACHEA, mask) for i, (label, mask) in enumerate(masks.items())]
    measurements = []
    for s in segments:
        if not s.is_empty:
            ml = float(s.mask.sum()) * volume.voxel_volume_ml
            measurements += [
                Measurement(VOLUME, round(ml, 3), ML, s.number),
                Measurement(ATTENUATION, -850.5, HU, s.number, MEAN),
                Measurement(LAA, 12.5, PERCENT, s.number),
            ]
    return Findings(
        "ct-lung", "1.2.0", shape, tuple(segments), tuple(measurements), summary_label="Both lungs"
    )


def read(path: Path) -> Dataset:
    return pydicom.dcmread(path)


def load_real(directory: Path) -> tuple[list[Dataset], Volume]:
    """A real series from the shared test data, through the node's own loader.

    The TotalSegmentator CT has empty SOP, study and series UIDs (its file meta carries the SOP ones):
    they are restored, because results cannot reference an instance, series or study without UIDs.
    """
    from dicom_io.volume import load_series

    datasets = []
    for path in sorted(directory.iterdir()):
        ds = pydicom.dcmread(path)
        for keyword, meta in (
            ("SOPInstanceUID", "MediaStorageSOPInstanceUID"),
            ("SOPClassUID", "MediaStorageSOPClassUID"),
        ):
            if not ds.get(keyword):
                setattr(ds, keyword, ds.file_meta[meta].value)
        for keyword in ("StudyInstanceUID", "SeriesInstanceUID"):
            if not ds.get(keyword):
                setattr(ds, keyword, generate_uid(entropy_srcs=[str(directory), keyword]))
        datasets.append(ds)
    return datasets, load_series(datasets)


def require(result: validate.Validation) -> validate.Validation:
    """Skip when the validator is not installed; fail when it is but did not validate anything."""
    if not result.ran:
        if any("not installed" in e for e in result.errors):
            pytest.skip(f"{result.tool} is not installed")
        pytest.fail(f"{result.tool} did not run: {result.errors}")
    return result


def check_frames_on_sources(seg: Dataset, sources: list[Dataset]) -> None:
    """Every frame's position/orientation equals that of the source image it derives from."""
    by_uid = {str(ds.SOPInstanceUID): ds for ds in sources}
    shared = seg.SharedFunctionalGroupsSequence[0]
    shared_orientation = shared.PlaneOrientationSequence[0].ImageOrientationPatient
    for number, frame in enumerate(seg.PerFrameFunctionalGroupsSequence, start=1):
        derivation = frame.DerivationImageSequence
        assert len(derivation) == 1 and len(derivation[0].SourceImageSequence) == 1, f"frame {number}"
        source = by_uid[derivation[0].SourceImageSequence[0].ReferencedSOPInstanceUID]
        position = frame.PlanePositionSequence[0].ImagePositionPatient
        np.testing.assert_allclose(
            np.array(position, float), np.array(source.ImagePositionPatient, float), atol=1e-3
        )
        np.testing.assert_allclose(
            np.array(shared_orientation, float), np.array(source.ImageOrientationPatient, float), atol=1e-5
        )


def check_masks(seg_path: Path, findings: Findings, volume: Volume) -> None:
    """highdicom reads back, per source instance, exactly the mask slice that came from it.

    Segments are matched by label: the SEG numbers them 1..n and may reorder overlapping ones.
    """
    import highdicom as hd

    seg = hd.seg.segread(seg_path)
    uids = [ref.sop_instance_uid for ref in volume.sources]
    pixels = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, segment_numbers=None)
    found = {s.label: s for s in findings.segments if not s.is_empty}
    labels = [str(item.SegmentLabel) for item in seg.SegmentSequence if item.SegmentNumber > 0]  # LABELMAP: 0
    assert sorted(labels) == sorted(found) and pixels.shape == (*volume.shape, len(found))
    for index, label in enumerate(labels):
        np.testing.assert_array_equal(pixels[..., index].astype(bool), found[label].mask, err_msg=label)


def viewercheck_tool() -> Path:
    """The viewercheck tool, copied and `npm ci`-ed once into the user's cache (the shared copy is read-only).

    RADGATE_CACHE overrides the cache folder (default ~/.cache/radgate). Skips when the shared tools
    folder is missing (a real-data skip) or npm cannot install it.
    """
    source = require_path(shared_tools_dir() / "viewercheck", "RADGATE_SHARED_TOOLS")
    cache = Path(os.environ.get("RADGATE_CACHE", Path.home() / ".cache" / "radgate"))
    try:
        return validate.prepare_viewercheck(source, cache)
    except (RuntimeError, OSError) as exc:
        pytest.skip(f"viewercheck cannot be installed here: {exc}")
