"""The patient and study attributes every result object copies from its source, checked and repaired once.

    read_header(source) -> Header      (raises ResultError when the study cannot be identified)
    Header.write(result)               the checked attributes onto a result, in UTF-8, + one log line
    Header.stand_in(source)            the source as highdicom may read it (its own copy is then clean)

Only the attributes in `MODULES` are copied: the Patient and General Study modules every IOD has,
and the Patient Study, de-identification and clinical-trial attributes when the source carries
them. Nothing else of the source's patient or study level, and no private tag, reaches a result.
The source's equipment (`SOURCE_EQUIPMENT`) is checked the same way for the stand-in only:
highdicom lists it as the acquisition equipment in a SEG's Contributing Equipment Sequence.

Each value is decoded with the source's Specific Character Set (a charset its bytes do not fit is
repaired), checked against its VR and VM (from pydicom's dictionary) and its type in the IOD, and
repaired or dropped:

- Type 1 invalid: a sequence item or an optional module is dropped whole; in the Patient or General
  Study module (StudyInstanceUID) a ResultError names the attribute, since no result could file
  into the source's study without it.
- Type 2: always written; missing or invalid means empty. Type 3: dropped when invalid.
- Text longer than its VR allows (in UTF-8 bytes, as dciodvfy counts) is truncated, except
  identifiers (patient ID, accession number, study ID, ...), which are treated as invalid: a
  shortened identifier would name someone else.
- Dates and times in the ACR-NEMA form (2023-01-01, 14:30:00.5) are rewritten; others are invalid.
- Code strings are upper-cased; Patient Sex other than M, F, O is invalid; control characters in
  names and strings become spaces.

The repairs are logged by attribute keyword and reason, never by value (no patient data in logs).
"""

from __future__ import annotations

import copy
import datetime as _dt
import logging
import math
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from pydicom.charset import convert_encodings, decode_bytes, python_encoding
from pydicom.datadict import dictionary_VM, dictionary_VR
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag, Tag
from pydicom.valuerep import PN_DELIMS, TEXT_VR_DELIMS

logger = logging.getLogger(__name__)

#: The character set every result object is written in: it holds any text any source held.
RESULT_CHARACTER_SET = "ISO_IR 192"


class ResultError(ValueError):
    """Findings that cannot be encoded against the given source (raised before anything is written)."""


@dataclass(frozen=True)
class Attribute:
    """One attribute we copy: its type in the IOD and, for a sequence, what each item must hold.

    identifier: a value too long for its VR is invalid rather than truncated.
    enumerated: the only values allowed (a code string).
    """

    keyword: str
    type: Literal["1", "2", "3"]
    items: tuple[Attribute, ...] = ()
    identifier: bool = False
    enumerated: tuple[str, ...] = ()


@dataclass(frozen=True)
class Module:
    """A module we copy: `required` ones always (Type 1 failures are errors), others when present.

    one_of: Type 1C attributes of which at least one must be copied, or the module is dropped.
    source_only: checked for highdicom's stand-in source only, never written onto our objects.
    """

    name: str
    attributes: tuple[Attribute, ...]
    required: bool = False
    one_of: tuple[str, ...] = ()
    source_only: bool = False


_REFERENCE_ITEM = (Attribute("ReferencedSOPClassUID", "1"), Attribute("ReferencedSOPInstanceUID", "1"))
_CODE_ITEM = (
    Attribute("CodeValue", "1"),
    Attribute("CodingSchemeDesignator", "1"),
    Attribute("CodingSchemeVersion", "3"),
    Attribute("CodeMeaning", "1"),
)

