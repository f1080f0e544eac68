"""A prior study's result, and the change of each measurement since then, for the current SR.

`Prior` is plain data (it crosses process borders inside a task): which study it was, which SR of
it the values were read from, and those values. `changes` pairs the current run's measurements
with the prior's by group (segment label, or the findings' summary label), concept, unit and
modifier, and gives two derived measurements per pair: the change in the measurement's own unit
and the change relative to the prior value in percent (left out when the prior value is 0). A
measurement that already carries a modifier (a mean) is not compared: TID 300 allows one
Derivation per NUM, and the change takes it.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Sequence
from dataclasses import dataclass

from pydicom.dataset import Dataset

from dicom_io.types import Code, Measurement

# No standard code names "change since the prior study"; a private scheme says so openly (as LAA950).
CHANGE = Code("CHANGE_PRIOR", "99RADGATE", "Change since prior study")
RELATIVE_CHANGE = Code("PCT_CHANGE_PRIOR", "99RADGATE", "Relative change since prior study")
PERCENT = Code("%", "UCUM", "percent")


@dataclass(frozen=True)
class PriorValue:
    """One measurement of the prior's SR: its group (tracking identifier), coded concept, value, unit."""

    group: str
    concept: Code
    value: float
    unit: Code
    modifier: Code | None = None


@dataclass(frozen=True)
class Prior:
    """The prior study's result the current report compares with.

    ``study_date`` is DICOM DA (YYYYMMDD, or empty when the archive had none); ``sr_*`` name the SR
    the values come from, which the current SR lists as Pertinent Other Evidence.
    """

    study_uid: str
    study_date: str
    accession: str
    sr_sop_class_uid: str
    sr_sop_instance_uid: str
    sr_series_uid: str
    values: tuple[PriorValue, ...]

    @property
    def when(self) -> str:
        """The prior's study date as YYYY-MM-DD, or "an unknown date"."""
        d = self.study_date
        return f"{d[:4]}-{d[4:6]}-{d[6:]}" if len(d) == 8 else "an unknown date"

    def earlier_than(self, study_date: str) -> str:
        """The prior in words without an identifier or a date, for the report itself (a
        de-identified export keeps its text): how many days before ``study_date`` (DA) it was."""
        try:
            days = (
                _dt.datetime.strptime(study_date, "%Y%m%d") - _dt.datetime.strptime(self.study_date, "%Y%m%d")
            ).days
        except ValueError:
            return "the patient's prior study (of a date not known)"
        return f"the patient's prior study of {days} days earlier"

    def describe(self) -> str:
        """The prior in words for the logs and the timeline: date, accession and UID (no patient data)."""
        accession = f", accession {self.accession}" if self.accession else ""
        return f"prior study of {self.when}{accession} (Study Instance UID {self.study_uid})"

    def evidence(self, patient: Dataset) -> Dataset:
        """The prior SR as an evidence item (its study, series and instance, the patient's identity
        copied from ``patient``, as an SR's evidence must share it)."""
        ds = Dataset()
        for keyword in ("PatientID", "PatientName", "PatientBirthDate", "PatientSex"):
            if (element := patient.data_element(keyword)) is not None:
                setattr(ds, keyword, element.value)
        ds.StudyInstanceUID = self.study_uid
        ds.SeriesInstanceUID = self.sr_series_uid
        ds.SOPClassUID = self.sr_sop_class_uid
        ds.SOPInstanceUID = self.sr_sop_instance_uid
        return ds


def _key(group: str, m: Measurement | PriorValue) -> tuple[str, Code, Code]:
    return group, m.concept, m.unit


def changes(measurements: Sequence[Measurement], group: str, prior: Prior) -> list[Measurement]:
    """The change since ``prior`` of each of ``measurements`` (all in ``group``) the prior also has:
    absolute (their unit, modifier `CHANGE`), then relative (%, `RELATIVE_CHANGE`), in their order."""
    before = {_key(v.group, v): v.value for v in prior.values if v.modifier is None}
    derived = []
    for m in measurements:
        old = before.get(_key(group, m)) if m.modifier is None else None
        if old is None:
            continue
        derived.append(Measurement(m.concept, m.value - old, m.unit, m.segment, modifier=CHANGE))
        if old != 0:
            relative = 100.0 * (m.value - old) / abs(old)
            derived.append(Measurement(m.concept, relative, PERCENT, m.segment, modifier=RELATIVE_CHANGE))
    return derived
