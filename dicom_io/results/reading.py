"""Reading results back: the measurements of a TID 1500 SR as rows, and a Secondary Capture as a PNG.

What the demo prints and the web console shows comes from the DICOM objects themselves, so it is
what the archive received, not a copy kept on the side.
"""

from __future__ import annotations

from io import BytesIO

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset

_LABELS = {"118565006": "volume", "LAA950": "%LAA-950", "112031": "mean density"}
_UNITS = {"[hnsf'U]": "HU", "cm3": "mL"}


def _code(item: Dataset) -> Dataset:
    return item.ConceptNameCodeSequence[0]


def sr_measurements(sr: Dataset) -> list[tuple[str, str, float, str]]:
    """(group tracking identifier, label, value, unit) for every NUM of every measurement group.

    A NUM that repeats one listed before, in a group named after that one's ("Left lung: Volume"
    after "Left lung", radgate's planar copy for viewers), is listed once.
    """
    found: list[tuple[str, str, float, str]] = []

    def walk(item: Dataset, group: str) -> None:
        for child in item.get("ContentSequence", []):
            if child.ValueType == "TEXT" and _code(child).CodeValue == "112039":  # Tracking Identifier
                group = str(child.TextValue)
            elif child.ValueType == "NUM" and child.get("MeasuredValueSequence"):
                value = child.MeasuredValueSequence[0]
                code = _code(child)
                label = _LABELS.get(str(code.CodeValue), str(code.CodeMeaning))
                unit = str(value.MeasurementUnitsCodeSequence[0].CodeValue)
                row = (group, label, float(value.NumericValue), _UNITS.get(unit, unit))
                if not any(row[1:] == seen[1:] and group.startswith(f"{seen[0]}: ") for seen in found):
                    found.append(row)
            elif child.ValueType == "CONTAINER":
                walk(child, group)

    walk(sr, "")
    return found


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