MODULES = (
    Module(
        "Patient",
        (
            Attribute("PatientName", "2"),
            Attribute("PatientID", "2", identifier=True),
            Attribute("IssuerOfPatientID", "3", identifier=True),
            Attribute("PatientBirthDate", "2"),
            Attribute("PatientSex", "2", enumerated=("M", "F", "O")),
            Attribute(
                "OtherPatientIDsSequence",
                "3",
                items=(
                    Attribute("PatientID", "1", identifier=True),
                    Attribute("IssuerOfPatientID", "3", identifier=True),
                    Attribute("TypeOfPatientID", "1", enumerated=("TEXT", "RFID", "BARCODE")),
                ),
            ),
            Attribute("ReferencedPatientSequence", "3", items=_REFERENCE_ITEM),
        ),
        required=True,
    ),
    Module(
        "Patient (de-identification)",
        (
            Attribute("PatientIdentityRemoved", "1", enumerated=("YES", "NO")),
            Attribute("DeidentificationMethod", "3"),
            Attribute("DeidentificationMethodCodeSequence", "3", items=_CODE_ITEM),
        ),
        one_of=("DeidentificationMethod", "DeidentificationMethodCodeSequence"),
    ),
    Module(
        "General Study",
        (
            Attribute("StudyInstanceUID", "1"),
            Attribute("StudyDate", "2"),
            Attribute("StudyTime", "2"),
            Attribute("ReferringPhysicianName", "2"),
            Attribute("StudyID", "2", identifier=True),
            Attribute("AccessionNumber", "2", identifier=True),
            Attribute("StudyDescription", "3"),
            Attribute("ReferencedStudySequence", "3", items=_REFERENCE_ITEM),
        ),
        required=True,
    ),
    Module(
        "Patient Study",
        (Attribute("PatientAge", "3"), Attribute("PatientSize", "3"), Attribute("PatientWeight", "3")),
    ),
    Module(
        "Clinical Trial Subject",
        (
            Attribute("ClinicalTrialSponsorName", "1"),
            Attribute("ClinicalTrialProtocolID", "1", identifier=True),
            Attribute("ClinicalTrialProtocolName", "2"),
            Attribute("ClinicalTrialSiteID", "2", identifier=True),
            Attribute("ClinicalTrialSiteName", "2"),
            Attribute("ClinicalTrialSubjectID", "3", identifier=True),
            Attribute("ClinicalTrialSubjectReadingID", "3", identifier=True),
        ),
        one_of=("ClinicalTrialSubjectID", "ClinicalTrialSubjectReadingID"),
    ),
    Module(
        "Clinical Trial Study",
        (
            Attribute("ClinicalTrialTimePointID", "2", identifier=True),
            Attribute("ClinicalTrialTimePointDescription", "3"),
        ),
    ),
)

#: The source's equipment, which highdicom puts into a SEG's (or source-evidenced SR's) Contributing
#: Equipment Sequence as the acquisition equipment: checked, but our objects' own equipment is the node.
SOURCE_EQUIPMENT = Module(
    "General Equipment",
    (
        Attribute("Manufacturer", "2"),
        Attribute("ManufacturerModelName", "3"),
        Attribute("SoftwareVersions", "3"),
        Attribute("DeviceSerialNumber", "3", identifier=True),
        Attribute("InstitutionName", "3"),
        Attribute("InstitutionalDepartmentName", "3"),
        Attribute("InstitutionAddress", "3"),
        Attribute("StationName", "3"),
        Attribute("AcquisitionDateTime", "3"),
    ),
    source_only=True,
)

# What highdicom would copy from a source's patient and study level besides our attributes: the
# groups of the Patient (0010), Clinical Trial (0012) and Visit (0038) attributes, and the study-level
# attributes of the General Study and Patient Study modules that live in other groups.
_PATIENT_STUDY_GROUPS = frozenset({0x0010, 0x0012, 0x0038})
_STUDY_LEVEL_KEYWORDS = (
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "IssuerOfAccessionNumberSequence",
    "ReferringPhysicianName",
    "ReferringPhysicianIdentificationSequence",
    "ConsultingPhysicianName",
    "ConsultingPhysicianIdentificationSequence",
    "StudyDescription",
    "ProcedureCodeSequence",
    "PhysiciansOfRecord",
    "PhysiciansOfRecordIdentificationSequence",
    "NameOfPhysiciansReadingStudy",
    "PhysiciansReadingStudyIdentificationSequence",
    "ReferencedStudySequence",
    "ReferencedPatientSequence",
    "RequestingService",
    "RequestingServiceCodeSequence",
    "ReasonForPerformedProcedureCodeSequence",
    "AdmittingDiagnosesDescription",
    "AdmittingDiagnosesCodeSequence",
    "ReasonForVisit",
    "ReasonForVisitCodeSequence",
    "SpecificCharacterSet",
)
_STUDY_LEVEL_TAGS = frozenset(Tag(keyword) for keyword in _STUDY_LEVEL_KEYWORDS)
_SOURCE_ONLY_TAGS = frozenset(Tag(a.keyword) for a in SOURCE_EQUIPMENT.attributes)

