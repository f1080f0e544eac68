"""A chest CT study as a PACS sends it, built from the real LUNG1-001 CT in shared/testdata.

The real series (Siemens, kernel B19f, 3 mm) is the soft-kernel reconstruction. Derived from it
with pydicom, in the same study: a sharp-kernel (B70f) reconstruction of the same slices, a
one-slice localizer (topogram), a Radiation Dose SR, Siemens' "Patient Protocol" dose screen
(a DERIVED\\SECONDARY secondary capture with Modality CT), and radgate's own results (SEG, SR, SC)
of an earlier run, made by `dicom_io.results`, coming back into the study.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    ExplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
    XRayRadiationDoseSRStorage,
    generate_uid,
)

from dicom_io.results import ResultOptions, write_results
from dicom_io.types import Code, Findings, Segment
from dicom_io.volume import load_series

LUNG1 = "ct-chest-nsclc-lung1-001"
SCT = "SCT"


@dataclass(frozen=True)
class ChestStudy:
    """The study's files and the SeriesInstanceUID of each of its series."""

    study_uid: str
    soft: str
    sharp: str
    scout: str
    dose_sr: str
    protocol: str
    results: tuple[str, ...]
    files: tuple[Path, ...]


def _z(ds: Dataset) -> float:
    return float(ds.ImagePositionPatient[2])


def _new_series(ds: Dataset, series_uid: str, number: int, description: str) -> Dataset:
    """A copy of `ds` in another series with a new SOP Instance UID."""
    out = copy.deepcopy(ds)
    out.SeriesInstanceUID = series_uid
    out.SeriesNumber = number
    out.SeriesDescription = description
    out.SOPInstanceUID = out.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    return out


