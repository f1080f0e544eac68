"""Result objects no source header can break: real CT headers mutated as seen in the field.

Every mutation is applied to the headers of a real CT series (the NSCLC chest CT, 16 of its slices,
and the J2K TotalSegmentator abdomen for some), the headers are written and read back (so values
arrive as raw bytes, as from a sender), and SEG, SR, SC and KOS are built with box findings of the
ct-lung structure on the real grid. Every object must pass dciodvfy with no Error line, the SR
DicomSRValidator and dsrdump, the objects must agree with each other (dcentvfy), and the one log
line per object must name what was repaired, never a patient value.
"""

from __future__ import annotations

import io
import logging
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag, Tag
from support.results import (
    ATTENUATION,
    EMPHYSEMA,
    HU,
    LAA,
    LEFT,
    LUNG,
    MEAN,
    ML,
    ORGAN,
    PERCENT,
    RIGHT,
    VOLUME,
    load_real,
    require,
)
from support.testdata import TESTDATA, needs_testdata

from dicom_io.results import ResultError, ResultOptions, write_results
from dicom_io.testing import validate
from dicom_io.types import Code, Findings, Measurement, Segment, Volume

CHEST = TESTDATA / "ct-chest-nsclc-lung1-001" / "ct"
ABDOMEN = TESTDATA / "ct-abdomen-totalseg"
CHEST_SLICES = slice(60, 76)  # 16 real slices through both lungs keep every build fast
ALTERED = Code("49755003", "SCT", "Morphologically Altered Structure")
LOGGER = "dicom_io.results.header"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
STUDY_CLASS = "1.2.840.10008.3.1.2.3.1"  # Detached Study Management, what such items usually name
PATIENT_CLASS = "1.2.840.10008.3.1.2.1.1"  # Detached Patient Management


@dataclass(frozen=True)
class Case:
    """A real series: its headers as Part 10 bytes (no pixels) and the Volume loaded from it."""

    headers: tuple[bytes, ...]
    volume: Volume
    findings: Findings