# Maximum lengths, counted in bytes of the UTF-8 we write: dciodvfy counts bytes (the standard says
# characters, which bytes never exceed), and it holds a whole PN value, not each group, to 64.
_MAX_BYTES = {"LO": 64, "SH": 16, "ST": 1024, "CS": 16, "DS": 16, "UI": 64, "PN": 64}
_UID = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")
_ACR_NEMA_DATE = re.compile(r"(\d{4})[-./](\d{2})[-./](\d{2})")
_ACR_NEMA_TIME = re.compile(r"(\d{2}):(\d{2})(?::(\d{2}(?:\.\d{1,6})?))?")
_DATE_TIME = re.compile(
    r"\d{4}((0[1-9]|1[0-2])(([0-2]\d|3[01])(([01]\d|2[0-3])([0-5]\d((60|[0-5]\d)(\.\d{1,6})?)?)?)?)?)?"
    r"([+-][01]\d[0-5]\d)?"
)
_TIME = re.compile(r"([01]\d|2[0-3])([0-5]\d((60|[0-5]\d)(\.\d{1,6})?)?)?")
_AGE = re.compile(r"\d{3}[DWMY]")
_DECIMAL = re.compile(r"[+\-]?(\d+|\d+\.\d*|\.\d+)([eE][+\-]?\d+)?")
_CODE = re.compile(r"[A-Z0-9 _]*")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_TEXT_CONTROL = re.compile(r"[\x00-\x08\x0b\x0e-\x1a\x1c-\x1f\x7f]")  # ST keeps TAB, LF, FF, CR (and ESC)
_TEXT_VRS = frozenset({"PN", "LO", "SH", "ST"})  # decoded with the character set; the others are ASCII
_ASCII_TERMS = frozenset({"", "ISO_IR 6", "ISO 2022 IR 6"})
# Single-byte sets whose text is almost never also valid multi-byte UTF-8: such bytes were UTF-8.
_SINGLE_BYTE_TERMS = frozenset(f"ISO_IR {n}" for n in (100, 101, 109, 110, 126, 127, 138, 144, 148, 166, 203))


def valid_uid(value: str) -> bool:
    """A UID as PS3.5 9.1 has it: digits and dots, no empty or zero-led component, 64 characters at most."""
    return len(value) <= 64 and _UID.fullmatch(value) is not None


@dataclass(frozen=True)
class Header:
    """The checked patient/study attributes of one source instance and what was done to get them."""

    source_uid: str
    dataset: Dataset  # written onto every result
    source_only: Dataset  # for the stand-in only (the source's equipment)
    repairs: tuple[str, ...]

    def write(self, target: Dataset) -> None:
        """Replace the target's patient/study attributes by ours, in UTF-8; log the repairs in one line."""
        for tag in [e.tag for e in target.elements() if _patient_or_study_level(e.tag) or e.tag.is_private]:
            del target[tag]
        for element in self.dataset:
            target.add(copy.deepcopy(element))
        target.SpecificCharacterSet = RESULT_CHARACTER_SET
        if self.repairs:
            logger.warning(
                "%s %s: header of source %s repaired: %s",
                target.get("Modality", "result"),
                target.get("SOPInstanceUID", "?"),
                self.source_uid,
                "; ".join(self.repairs),
            )

    def stand_in(self, source: Dataset) -> Dataset:
        """The source instance with our checked patient/study attributes in place of its own.

        highdicom reads the patient and study of a SEG and an SR from their first source and copies
        every attribute of those modules; given this, it copies only what `read_header` checked.
        Elements are shared with the source, not copied.
        """
        kept = {
            element.tag: element
            for element in source.elements()
            if not (
                element.tag.is_private
                or _patient_or_study_level(element.tag)
                or element.tag in _SOURCE_ONLY_TAGS
            )
        }
        stand_in = Dataset(kept)
        if hasattr(source, "file_meta"):
            stand_in.file_meta = source.file_meta
        for element in [*self.dataset, *self.source_only]:
            stand_in.add(copy.deepcopy(element))
        stand_in.SpecificCharacterSet = RESULT_CHARACTER_SET
        return stand_in