def _meta(sop_class: str, sop_uid: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    return meta


def _study_level(source: Dataset, out: Dataset) -> None:
    for keyword in (
        "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate",
        "StudyTime", "StudyID", "AccessionNumber", "ReferringPhysicianName", "StudyDescription",
    ):  # fmt: skip
        if keyword in source:
            setattr(out, keyword, source.data_element(keyword).value)


def _new_instance(
    source: Dataset, sop_class: str, modality: str, series_number: int, description: str
) -> Dataset:
    """The one instance of a new series in `source`'s study."""
    ds = Dataset()
    ds.file_meta = _meta(sop_class, generate_uid())
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    _study_level(source, ds)
    ds.Modality = modality
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = series_number
    ds.SeriesDescription = description
    ds.InstanceNumber = 1
    return ds


def _dose_sr(source: Dataset) -> Dataset:
    """A Radiation Dose SR's header and root container (TID 10011), as a CT scanner sends it."""
    ds = _new_instance(source, XRayRadiationDoseSRStorage, "SR", 502, "Dose Report")
    ds.Manufacturer = "SIEMENS"
    ds.ValueType = "CONTAINER"
    concept = Dataset()
    concept.CodeValue, concept.CodingSchemeDesignator = "113701", "DCM"
    concept.CodeMeaning = "X-Ray Radiation Dose Report"
    ds.ConceptNameCodeSequence = [concept]
    ds.ContinuityOfContent = "SEPARATE"
    ds.CompletionFlag = "COMPLETE"
    ds.VerificationFlag = "UNVERIFIED"
    ds.ContentSequence = []
    return ds


def _protocol_screen(source: Dataset) -> Dataset:
    """Siemens' "Patient Protocol": a dose screen stored as a secondary capture with Modality CT."""
    ds = _new_instance(source, SecondaryCaptureImageStorage, "CT", 501, "Patient Protocol")
    ds.BodyPartExamined = source.get("BodyPartExamined", "CHEST")
    ds.ImageType = ["DERIVED", "SECONDARY", "OTHER"]
    ds.ConversionType = "SYN"
    ds.Rows = ds.Columns = 64
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = np.zeros((64, 64), dtype=np.uint8).tobytes()
    return ds


def _earlier_results(files: list[Path], out: Path) -> list[Path]:
    """radgate's SEG, SR and SC of an earlier run on these files (a lung-like mask: air in the body)."""
    volume = load_series(files)
    voxels = np.asarray(volume.voxels)
    mask = voxels < -500
    mask[:, :40, :] = mask[:, -40:, :] = False  # outside the body, roughly
    mask[:, :, :40] = mask[:, :, -40:] = False
    lung = Segment(
        1, "Lung", Code("123037004", SCT, "Anatomical Structure"), Code("39607008", SCT, "Lung"), mask
    )
    findings = Findings("ct-lung", "0.9.0", volume.shape, (lung,), key_slices=(volume.shape[0] // 2,))
    sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    return write_results(findings, volume, sources, out, ResultOptions(uid_seed="an earlier run"))


def chest_study(testdata: Path, out: Path, slices: int | None = None) -> ChestStudy:
    """Write the study under `out` (one folder per series); `slices`: the central ones only."""
    sources = sorted((pydicom.dcmread(f) for f in (testdata / LUNG1 / "ct").glob("*.dcm")), key=_z)
    if slices is not None:
        start = (len(sources) - slices) // 2
        sources = sources[start : start + slices]
    first = sources[0]
    study_uid = str(first.StudyInstanceUID)
    written: list[Path] = []

    def save(folder: str, datasets: list[Dataset]) -> list[Path]:
        (out / folder).mkdir(parents=True, exist_ok=True)
        paths = []
        for ds in datasets:
            path = out / folder / f"{ds.SOPInstanceUID}.dcm"
            ds.save_as(path, enforce_file_format=True)
            paths.append(path)
        written.extend(paths)
        return paths

    soft = [_new_series(ds, str(first.SeriesInstanceUID), 2, "Thorax 3.0 B19f") for ds in sources]
    for ds, source in zip(soft, sources, strict=True):  # the real series, its UIDs kept
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = source.SOPInstanceUID
    soft_files = save("soft", soft)

    sharp_uid = generate_uid()
    sharp = [_new_series(ds, sharp_uid, 3, "Thorax 3.0 B70f") for ds in sources]
    for ds in sharp:
        ds.ConvolutionKernel = "B70f"
    save("sharp", sharp)

    scout = _new_series(sources[len(sources) // 2], generate_uid(), 1, "Topogram 0.6 T20s")
    scout.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER", "CT_SOM5 TOP"]
    scout.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
    scout.ConvolutionKernel = "T20s"
    scout.SliceThickness = 0.6
    save("scout", [scout])

    dose = _dose_sr(first)
    protocol = _protocol_screen(first)
    save("dose", [dose, protocol])

    results = _earlier_results(soft_files, out / "results")
    written.extend(results)
    result_series = {str(pydicom.dcmread(f, stop_before_pixels=True).SeriesInstanceUID) for f in results}
    return ChestStudy(
        study_uid=study_uid,
        soft=str(first.SeriesInstanceUID),
        sharp=sharp_uid,
        scout=str(scout.SeriesInstanceUID),
        dose_sr=str(dose.SeriesInstanceUID),
        protocol=str(protocol.SeriesInstanceUID),
        results=tuple(sorted(result_series)),
        files=tuple(written),
    )


@dataclass(frozen=True)
class OneSeriesStudy:
    """A study of one CT series: its UIDs and files."""

    study_uid: str
    series_uid: str
    files: tuple[Path, ...]


def ct_visit(
    testdata: Path, out: Path, slices: int, study_date: str, accession: str, offset: int = 0
) -> OneSeriesStudy:
    """The real LUNG1-001 CT's central `slices` (moved by `offset` slices) as a study of its own:
    new Study, Series and SOP Instance UIDs, the same patient, dated `study_date` (another visit)."""
    sources = sorted((pydicom.dcmread(f) for f in (testdata / LUNG1 / "ct").glob("*.dcm")), key=_z)
    start = (len(sources) - slices) // 2 + offset
    study_uid, series_uid = generate_uid(), generate_uid()
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for ds in sources[start : start + slices]:
        visit = _new_series(ds, series_uid, 2, "Thorax 3.0 B19f")
        visit.StudyInstanceUID = study_uid
        visit.StudyDate = visit.SeriesDate = visit.ContentDate = study_date
        visit.AccessionNumber = accession
        path = out / f"{visit.SOPInstanceUID}.dcm"
        visit.save_as(path, enforce_file_format=True)
        files.append(path)
    return OneSeriesStudy(study_uid, series_uid, tuple(files))


def reconstruction(visit: OneSeriesStudy, out: Path, kernel: str) -> OneSeriesStudy:
    """Another reconstruction of a visit's series, in the same study: a new series whose slices
    say they were made with `kernel` (the pixels are the same)."""
    series_uid = generate_uid()
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for path in visit.files:
        ds = _new_series(pydicom.dcmread(path), series_uid, 3, f"Thorax 3.0 {kernel}")
        ds.ConvolutionKernel = kernel
        copy_path = out / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(copy_path, enforce_file_format=True)
        files.append(copy_path)
    return OneSeriesStudy(visit.study_uid, series_uid, tuple(files))
