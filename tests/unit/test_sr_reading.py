"""sr_measurements: every value of an SR once, though a planar copy for viewers repeats it."""

from __future__ import annotations

from pydicom.dataset import Dataset

from dicom_io.results.reading import sr_measurements


def _item(value_type: str, code: str, meaning: str, **values: object) -> Dataset:
    item = Dataset()
    item.ValueType = value_type
    name = Dataset()
    name.CodeValue, name.CodingSchemeDesignator, name.CodeMeaning = code, "DCM", meaning
    item.ConceptNameCodeSequence = [name]
    for keyword, value in values.items():
        setattr(item, keyword, value)
    return item


def _group(identifier: str, volume: float) -> Dataset:
    unit = Dataset()
    unit.CodeValue, unit.CodingSchemeDesignator, unit.CodeMeaning = "cm3", "UCUM", "cubic centimeter"
    measured = Dataset()
    measured.NumericValue, measured.MeasurementUnitsCodeSequence = volume, [unit]
    return _item(
        "CONTAINER",
        "125007",
        "Measurement Group",
        ContentSequence=[
            _item("TEXT", "112039", "Tracking Identifier", TextValue=identifier),
            _item("NUM", "118565006", "Volume", MeasuredValueSequence=[measured]),
        ],
    )


def test_a_planar_copy_of_a_value_is_listed_once_and_equal_values_of_other_groups_are_kept() -> None:
    sr = Dataset()
    sr.ContentSequence = [
        _group("Right lung", 1900.0),
        _group("Right lung: Volume", 1900.0),  # the planar copy
        _group("Left lung", 1900.0),  # the same number, another finding
        _group("Left lung: Volume", 1500.0),  # not a copy: another value
    ]
    assert [(group, value) for group, _label, value, _unit in sr_measurements(sr)] == [
        ("Right lung", 1900.0),
        ("Left lung", 1900.0),
        ("Left lung: Volume", 1500.0),
    ]