def _patient_or_study_level(tag: BaseTag) -> bool:
    return tag.group in _PATIENT_STUDY_GROUPS or tag in _STUDY_LEVEL_TAGS


def read_header(source: Dataset) -> Header:
    """Read, check and repair the attributes in `MODULES` from one source instance.

    Raises ResultError when a Type 1 attribute of the Patient or General Study module (the Study
    Instance UID) is missing, empty or not valid.
    """
    terms = _charset_terms(source)
    repairs: list[str] = []
    header, source_only = Dataset(), Dataset()
    for module in (*MODULES, SOURCE_EQUIPMENT):
        if not module.required and not any(a.keyword in source for a in module.attributes):
            continue
        written = Dataset()
        notes: list[str] = []
        failure = next(
            (p for a in module.attributes if (p := _copy(source, written, a, terms, a.keyword, notes))), None
        )
        if failure is None and module.one_of and not any(k in written for k in module.one_of):
            failure = f"none of {', '.join(module.one_of)}"
        if failure is not None and module.required:
            raise ResultError(
                f"source {source.get('SOPInstanceUID', '?')}: {failure}; the results could not be filed "
                "into the source's study"
            )
        if failure is not None:
            repairs.append(f"{module.name} module dropped ({failure})")
            continue
        repairs += notes
        (source_only if module.source_only else header).update(written)
    return Header(str(source.get("SOPInstanceUID", "?")), header, source_only, tuple(repairs))


def _copy(
    source: Dataset, target: Dataset, attribute: Attribute, terms: list[str], path: str, notes: list[str]
) -> str | None:
    """Copy one attribute, checked; the reason when a Type 1 attribute cannot be copied, else None."""
    tag = Tag(attribute.keyword)
    vr = dictionary_VR(tag)
    if tag not in source:
        if attribute.type == "2":
            target.add_new(tag, vr, None)
            notes.append(f"{path} missing, written empty")
        return f"{attribute.keyword} missing" if attribute.type == "1" else None
    if vr == "SQ":
        return _copy_sequence(source, target, attribute, terms, path, notes)
    value, note = _checked(source, tag, vr, attribute, terms)
    if value is None:
        if attribute.type == "1":
            return f"{attribute.keyword} {note}"
        if attribute.type == "2":
            target.add_new(tag, vr, None)
        notes.append(f"{path} {'emptied' if attribute.type == '2' else 'dropped'} ({note})")
        return None
    if not value and attribute.type == "1":
        return f"{attribute.keyword} empty"
    target.add_new(tag, vr, value or None)
    if note:
        notes.append(f"{path} {note}")
    return None


def _copy_sequence(
    source: Dataset, target: Dataset, attribute: Attribute, terms: list[str], path: str, notes: list[str]
) -> str | None:
    """Copy the items that hold every Type 1 attribute of `attribute.items`; drop the others."""
    items: list[Dataset] = []
    given = source[attribute.keyword].value or []
    for index, item in enumerate(given, start=1):
        copied, item_notes = Dataset(), list[str]()
        item_terms = _charset_terms(item) if "SpecificCharacterSet" in item else terms
        failure = next(
            (
                p
                for a in attribute.items
                if (p := _copy(item, copied, a, item_terms, f"{path}[{index}].{a.keyword}", item_notes))
            ),
            None,
        )
        if failure is None:
            items.append(copied)
            notes += item_notes
        else:
            notes.append(f"{path} item {index} dropped ({failure})")
    if items or attribute.type == "2":
        target.add_new(Tag(attribute.keyword), "SQ", items)
    elif attribute.type == "1":
        return f"{attribute.keyword} has no complete item"
    elif given:
        notes.append(f"{path} dropped (no complete item)")
    return None


