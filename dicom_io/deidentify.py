"""De-identification: DICOM PS3.15 Annex E Basic Application Level Confidentiality Profile and options.

The attribute list and its action codes are Table E.1-1 as the `dicom-anonymizer` package ships it
(generated from the standard, edition 2026c); this module applies them to every level of a
dataset, sequences included, with the options below, and takes new UIDs and the patient pseudonym
from a `Pseudonymizer` so that a series and the objects derived from it stay consistent. What each
option and each action does here is in docs/design.md, "Dispatch: de-identification".
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Protocol

from dicomanonymizer.dicom_anonymization_databases import dicomfields_2026c as table_e11
from pydicom.datadict import keyword_for_tag
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag

TABLE_EDITION = "2026c"

# Table E.1-1's action codes, by the package's category names
CATEGORIES: dict[str, str] = {
    "D_TAGS": "D",
    "Z_TAGS": "Z",
    "X_TAGS": "X",
    "U_TAGS": "U",
    "Z_D_TAGS": "Z/D",
    "X_Z_TAGS": "X/Z",
    "X_D_TAGS": "X/D",
    "X_Z_D_TAGS": "X/Z/D",
    "X_Z_U_STAR_TAGS": "X/Z/U*",
}

CHOSEN: dict[str, str] = {"Z/D": "D", "X/Z": "Z", "X/D": "D", "X/Z/D": "D", "X/Z/U*": "U*"}
"""A conditional code resolves to the alternative that keeps any IOD conformant: Z/D, X/D and X/Z/D
to D (a dummy value, valid where the attribute is Type 1), X/Z to Z (empty, valid for Type 2 and 3),
X/Z/U* to U* (the sequence stays, its items de-identified, its UIDs replaced), so the SEG's and SR's
references survive."""


def _table() -> tuple[dict[int, str], list[tuple[int, int, int, int, str]]]:
    single: dict[int, str] = {}
    masked: list[tuple[int, int, int, int, str]] = []
    for category, code in CATEGORIES.items():
        for entry in getattr(table_e11, category):
            if len(entry) == 2:
                single[(entry[0] << 16) | entry[1]] = code
            else:
                masked.append((*entry, code))
    return single, masked


_SINGLE, _MASKED = _table()


def table_action(tag: int) -> str | None:
    """Table E.1-1's action code for a (non-private) tag, e.g. "X" or "X/Z/D"; None when not listed."""
    code = _SINGLE.get(int(tag))
    if code is not None:
        return code
    group, element = int(tag) >> 16, int(tag) & 0xFFFF
    for g, e, group_mask, element_mask, masked_code in _MASKED:
        if group & group_mask == g & group_mask and element & element_mask == e & element_mask:
            return masked_code
    return None


PATIENT_CHARACTERISTICS = frozenset(
    {"EthnicGroup", "PatientAge", "PatientSex", "PatientSexNeutered", "PatientSize", "PatientWeight"}
    | {"PregnancyStatus", "SelectorASValue", "SmokingStatus"}
)
"""The attributes Table E.1-1's Retain Patient Characteristics column keeps (K); its C entries
(Allergies, PatientState, PreMedication, SpecialNeeds) stay removed."""

_DESCRIPTOR_SUFFIXES = ("Description", "Comments")
_TEXT_VRS = frozenset({"LO", "SH", "ST", "LT", "UT", "UC"})
_TIME_VRS = frozenset({"DA", "DT", "TM"})
_DUMMY: dict[str, str] = {"DA": "19000101", "DT": "19000101000000", "TM": "000000", "AS": "000Y"}

CODES = {
    "basic": ("113100", "Basic Application Confidentiality Profile"),
    "clean_descriptors": ("113105", "Clean Descriptors Option"),
    "retain_longitudinal_temporal": ("113106", "Retain Longitudinal Temporal Information Full Dates Option"),
    "retain_patient_characteristics": ("113108", "Retain Patient Characteristics Option"),
    "retain_safe_private": ("113111", "Retain Safe Private Option"),
}
"""PS3.16 CID 7050 codes for what was applied, written into DeidentificationMethodCodeSequence."""


class Pseudonymizer(Protocol):
    """Where replacement values come from; the same original gives the same replacement."""

    def uid(self, original: str) -> str:
        """The new UID for ``original``."""
        ...

    def patient(self, key: str) -> str:
        """The pseudonym (used as PatientID and PatientName) for the patient ``key`` names."""
        ...


@dataclass(frozen=True)
class Options:
    """The Basic Profile's options; ``safe_private`` holds (creator, group, element offset) kept."""

    retain_longitudinal_temporal: bool = False
    retain_patient_characteristics: bool = False
    clean_descriptors: bool = False
    safe_private: frozenset[tuple[str, int, int]] = field(default_factory=frozenset)

    def applied(self) -> list[str]:
        """The names in `CODES` of the profile and the options in force."""
        names = ["basic"]
        names += [n for n in ("clean_descriptors", "retain_longitudinal_temporal") if getattr(self, n)]
        names += ["retain_patient_characteristics"] if self.retain_patient_characteristics else []
        return names + (["retain_safe_private"] if self.safe_private else [])


def patient_key(ds: Dataset) -> str:
    """What identifies the patient for pseudonyms: the ID (with its issuer), else the name, else the study.

    A series without either gets a pseudonym of its own study, never one shared by all unnamed patients.
    """
    patient_id = str(ds.get("PatientID", "") or "").strip()
    if patient_id:
        return f"id:{patient_id}\0{ds.get('IssuerOfPatientID', '') or ''}"
    name = str(ds.get("PatientName", "") or "").strip()
    return f"name:{name}" if name else f"study:{ds.get('StudyInstanceUID', '')}"