def _box_findings(volume: Volume) -> Findings:
    """Right lung, left lung and emphysema boxes with ct-lung's measurements (per lung and both)."""
    z, rows, columns = volume.shape
    masks = [np.zeros(volume.shape, bool) for _ in range(3)]
    masks[0][2 : z - 2, rows // 3 : 2 * rows // 3, columns // 6 : columns // 2 - 20] = True
    masks[1][2 : z - 2, rows // 3 : 2 * rows // 3, columns // 2 + 20 : 5 * columns // 6] = True
    masks[2][4 : z - 4, rows // 2 - 20 : rows // 2 + 20, columns // 4 : columns // 4 + 40] = True
    segments = (
        Segment(1, "Right lung", ORGAN, LUNG, masks[0], laterality=RIGHT, color_rgb=(128, 174, 128)),
        Segment(2, "Left lung", ORGAN, LUNG, masks[1], laterality=LEFT, color_rgb=(111, 184, 210)),
        Segment(3, "Emphysema (LAA-950)", ALTERED, EMPHYSEMA, masks[2], anatomic_region=LUNG),
    )
    measurements = []
    for number in (1, 2, None):
        voxels = int(masks[0].sum() + masks[1].sum()) if number is None else int(masks[number - 1].sum())
        measurements += [
            Measurement(VOLUME, voxels * volume.voxel_volume_ml, ML, number),
            Measurement(LAA, 4.5, PERCENT, number),
            Measurement(ATTENUATION, -845.0, HU, number, MEAN),
        ]
    return Findings(
        "ct-lung", "2.0.0", volume.shape, segments, tuple(measurements), summary_label="Both lungs"
    )


def _case(directory: Path, slices: slice | None = None) -> Case:
    datasets, volume = load_real(directory)
    if slices is not None:
        affine = volume.affine.copy()
        affine[:3, 3] += slices.start * affine[:3, 2]
        volume = Volume(volume.voxels[slices], affine, volume.sources[slices], volume.attributes)
    wanted = {ref.sop_instance_uid for ref in volume.sources}
    headers = []
    for ds in datasets:
        if str(ds.SOPInstanceUID) not in wanted:
            continue
        del ds.PixelData
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=False)
        headers.append(buffer.getvalue())
    return Case(tuple(headers), volume, _box_findings(volume))


@pytest.fixture(scope="module")
def cases() -> dict[str, Case]:
    """Each real series read once for the whole module."""
    return {"chest": _case(CHEST, CHEST_SLICES), "abdomen-j2k": _case(ABDOMEN)}


def _sources(case: Case, mutate: Callable[[Dataset], None], as_read: bool = False) -> list[Dataset]:
    """The case's headers mutated, written and read back: values arrive as raw bytes, as from a sender.

    as_read: mutate the dataset as read instead (the raw-byte cases: pydicom would re-encode text
    written under a changed Specific Character Set).
    """
    sources = []
    for header in case.headers:
        ds = pydicom.dcmread(io.BytesIO(header))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warns about the invalid values we set on purpose
            if not as_read:
                mutate(ds)
                buffer = io.BytesIO()
                ds.save_as(buffer, enforce_file_format=False)
                ds = pydicom.dcmread(io.BytesIO(buffer.getvalue()))
            else:
                mutate(ds)
        sources.append(ds)
    return sources


def _item(**values: object) -> Dataset:
    item = Dataset()
    for keyword, value in values.items():
        setattr(item, keyword, value)
    return item


def _raw(ds: Dataset, keyword: str, vr: str, value: bytes) -> None:
    """Set an element to exact bytes, unconverted and unchecked: pydicom writes them unchanged."""
    tag = Tag(keyword)
    ds[tag] = RawDataElement(tag, vr, len(value), value, 0, False, True)


# --- the mutations -----------------------------------------------------------------------------------


def _philips_study_reference(ds: Dataset) -> None:
    """The Philips chest CT of issue 14: a study reference item without its SOP Class UID."""
    ds.ReferencedStudySequence = Sequence(
        [
            _item(ReferencedSOPInstanceUID="1.3.46.670589.33.1.1"),
            _item(ReferencedSOPClassUID=STUDY_CLASS, ReferencedSOPInstanceUID="1.3.46.670589.33.1.2"),
        ]
    )


def _patient_reference_incomplete(ds: Dataset) -> None:
    ds.ReferencedPatientSequence = Sequence([_item(ReferencedSOPClassUID=PATIENT_CLASS)])


def _request_attributes_incomplete(ds: Dataset) -> None:
    code = _item(CodeValue="CTCHEST", CodingSchemeDesignator="99LOCAL")  # no CodeMeaning
    ds.RequestAttributesSequence = Sequence(
        [_item(RequestedProcedureID="", ScheduledProtocolCodeSequence=Sequence([code]))]
    )


def _set(**values: object) -> Callable[[Dataset], None]:
    def mutate(ds: Dataset) -> None:
        for keyword, value in values.items():
            setattr(ds, keyword, value)

    return mutate


def _delete(*keywords: str) -> Callable[[Dataset], None]:
    def mutate(ds: Dataset) -> None:
        for keyword in keywords:
            if keyword in ds:
                delattr(ds, keyword)

    return mutate


def _latin1_names(ds: Dataset) -> None:
    ds.SpecificCharacterSet = "ISO_IR 100"
    _raw(ds, "PatientName", "PN", "Müller^Jürgen".encode("latin_1"))
    _raw(ds, "ReferringPhysicianName", "PN", "Gérard^Zoë".encode("latin_1"))
    _raw(ds, "StudyDescription", "LO", "Thorax Größe".encode("latin_1"))


def _japanese(ds: Dataset) -> None:
    ds.SpecificCharacterSet = ["", "ISO 2022 IR 87"]
    ds.PatientName = "Yamada^Tarou=山田^太郎=やまだ^たろう"


def _long_utf8(ds: Dataset) -> None:
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientName = "Yamada^Tarou=" + "山" * 10 + "^" + "太" * 5 + "=" + "や" * 10 + "^" + "た" * 5
    ds.StudyDescription = "é" * 40
    ds.StudyID = "ü" * 10


def _latin1_bytes_declared_utf8(ds: Dataset) -> None:
    ds.SpecificCharacterSet = "ISO_IR 192"
    _raw(ds, "PatientName", "PN", "Müller^Jürgen".encode("latin_1"))


def _utf8_bytes_declared_latin1(ds: Dataset) -> None:
    ds.SpecificCharacterSet = "ISO_IR 100"
    _raw(ds, "PatientName", "PN", "Müller^Jürgen".encode())


def _unknown_character_set(ds: Dataset) -> None:
    ds.SpecificCharacterSet = "LATIN1"
    _raw(ds, "PatientName", "PN", "Müller^Jürgen".encode("latin_1"))


def _private_tags(ds: Dataset) -> None:
    block = ds.private_block(0x0029, "RADGATE TEST", create=True)
    block.add_new(0x10, "LO", "private text")
    nested = Dataset()
    nested.private_block(0x0029, "RADGATE TEST", create=True).add_new(0x11, "SH", "deeper")
    block.add_new(0x12, "SQ", Sequence([nested]))
    item = _item(ReferencedSOPClassUID=STUDY_CLASS, ReferencedSOPInstanceUID="1.2.3.4")
    item.private_block(0x0009, "RADGATE TEST", create=True).add_new(0x10, "LO", "inside an item")
    ds.ReferencedStudySequence = Sequence([item])


def _invalid_reference_uids(ds: Dataset) -> None:
    ds.ReferencedStudySequence = Sequence(
        [_item(ReferencedSOPClassUID=STUDY_CLASS, ReferencedSOPInstanceUID="1.2.3.abc")]
    )
    ds.ReferencedPatientSequence = Sequence(
        [_item(ReferencedSOPClassUID=PATIENT_CLASS, ReferencedSOPInstanceUID="1.2.03.4")]
    )


def _bad_numbers(ds: Dataset) -> None:
    _raw(ds, "PatientAge", "AS", b"45")
    _raw(ds, "PatientSize", "DS", b"1,75")
    _raw(ds, "PatientWeight", "DS", b"abc ")


def _clinical_trial_incomplete(ds: Dataset) -> None:
    ds.ClinicalTrialSponsorName = ""  # Type 1, empty
    ds.ClinicalTrialProtocolID = "P-1"
    ds.ClinicalTrialSubjectID = "S-1"
    ds.ClinicalTrialTimePointID = "TP1"


def _other_patient_ids(ds: Dataset) -> None:
    ds.OtherPatientIDsSequence = Sequence(
        [
            _item(PatientID="", TypeOfPatientID="TEXT"),
            _item(PatientID="H-42", IssuerOfPatientID="HOSP", TypeOfPatientID="TEXT"),
            _item(PatientID="H-43", TypeOfPatientID="PAPER"),
        ]
    )


def _uncopied_garbage(ds: Dataset) -> None:
    """Patient/study attributes we do not copy, each broken: none may reach a result."""
    ds.EthnicGroup = "E" * 30
    ds.PatientComments = "line\x01one"
    ds.NameOfPhysiciansReadingStudy = "R" * 80
    ds.ProcedureCodeSequence = Sequence([_item(CodeValue="X")])
    ds.AdmittingDiagnosesDescription = "D" * 80
    ds.OtherPatientIDs = "O" * 80


def _equipment_defects(ds: Dataset) -> None:
    _raw(ds, "Manufacturer", "LO", b"SIEMENS " + b"M" * 62)
    _raw(ds, "StationName", "SH", b"CT-SCANNER-ROOM-12")
    _raw(ds, "InstitutionName", "LO", "Universitätsspital Basel".encode("latin_1"))  # ISO_IR 100: valid
    _raw(ds, "AcquisitionDateTime", "DT", b"2023-01-01 10:00")
    _raw(ds, "SoftwareVersions", "LO", b"VG60A\\" + b"V" * 70)


def _acquisition_equipment_checked(objects: list[Dataset]) -> None:
    """The SEG lists the source's scanner as acquisition equipment, with the checked values."""
    seg = next(ds for ds in objects if ds.Modality == "SEG")
    item = next(
        i
        for i in seg.ContributingEquipmentSequence
        if i.PurposeOfReferenceCodeSequence[0].CodeValue == "109101"
    )
    assert item.Manufacturer == "SIEMENS " + "M" * 56
    assert item.StationName == "CT-SCANNER-ROOM-"
    assert item.InstitutionName == "Universitätsspital Basel"
    assert "ContributionDateTime" not in item
    assert list(item.SoftwareVersions) == ["VG60A", "V" * 64]


@dataclass(frozen=True)
class Mutation:
    """One field defect: how to make it, what the results must carry, what their log line must say."""

    name: str
    mutate: Callable[[Dataset], None]
    expected: dict[str, object]  # keyword -> value every object carries (None: absent)
    logged: tuple[str, ...] = ()  # in each object's log line; () means no line at all
    secret: str | None = None  # a patient value that must never reach the log
    check: Callable[[list[Dataset]], None] | None = None  # more assertions on the objects
    # DicomSRValidator on the SR too, one per kind of defect: pixelmed reads each SR; its template pass
    # (about 6 s) runs once per distinct content tree, here once (see PixelmedSrValidator.java)
    pixelmed: bool = False
    as_read: bool = False  # raw bytes set on the dataset as read (see _sources)


MUTATIONS = (
    Mutation(
        "referenced-study-item-without-class",
        _philips_study_reference,
        {"ReferencedStudySequence": [(STUDY_CLASS, "1.3.46.670589.33.1.2")]},
        ("ReferencedStudySequence item 1 dropped (ReferencedSOPClassUID missing)",),
        pixelmed=True,
    ),
    Mutation(
        "referenced-patient-item-incomplete",
        _patient_reference_incomplete,
        {"ReferencedPatientSequence": None},
        ("ReferencedPatientSequence item 1 dropped (ReferencedSOPInstanceUID missing)",),
    ),
    Mutation(
        "request-attributes-incomplete", _request_attributes_incomplete, {"RequestAttributesSequence": None}
    ),
    Mutation(
        "long-study-description",
        _set(StudyDescription="Thorax " + "x" * 63),
        {"StudyDescription": "Thorax " + "x" * 57},
        ("StudyDescription truncated to the 64 bytes LO allows",),
    ),
    Mutation(
        "long-study-id",
        _set(StudyID="S" * 20),
        {"StudyID": ""},
        ("StudyID emptied (longer than the 16 bytes SH allows)",),
    ),
    Mutation(
        "long-accession-number",
        _set(AccessionNumber="A" * 20),
        {"AccessionNumber": ""},
        ("AccessionNumber emptied (longer than the 16 bytes SH allows)",),
    ),
    Mutation(
        "long-person-name",
        _set(PatientName="F" * 70 + "^G^M^P^S^X^Y", ReferringPhysicianName="R" * 65 + "^Ref"),
        {"PatientName": "F" * 64, "ReferringPhysicianName": "R" * 64},
        (
            "PatientName components beyond 5 dropped, truncated to the 64 bytes PN allows",
            "ReferringPhysicianName truncated to the 64 bytes PN allows",
        ),
        secret="F" * 64,
        pixelmed=True,
    ),
    Mutation(
        "long-issuer-of-patient-id",
        _set(IssuerOfPatientID="I" * 70),
        {"IssuerOfPatientID": None},
        ("IssuerOfPatientID dropped (longer than the 64 bytes LO allows)",),
    ),
    Mutation(
        "latin-1-names",
        _latin1_names,
        {
            "PatientName": "Müller^Jürgen",
            "ReferringPhysicianName": "Gérard^Zoë",
            "StudyDescription": "Thorax Größe",
        },
        pixelmed=True,
        as_read=True,
    ),
    Mutation(
        "japanese-iso-2022-ir-87",
        _japanese,
        {"PatientName": "Yamada^Tarou=山田^太郎=やまだ^たろう"},
        pixelmed=True,
    ),
    Mutation(
        "utf-8-text-over-its-byte-limit",
        _long_utf8,
        {
            "PatientName": "Yamada^Tarou=" + "山" * 10 + "^" + "太" * 5,
            "StudyDescription": "é" * 32,
            "StudyID": "",
        },
        (
            "PatientName component groups dropped to fit 64 bytes",
            "StudyDescription truncated to the 64 bytes LO allows",
            "StudyID emptied (longer than the 16 bytes SH allows)",
        ),
    ),
    Mutation(
        "bytes-invalid-for-declared-utf-8",
        _latin1_bytes_declared_utf8,
        {"PatientName": "Müller^Jürgen"},
        ("PatientName bytes not valid in SpecificCharacterSet ISO_IR 192, read as Latin-1",),
        secret="Müller",
        as_read=True,
    ),
    Mutation(
        "utf-8-declared-latin-1",
        _utf8_bytes_declared_latin1,
        {"PatientName": "Müller^Jürgen"},
        ("PatientName UTF-8 bytes under SpecificCharacterSet ISO_IR 100, read as UTF-8",),
        secret="Müller",
        as_read=True,
    ),
    Mutation(
        "unknown-character-set",
        _unknown_character_set,
        {"PatientName": "Müller^Jürgen"},
        ("PatientName bytes not valid in SpecificCharacterSet LATIN1, read as Latin-1",),
        as_read=True,
    ),
    Mutation(
        "invalid-dates-and-times",
        _set(StudyDate="20231345", PatientBirthDate="2023-01-01", StudyTime="25:61:00"),
        {"StudyDate": "", "PatientBirthDate": "20230101", "StudyTime": ""},
        (
            "StudyDate emptied (not a valid date)",
            "PatientBirthDate ACR-NEMA date form rewritten",
            "StudyTime emptied (not a valid time)",
        ),
        pixelmed=True,
    ),
    Mutation(
        "colon-time-with-fraction",
        _set(StudyTime="14:30:00.123456"),
        {"StudyTime": "143000.123456"},
        ("StudyTime ACR-NEMA time form rewritten",),
    ),
    Mutation(
        "patient-sex-word",
        _set(PatientSex="Male"),
        {"PatientSex": ""},
        ("PatientSex emptied (not one of M, F, O)",),
    ),
    Mutation("patient-sex-unknown", _set(PatientSex="U"), {"PatientSex": ""}, ("PatientSex emptied",)),
    Mutation(
        "missing-study-id-and-accession",
        _delete("StudyID", "AccessionNumber"),
        {"StudyID": "", "AccessionNumber": ""},
        ("StudyID missing, written empty", "AccessionNumber missing, written empty"),
    ),
    Mutation(
        "missing-patient-name-and-id",
        _delete("PatientName", "PatientID"),
        {"PatientName": "", "PatientID": ""},
        ("PatientName missing, written empty", "PatientID missing, written empty"),
        pixelmed=True,
    ),
    Mutation(
        "private-tags-and-sequences",
        _private_tags,
        {"ReferencedStudySequence": [(STUDY_CLASS, "1.2.3.4")]},
        pixelmed=True,
    ),
    Mutation(
        "bad-patient-age-size-weight",
        _bad_numbers,
        {"PatientAge": None, "PatientSize": None, "PatientWeight": None},
        ("PatientAge dropped (not an age", "PatientSize dropped", "PatientWeight dropped"),
        as_read=True,
        pixelmed=True,
    ),
    Mutation(
        "invalid-uids-in-references",
        _invalid_reference_uids,
        {"ReferencedStudySequence": None, "ReferencedPatientSequence": None},
        ("ReferencedStudySequence item 1 dropped (ReferencedSOPInstanceUID not a valid UID)",),
    ),
    Mutation(
        "clinical-trial-empty-type-1",
        _clinical_trial_incomplete,
        {"ClinicalTrialSponsorName": None, "ClinicalTrialSubjectID": None, "ClinicalTrialTimePointID": "TP1"},
        ("Clinical Trial Subject module dropped (ClinicalTrialSponsorName empty)",),
    ),
    Mutation(
        "other-patient-ids-incomplete",
        _other_patient_ids,
        {"OtherPatientIDsSequence": [("H-42", "HOSP", "TEXT")]},
        (
            "OtherPatientIDsSequence item 1 dropped (PatientID empty)",
            "item 3 dropped (TypeOfPatientID not one",
        ),
    ),
    Mutation(
        "uncopied-patient-study-attributes",
        _uncopied_garbage,
        dict.fromkeys(
            (
                "EthnicGroup",
                "PatientComments",
                "NameOfPhysiciansReadingStudy",
                "ProcedureCodeSequence",
                "AdmittingDiagnosesDescription",
                "OtherPatientIDs",
            )
        ),
    ),
    Mutation(
        "source-equipment-defects",
        _equipment_defects,
        {"Manufacturer": "radgate", "InstitutionName": None},
        (
            "Manufacturer truncated to the 64 bytes LO allows",
            "StationName truncated to the 16 bytes SH allows",
            "AcquisitionDateTime dropped (not a valid date-time)",
            "SoftwareVersions truncated",
        ),
        check=_acquisition_equipment_checked,
        as_read=True,
    ),
    Mutation(
        "several-values-in-a-name",
        _set(PatientName="Doe^John\\Roe^Richard"),
        {"PatientName": ""},
        ("PatientName emptied (several values where one is allowed)",),
        secret="Doe",
    ),
    Mutation(
        "control-characters",
        _set(StudyDescription="Chest\tCT\x01low dose"),
        {"StudyDescription": "Chest CT low dose"},
        ("StudyDescription control characters replaced",),
    ),
)
J2K_MUTATIONS = (
    "referenced-study-item-without-class",
    "latin-1-names",
    "invalid-dates-and-times",
    "private-tags-and-sequences",
)
PARAMETERS = [
    pytest.param("chest", m, id=f"chest-{m.name}", marks=[pytest.mark.slow] if m.pixelmed else [])
    for m in MUTATIONS
] + [pytest.param("abdomen-j2k", m, id=f"abdomen-j2k-{m.name}") for m in MUTATIONS if m.name in J2K_MUTATIONS]


def _tags(ds: Dataset) -> Iterator[BaseTag]:
    """Every tag of ds and of its sequences' items, at any depth.

    Only elements that are or may be sequences are read (converted): an element written with a VR
    other than SQ or UN is not one, and its value is not needed.
    """
    for tag in ds.keys():  # noqa: SIM118 (iterating a Dataset reads every element)
        yield tag
        if ds.get_item(tag).VR in ("SQ", "UN", None) and ds[tag].VR == "SQ":
            for item in ds[tag].value:
                yield from _tags(item)


def _check_value(ds: Dataset, keyword: str, expected: object) -> None:
    where = f"{ds.Modality} {keyword}"
    if expected is None:
        assert keyword not in ds, where
        return
    assert keyword in ds, where
    value = ds[keyword].value
    if keyword == "ReferencedStudySequence":
        assert [(i.ReferencedSOPClassUID, i.ReferencedSOPInstanceUID) for i in value] == expected, where
    elif keyword == "OtherPatientIDsSequence":
        assert [(i.PatientID, i.get("IssuerOfPatientID"), i.TypeOfPatientID) for i in value] == expected, (
            where
        )
    else:
        assert str(value or "") == expected, where


@needs_testdata
@pytest.mark.parametrize(("case_name", "mutation"), PARAMETERS)
def test_mutated_header_gives_valid_objects(
    cases: dict[str, Case],
    case_name: str,
    mutation: Mutation,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    case = cases[case_name]
    sources = _sources(case, mutation.mutate, mutation.as_read)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        paths = write_results(case.findings, case.volume, sources, tmp_path, ResultOptions(write_kos=True))
    kinds = sorted(path.name.split("-")[0] for path in paths)
    assert kinds == ["KO", "SC", "SC", "SEG", "SR"]
    for path in paths:
        result = require(validate.dciodvfy(path))
        assert result.ok, f"{path.name}: {result}"
        if path.name.startswith(("SR", "KO")):
            dump = require(validate.dsrdump(path))
            assert dump.ok, f"{path.name}: {dump}"
    if mutation.pixelmed and case_name == "chest":
        sr = next(path for path in paths if path.name.startswith("SR"))
        report = require(validate.pixelmed_sr(sr))
        assert report.ok, str(report)
    consistent = require(validate.dcentvfy(paths))
    assert consistent.ok, str(consistent)

    objects = [pydicom.dcmread(path) for path in paths]
    for ds in objects:
        assert ds.SpecificCharacterSet == "ISO_IR 192"
        assert ds.StudyInstanceUID == sources[0].StudyInstanceUID
        assert not [tag for tag in _tags(ds) if tag.is_private], ds.Modality
        for keyword, expected in mutation.expected.items():
            _check_value(ds, keyword, expected)
    if mutation.check is not None:
        mutation.check(objects)

    records = [r for r in caplog.records if r.name == LOGGER]
    if not mutation.logged:
        assert not records, [r.getMessage() for r in records]
        return
    assert len(records) == len(objects)  # one line per object, in the order they were built
    for record, ds in zip(records, objects, strict=True):
        message = record.getMessage()
        assert message.startswith(f"{ds.Modality} {ds.SOPInstanceUID}: "), message
        for expected in mutation.logged:
            assert expected in message, message
    if mutation.secret:
        assert mutation.secret not in caplog.text


@needs_testdata
@pytest.mark.parametrize(
    ("keyword", "value"),
    [
        ("FrameOfReferenceUID", ""),
        ("StudyInstanceUID", ""),
        ("StudyInstanceUID", "1.2.840.abc"),
        ("FrameOfReferenceUID", "1." + "2" * 70),
    ],
    ids=[
        "empty-frame-of-reference",
        "empty-study-uid",
        "study-uid-with-letters",
        "frame-of-reference-too-long",
    ],
)
def test_identity_that_cannot_be_repaired_fails_clearly(
    cases: dict[str, Case], keyword: str, value: str, tmp_path: Path
) -> None:
    """No result files into a study or frame of reference it cannot name: ResultError, nothing written.

    A generated Frame of Reference UID would claim a geometry the source does not share, so an empty one
    is not repaired.
    """
    case = cases["chest"]
    sources = _sources(case, _set(**{keyword: value}))
    with pytest.raises(ResultError, match=keyword):
        write_results(case.findings, case.volume, sources, tmp_path)
    assert not list(tmp_path.iterdir())


@needs_testdata
def test_unmutated_headers_round_trip(
    cases: dict[str, Case], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The real CT's patient and study values reach every object unchanged, and nothing is logged."""
    import highdicom as hd

    case = cases["chest"]
    sources = _sources(case, lambda ds: None)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        paths = write_results(case.findings, case.volume, sources, tmp_path, ResultOptions(write_kos=True))
    assert not [r for r in caplog.records if r.name == LOGGER]
    # the header comes from the first slice (this CT's slices differ in StudyTime)
    source = next(ds for ds in sources if ds.SOPInstanceUID == case.volume.sources[0].sop_instance_uid)
    seg = hd.seg.segread(next(p for p in paths if p.name.startswith("SEG")))
    sr = hd.sr.srread(next(p for p in paths if p.name.startswith("SR")))
    others = [pydicom.dcmread(p) for p in paths if p.name.startswith(("SC", "KO"))]
    copied = (
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientSex",
        "StudyInstanceUID",
        "StudyDate",
        "StudyTime",
        "StudyID",
        "AccessionNumber",
        "ReferringPhysicianName",
        "StudyDescription",
        "PatientIdentityRemoved",
        "DeidentificationMethod",
    )
    for ds in (seg, sr, *others):
        for keyword in copied:
            assert ds[keyword].value == source[keyword].value, f"{ds.Modality} {keyword}"
        assert ds.DeidentificationMethodCodeSequence[0].CodeValue == (
            source.DeidentificationMethodCodeSequence[0].CodeValue
        )
        assert "PatientComments" not in ds  # patient level, not needed by our IODs: not copied
    assert seg.PatientName == "LUNG1-001"