def _checked(
    source: Dataset, tag: BaseTag, vr: str, attribute: Attribute, terms: list[str]
) -> tuple[str | None, str | None]:
    """(value, note): the value, repaired where needed (with a note), or None with the reason it is invalid.

    A multi-valued attribute's values are checked one by one and come back joined by backslashes.
    """
    text, charset_note = _text(source, tag, vr, terms)
    parts = [text.rstrip(" \x00")] if vr == "ST" else [v.strip(" \x00") for v in text.split("\\")]
    if not any(parts):
        return "", charset_note
    if len(parts) > 1 and dictionary_VM(tag) == "1":
        return None, "several values where one is allowed"
    values, notes = [], [charset_note]
    for part in parts:
        value, note = _CHECKS[vr](part, vr, attribute) if part else ("", None)
        if value is None:
            return None, note
        values.append(value)
        notes.append(note)
    return "\\".join(values), ", ".join(dict.fromkeys(n for n in notes if n)) or None


def _text(source: Dataset, tag: BaseTag, vr: str, terms: list[str]) -> tuple[str, str | None]:
    """The value as text: raw bytes decoded with the source's charset (repaired when they do not fit)."""
    value = source.get_item(tag).value
    if value is None:
        return "", None
    if isinstance(value, bytes):
        if vr in _TEXT_VRS:
            return _decode(value, terms, vr == "PN")
        try:
            return value.decode("ascii"), None
        except UnicodeDecodeError:
            return value.decode("latin_1"), "non-ASCII characters"
    if isinstance(value, MultiValue):
        return "\\".join(str(v) for v in value), None
    return str(value), None


def _decode(raw: bytes, terms: list[str], person_name: bool) -> tuple[str, str | None]:
    """Decode text bytes with the declared charset; when they do not fit it, as UTF-8, else as Latin-1."""
    if raw.isascii() and b"\x1b" not in raw:
        return raw.decode("ascii"), None
    declared = "\\".join(terms) or "(none)"
    if all(t in python_encoding or t in _ASCII_TERMS for t in terms):
        if b"\x1b" in raw:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                encodings = convert_encodings(terms)
                if person_name:
                    text = "=".join(decode_bytes(g, encodings, PN_DELIMS) for g in raw.split(b"="))
                else:
                    text = decode_bytes(raw, encodings, TEXT_VR_DELIMS | {0x5C})
            if "\ufffd" not in text:
                return text, None
        else:
            first = terms[0]
            try:
                text = raw.decode("ascii" if first in _ASCII_TERMS else python_encoding[first])
            except UnicodeDecodeError:
                pass
            else:
                if first not in _SINGLE_BYTE_TERMS or not _is_utf8(raw):
                    return text, None
                note = f"UTF-8 bytes under SpecificCharacterSet {declared}, read as UTF-8"
                return raw.decode("utf_8"), note
    if _is_utf8(raw):
        return raw.decode("utf_8"), f"bytes not valid in SpecificCharacterSet {declared}, read as UTF-8"
    return raw.decode("latin_1"), f"bytes not valid in SpecificCharacterSet {declared}, read as Latin-1"


def _is_utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf_8")
    except UnicodeDecodeError:
        return False
    return True


def _charset_terms(ds: Dataset) -> list[str]:
    value = ds.get("SpecificCharacterSet") or []
    terms = [str(v).strip() for v in ([value] if isinstance(value, str) else value)]
    return terms or [""]


_Check = Callable[[str, str, Attribute], tuple[str | None, str | None]]


def _check_uid(text: str, vr: str, attribute: Attribute) -> tuple[str | None, str | None]:
    return (text, None) if valid_uid(text) else (None, "not a valid UID")


def _check_date(text: str, vr: str, attribute: Attribute) -> tuple[str | None, str | None]:
    note = None
    if match := _ACR_NEMA_DATE.fullmatch(text):
        text, note = "".join(match.groups()), "ACR-NEMA date form rewritten"
    try:
        _dt.datetime.strptime(text, "%Y%m%d")
    except ValueError:
        return None, "not a valid date"
    return (text, note) if len(text) == 8 and text.isdigit() else (None, "not a valid date")


