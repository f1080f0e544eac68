"""dicom_io.deidentify on small built datasets: nesting, private attributes, options, method codes."""

from __future__ import annotations

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from dicom_io.deidentify import Options, deidentify, patient_key, table_action


class _Names:
    """Replacement values that show which original they came from."""

    def __init__(self) -> None:
        self.uids: dict[str, str] = {}

    def uid(self, original: str) -> str:
        return self.uids.setdefault(original, f"2.25.{len(self.uids) + 1}")

    def patient(self, key: str) -> str:
        return "RGPSEUDONYM"


def _dataset() -> Dataset:
    ds = Dataset()
    ds.PatientName = "Doe^Jane"
    ds.PatientID = "MRN123"
    ds.PatientSex = "F"
    ds.PatientBirthDate = "19600101"
    ds.StudyDate = "20240102"
    ds.SeriesDescription = "Chest Doe MRN123"
    ds.StudyInstanceUID = "1.2.3"
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.SOPInstanceUID = "1.2.3.4"
    item = Dataset()
    item.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    item.ReferencedSOPInstanceUID = "1.2.3.4"
    item.PersonName = "Doe^John"
    ds.ReferencedImageSequence = Sequence([item])
    block = ds.private_block(0x0019, "SAFE CREATOR", create=True)
    block.add_new(0x10, "LO", "kept")
    block.add_new(0x11, "LO", "gone")
    ds.private_block(0x0029, "OTHER", create=True).add_new(0x10, "LO", "gone")
    item.private_block(0x0041, "NESTED", create=True).add_new(0x10, "LO", "gone")
    return ds


def test_the_basic_profile_reaches_into_sequences_and_keeps_references_consistent() -> None:
    ds, names = _dataset(), _Names()
    deidentify(ds, Options(), names)
    assert ds.PatientName == "RGPSEUDONYM" and ds.PatientID == "RGPSEUDONYM"
    assert "PatientSex" in ds and not (ds.PatientSex or ds.PatientBirthDate or ds.StudyDate)
    assert "SeriesDescription" not in ds
    item = ds.ReferencedImageSequence[0]
    assert item.ReferencedSOPInstanceUID == ds.SOPInstanceUID == names.uids["1.2.3.4"]
    assert item.ReferencedSOPClassUID == ds.SOPClassUID  # class UIDs are not instance identifiers
    assert item.PersonName != "Doe^John"
    assert not [e for e in ds.iterall() if e.tag.is_private]
    assert [c.CodeValue for c in ds.DeidentificationMethodCodeSequence] == ["113100"]
    assert ds.LongitudinalTemporalInformationModified == "REMOVED"


def test_options_keep_dates_characteristics_clean_descriptors_and_safe_private() -> None:
    ds = _dataset()
    options = Options(
        retain_longitudinal_temporal=True,
        retain_patient_characteristics=True,
        clean_descriptors=True,
        safe_private=frozenset({("SAFE CREATOR", 0x0019, 0x10)}),
    )
    deidentify(ds, options, _Names())
    assert ds.StudyDate == "20240102" and ds.PatientBirthDate == "19600101"
    assert ds.PatientSex == "F"
    assert ds.SeriesDescription == "Chest  "
    private = [(e.tag, e.value) for e in ds.iterall() if e.tag.is_private]
    assert private == [(0x00190010, "SAFE CREATOR"), (0x00191010, "kept")]
    codes = [c.CodeValue for c in ds.DeidentificationMethodCodeSequence]
    assert codes == ["113100", "113105", "113106", "113108", "113111"]
    assert ds.LongitudinalTemporalInformationModified == "UNMODIFIED"


def test_table_actions_and_patient_keys() -> None:
    assert table_action(0x00100010) == "Z"  # Patient's Name
    assert table_action(0x00080018) == "U"  # SOP Instance UID
    assert table_action(0x60004000) == "X"  # Overlay Comments, a repeating group
    assert table_action(0x00280010) is None  # Rows: not identifying
    unnamed = Dataset()
    unnamed.StudyInstanceUID = "1.2.3"
    assert patient_key(unnamed) == "study:1.2.3"
    named = _dataset()
    assert patient_key(named).startswith("id:MRN123")
