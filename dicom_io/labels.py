"""Label tables: which coded segment each integer label value of a model's output stands for.

Plain data and JSON, no torch: the node's configuration checks a table at load (`plugin.config`)
with the same parser the monai-bundle pipeline uses when it runs, so a broken table stops the
node at start instead of failing every job. The JSON form, by label value:

    {"1": {"label": "Liver", "category": ["123037004", "SCT", "Anatomical Structure"],
           "type": ["10200004", "SCT", "Liver"], "color": [221, 130, 101], "region": [...],
           "laterality": ["7771000", "SCT", "Left"]}}
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dicom_io.types import Code

BUNDLE_LABELS = "configs/radgate_labels.json"
"""Where a MONAI bundle keeps its label table when none is given."""


@dataclass(frozen=True)
class LabelSpec:
    """How one label value of a model's output becomes a coded segment."""

    label: str
    category: Code
    property_type: Code
    color_rgb: tuple[int, int, int] = (255, 0, 0)
    anatomic_region: Code | None = None
    laterality: Code | None = None

    @classmethod
    def from_json(cls, value: Any) -> LabelSpec:
        """One entry of the JSON form; ValueError saying what is wrong with it."""
        if not isinstance(value, Mapping) or "label" not in value:
            raise ValueError(f"a label entry needs at least 'label', 'category' and 'type', got {value!r}")

        def code(key: str) -> Code | None:
            raw = value.get(key)
            return None if raw is None else Code(*(str(part) for part in raw))

        category, property_type = code("category"), code("type")
        if category is None or property_type is None:
            raise ValueError(f"label {value.get('label')!r} needs a 'category' and a 'type' code")
        color = tuple(int(c) for c in value.get("color", (255, 0, 0)))
        if len(color) != 3 or not all(0 <= c <= 255 for c in color):
            raise ValueError(f"label {value['label']!r}: color must be three integers 0-255, got {color}")
        return cls(
            label=str(value["label"]),
            category=category,
            property_type=property_type,
            color_rgb=(color[0], color[1], color[2]),
            anatomic_region=code("region"),
            laterality=code("laterality"),
        )


def load_label_table(source: Mapping[Any, Any] | str | Path) -> dict[int, LabelSpec]:
    """A label table from a mapping (values LabelSpec or JSON-like dicts) or a JSON file."""
    raw: Mapping[Any, Any] = source if isinstance(source, Mapping) else json.loads(Path(source).read_text())
    table = {
        int(value): spec if isinstance(spec, LabelSpec) else LabelSpec.from_json(spec)
        for value, spec in raw.items()
    }
    if not table or min(table) < 1:
        raise ValueError(f"the label table needs label values >= 1 (0 is background), got {sorted(table)}")
    return table