def _identifiers(ds: Dataset) -> re.Pattern[str] | None:
    """A pattern matching the patient's identifying values, for cleaning descriptors."""
    words: set[str] = set()
    name = ds.get("PatientName")
    if name:
        words |= {part for part in re.split(r"[\^= ]+", str(name)) if len(part) >= 2}
    for keyword in ("PatientID", "AccessionNumber", "PatientBirthDate", "OtherPatientIDs"):
        value = ds.get(keyword)
        values = value if isinstance(value, MultiValue | list) else [value]
        words |= {str(v).strip() for v in values if v and len(str(v).strip()) >= 2}
    if not words:
        return None
    return re.compile("|".join(re.escape(w) for w in sorted(words, key=len, reverse=True)), re.IGNORECASE)


class _Walk:
    def __init__(self, top: Dataset, options: Options, names: Pseudonymizer) -> None:
        self.options = options
        self.names = names
        self.pseudonym = names.patient(patient_key(top))
        self.identifiers = _identifiers(top) if options.clean_descriptors else None

    def dataset(self, ds: Dataset) -> None:
        self._private(ds)
        for elem in list(ds):
            if not elem.tag.is_private:
                self.element(ds, elem)

    def _private(self, ds: Dataset) -> None:
        """Remove every private attribute except those named safe (and the creators they need)."""
        kept_creators: set[BaseTag] = set()
        doomed: list[BaseTag] = []
        for elem in ds:
            tag = elem.tag
            if not tag.is_private or tag.is_private_creator:
                continue
            creator_tag = BaseTag((tag.group << 16) | (tag.element >> 8))
            creator = ds.get(creator_tag)
            wanted = (str(creator.value) if creator else "", tag.group, tag.element & 0xFF)
            if wanted in self.options.safe_private:
                kept_creators.add(creator_tag)
            else:
                doomed.append(tag)
        doomed += [e.tag for e in ds if e.tag.is_private_creator and e.tag not in kept_creators]
        for tag in doomed:
            del ds[tag]

    def element(self, ds: Dataset, elem: DataElement) -> None:
        code = table_action(elem.tag)
        keyword = keyword_for_tag(elem.tag)
        if code is None or self._retained(elem, keyword):
            if elem.VR == "SQ":
                self._items(elem)
            return
        action = CHOSEN.get(code, code)
        if keyword in ("PatientID", "PatientName"):
            elem.value = self.pseudonym
        elif self.identifiers is not None and self._descriptor(elem, keyword):
            elem.value = self.identifiers.sub("", str(elem.value))
        elif action == "X":
            del ds[elem.tag]
        elif action == "Z":
            elem.value = [] if elem.VR == "SQ" else None
        elif action in ("U", "U*") or elem.VR == "UI":
            self._uids(elem)
        else:  # D
            self._dummy(elem)

    def _retained(self, elem: DataElement, keyword: str) -> bool:
        if self.options.retain_longitudinal_temporal and elem.VR in _TIME_VRS:
            return True
        return self.options.retain_patient_characteristics and keyword in PATIENT_CHARACTERISTICS

    @staticmethod
    def _descriptor(elem: DataElement, keyword: str) -> bool:
        return elem.VR in _TEXT_VRS and (keyword.endswith(_DESCRIPTOR_SUFFIXES) or keyword == "ProtocolName")

    def _items(self, elem: DataElement) -> None:
        for item in elem.value or ():
            self.dataset(item)

    def _uids(self, elem: DataElement) -> None:
        if elem.VR == "SQ":
            self._items(elem)
        elif isinstance(elem.value, MultiValue | list):
            elem.value = [self.names.uid(str(v)) for v in elem.value if v]
        elif elem.value:
            elem.value = self.names.uid(str(elem.value))

    def _dummy(self, elem: DataElement) -> None:
        vr = elem.VR
        if vr == "SQ":
            self._items(elem)
        elif vr in _DUMMY:
            elem.value = _DUMMY[vr]
        elif vr in ("DS", "IS"):
            elem.value = "0"
        elif vr in ("US", "SS", "UL", "SL", "FL", "FD", "UV", "SV"):
            elem.value = 0
        elif vr in ("OB", "OW", "UN", "OD", "OF", "OL", "OV"):
            elem.value = b"\0\0"
        elif vr == "UR":
            elem.value = "http://deidentified.invalid"
        else:  # AE CS LO LT PN SH ST UC UT
            elem.value = "DEIDENTIFIED"


def deidentify(ds: Dataset, options: Options, names: Pseudonymizer) -> None:
    """De-identify ``ds`` in place: Table E.1-1 on every level, the options, the method recorded.

    Writes PatientIdentityRemoved YES, DeidentificationMethod(CodeSequence) and
    LongitudinalTemporalInformationModified, and keeps the file meta's SOP Instance UID equal to
    the dataset's. Raises nothing of its own; a value the dataset cannot hold raises pydicom's error.
    """
    _Walk(ds, options, names).dataset(ds)
    applied = options.applied()
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = [f"radgate, PS3.15 Table E.1-1 ({TABLE_EDITION})"] + [
        CODES[name][1] for name in applied
    ]
    ds.DeidentificationMethodCodeSequence = [_code(*CODES[name]) for name in applied]
    ds.LongitudinalTemporalInformationModified = (
        "UNMODIFIED" if options.retain_longitudinal_temporal else "REMOVED"
    )
    if getattr(ds, "file_meta", None) is not None and "SOPInstanceUID" in ds:
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID


def _code(value: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = "DCM"
    item.CodeMeaning = meaning
    return item