def _check_time(text: str, vr: str, attribute: Attribute) -> tuple[str | None, str | None]:
    note = None
    if match := _ACR_NEMA_TIME.fullmatch(text):
        text, note = "".join(g for g in match.groups() if g), "ACR-NEMA time form rewritten"
    return (text, note) if _TIME.fullmatch(text) else (None, "not a valid time")


def _check_date_time(text: str, vr: str, attribute: Attribute) -> tuple[str | None, str | None]:
    return (text, None) if _DATE_TIME.fullmatch(text) else (None, "not a valid date-time")


def _check_code(text: str, vr: str, attribute: Attribute) -> tuple[str | None, str | None]:
    upper = text.upper()
    note = "upper-cased" if upper != text else None
    if len(upper) > _MAX_BYTES[vr] or not _CODE.fullmatch(upper):
        return None, "not a valid code string"
    if attribute.enumerated and upper not in attribute.enumerated:
        return None, f"not one of {', '.join(attribute.enumerated)}"
    return upper, note


def _check_age(text: str, vr: str, attribute: Attribute) -> tuple[str | None, str | None]:
    return (text, None) if _AGE.fullmatch(text) else (None, "not an age (nnnD, nnnW, nnnM or nnnY)")


def _check_decimal(text: str, vr: str, attribute: Attribute) -> tuple[str | None, str | None]:
    if len(text) > _MAX_BYTES[vr] or not _DECIMAL.fullmatch(text) or not math.isfinite(float(text)):
        return None, "not a decimal string"
    return text, None


def _fit(text: str, limit: int) -> str:
    """The longest start of text whose UTF-8 takes at most `limit` bytes (never half a character)."""
    return text.encode("utf_8")[:limit].decode("utf_8", errors="ignore")


def _too_long(text: str, limit: int) -> bool:
    return len(text.encode("utf_8")) > limit


def _check_text(text: str, vr: str, attribute: Attribute) -> tuple[str | None, str | None]:
    """LO, SH, ST: control characters become spaces; over-long text is cut (identifiers are invalid)."""
    notes = []
    cleaned = (_TEXT_CONTROL if vr == "ST" else _CONTROL).sub(" ", text)
    if cleaned != text:
        notes.append("control characters replaced")
    limit = _MAX_BYTES[vr]
    if _too_long(cleaned, limit):
        if attribute.identifier:
            return None, f"longer than the {limit} bytes {vr} allows"
        cleaned = _fit(cleaned, limit).rstrip()
        notes.append(f"truncated to the {limit} bytes {vr} allows")
    return cleaned, ", ".join(notes) or None


def _check_person_name(text: str, vr: str, attribute: Attribute) -> tuple[str | None, str | None]:
    """At most 3 component groups of at most 5 components, 64 bytes in all (as dciodvfy checks).

    Groups that do not fit are dropped from the end (phonetic, then ideographic), then the first is cut.
    """
    cleaned = _CONTROL.sub(" ", text)
    notes = ["control characters replaced"] if cleaned != text else []
    groups = cleaned.split("=")
    if len(groups) > 3:
        groups = groups[:3]
        notes.append("component groups beyond 3 dropped")
    for index, group in enumerate(groups):
        components = group.split("^")
        if len(components) > 5:
            groups[index] = "^".join(components[:5])
            notes.append("components beyond 5 dropped")
    limit = _MAX_BYTES[vr]
    while len(groups) > 1 and _too_long("=".join(groups).rstrip("="), limit):
        groups.pop()
        notes.append("component groups dropped to fit 64 bytes")
    name = "=".join(groups).rstrip("=")
    if _too_long(name, limit):
        name = _fit(name, limit).rstrip(" ^")
        notes.append(f"truncated to the {limit} bytes PN allows")
    return name, ", ".join(dict.fromkeys(notes)) or None


_CHECKS: dict[str, _Check] = {
    "UI": _check_uid,
    "DA": _check_date,
    "TM": _check_time,
    "DT": _check_date_time,
    "CS": _check_code,
    "AS": _check_age,
    "DS": _check_decimal,
    "LO": _check_text,
    "SH": _check_text,
    "ST": _check_text,
    "PN": _check_person_name,
}
