"""Reading results back: the measurements of a TID 1500 SR as rows or as a prior's result, and a
Secondary Capture as a PNG.

What the demo prints and the web console shows comes from the DICOM objects themselves, so it is
what the archive received, not a copy kept on the side.
"""

from __future__ import annotations

from io import BytesIO

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset

from dicom_io.results.prior import CHANGE, RELATIVE_CHANGE, Prior, PriorValue
from dicom_io.types import Code

_LABELS = {"118565006": "volume", "LAA950": "%LAA-950", "112031": "mean density"}
_UNITS = {"[hnsf'U]": "HU", "cm3": "mL"}
_DERIVED = {CHANGE.value: "change", RELATIVE_CHANGE.value: "change, relative"}
_TRACKING_IDENTIFIER, _DERIVATION = "112039", "121401"


def _code(item: Dataset) -> Code:
    code = item.ConceptNameCodeSequence[0]
    return Code(str(code.CodeValue), str(code.CodingSchemeDesignator), str(code.CodeMeaning))


def _value_code(item: Dataset) -> Code:
    code = item.ConceptCodeSequence[0]
    return Code(str(code.CodeValue), str(code.CodingSchemeDesignator), str(code.CodeMeaning))


def sr_values(sr: Dataset) -> list[PriorValue]:
    """Every NUM of every measurement group with its group (tracking identifier), concept, unit and
    Derivation, in document order.

    A NUM that repeats one listed before, in a group named after that one's ("Left lung: Volume"
    after "Left lung", radgate's planar copy for viewers), is listed once.
    """
    found: list[PriorValue] = []

    def walk(item: Dataset, group: str) -> None:
        for child in item.get("ContentSequence", []):
            if child.ValueType == "TEXT" and _code(child).value == _TRACKING_IDENTIFIER:
                group = str(child.TextValue)
            elif child.ValueType == "NUM" and child.get("MeasuredValueSequence"):
                value = child.MeasuredValueSequence[0]
                unit = value.MeasurementUnitsCodeSequence[0]
                modifiers = [
                    _value_code(m)
                    for m in child.get("ContentSequence", [])
                    if m.ValueType == "CODE" and _code(m).value == _DERIVATION
                ]
                row = PriorValue(
                    group,
                    _code(child),
                    float(value.NumericValue),
                    Code(str(unit.CodeValue), str(unit.CodingSchemeDesignator), str(unit.CodeMeaning)),
                    modifiers[0] if modifiers else None,
                )
                repeats = any(
                    (row.concept, row.value, row.unit, row.modifier)
                    == (s.concept, s.value, s.unit, s.modifier)
                    and group.startswith(f"{s.group}: ")
                    for s in found
                )
                if not repeats:
                    found.append(row)
            elif child.ValueType == "CONTAINER":
                walk(child, group)

    walk(sr, "")
    return found


def sr_measurements(sr: Dataset) -> list[tuple[str, str, float, str]]:
    """(group tracking identifier, label, value, unit) for every NUM of every measurement group
    (`sr_values`), labelled for people: "volume", "%LAA-950", "volume change" ..."""
    rows = []
    for v in sr_values(sr):
        label = _LABELS.get(v.concept.value, v.concept.meaning)
        if v.modifier is not None and v.modifier.value in _DERIVED:
            label = f"{label} {_DERIVED[v.modifier.value]}"
        rows.append((v.group, label, v.value, _UNITS.get(v.unit.value, v.unit.value)))
    return rows


def read_prior(sr: Dataset) -> Prior:
    """A prior study's result from its SR: which study and SR it is, and its values (`sr_values`),
    without the changes it reported against its own prior."""
    return Prior(
        study_uid=str(sr.StudyInstanceUID),
        study_date=str(sr.get("StudyDate", "") or ""),
        accession=str(sr.get("AccessionNumber", "") or ""),
        sr_sop_class_uid=str(sr.SOPClassUID),
        sr_sop_instance_uid=str(sr.SOPInstanceUID),
        sr_series_uid=str(sr.SeriesInstanceUID),
        values=tuple(v for v in sr_values(sr) if v.modifier is None or v.modifier.value not in _DERIVED),
    )


def picture_png(ds: Dataset) -> bytes:
    """A Secondary Capture (8-bit MONOCHROME2 or RGB, one frame: what `dicom_io.results.sc` writes)
    as PNG bytes. Raises ValueError for any other picture."""
    photometric = str(ds.get("PhotometricInterpretation", ""))
    if int(ds.get("BitsAllocated", 0)) != 8 or photometric not in ("RGB", "MONOCHROME2"):
        raise ValueError(f"not an 8-bit RGB or MONOCHROME2 picture ({photometric or 'no photometric'})")
    if int(ds.get("NumberOfFrames", 1) or 1) != 1:
        raise ValueError("a multi-frame picture")
    pixels = np.ascontiguousarray(ds.pixel_array, dtype=np.uint8)
    out = BytesIO()
    Image.fromarray(pixels, mode="RGB" if photometric == "RGB" else "L").save(out, format="PNG")
    return out.getvalue()
