"""TotalSegmentator's task `total` without torch: its weight folders and its 117 coded structures.

The node's configuration checks a `totalsegmentator` pipeline at load (`plugin.config`) in a
process that must not import torch, so what that check needs lives here and reads only
TotalSegmentator's plain-data modules (`map_to_binary`, `map_tasks_config`) and the SNOMED CT
table the package ships (`resources/totalsegmentator_snomed_mapping.csv`). Weights follow the
`TOTALSEG_HOME_DIR` layout:
`<weights_dir>/nnunet/results/Dataset<id>_<name>/<trainer>__<plans>__3d_fullres/fold_0/checkpoint_final.pth`.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from difflib import get_close_matches
from functools import cache
from importlib import resources
from importlib.util import find_spec
from pathlib import Path

from dicom_io.labels import LabelSpec
from dicom_io.types import Code

TASK = "total"
CROP_MODEL = 298
"""The 6 mm model TotalSegmentator runs first to crop to an roi_subset (python_api, not robust)."""
CROP_TRAINER = "nnUNetTrainer_4000epochs_NoMirroring"
PLANS = "nnUNetPlans"
CONFIGURATION = "3d_fullres"
FOLD = 0
CHECKPOINT = "checkpoint_final.pth"
SNOMED_TABLE = "resources/totalsegmentator_snomed_mapping.csv"
INSTALL_HINT = "TotalSegmentator (pip install 'radgate[nnunet]')"


class WeightsMissingError(FileNotFoundError):
    """A weight folder the configured mode needs is not in `weights_dir`; the message has the fix."""


@dataclass(frozen=True)
class Model:
    """One nnU-Net model TotalSegmentator runs for a mode: its dataset id and trained model folder."""

    task_id: int
    dataset: str
    trainer: str

    def folder(self, weights_dir: Path) -> Path:
        """The trained model folder (holding `fold_0/`) under a `TOTALSEG_HOME_DIR`-layout folder."""
        return weights_root(weights_dir) / self.dataset / f"{self.trainer}__{PLANS}__{CONFIGURATION}"

    def checkpoint(self, weights_dir: Path) -> Path:
        return self.folder(weights_dir) / f"fold_{FOLD}" / CHECKPOINT


def require_package() -> None:
    """Raise ModuleNotFoundError naming what to install when TotalSegmentator is not installed."""
    if find_spec("totalsegmentator") is None:
        raise ModuleNotFoundError(
            f"the totalsegmentator pipeline needs {INSTALL_HINT}, which is not installed"
        )


def weights_root(weights_dir: Path) -> Path:
    """Where TotalSegmentator looks for model folders when TOTALSEG_HOME_DIR is `weights_dir`."""
    return weights_dir / "nnunet" / "results"


def download_task(fast: bool) -> str:
    """The `totalseg_download_weights -t` task that fetches every model of the mode (crop model too)."""
    return f"{TASK}_fast" if fast else TASK


def download_command(weights_dir: Path, fast: bool) -> str:
    return f"TOTALSEG_HOME_DIR={weights_dir} totalseg_download_weights -t {download_task(fast)}"


def models(fast: bool, roi_subset: bool) -> tuple[Model, ...]:
    """The models TotalSegmentator runs for task `total` in this mode, as its python_api chooses them."""
    require_package()
    from totalsegmentator.map_tasks_config import TASK_CONFIGS, TASK_ID_WEIGHTS_CONFIGS

    mode = TASK_CONFIGS[TASK]["sub_modes"]["fast" if fast else "default"]
    ids = mode["task_id"] if isinstance(mode["task_id"], list) else [mode["task_id"]]
    found = [Model(i, TASK_ID_WEIGHTS_CONFIGS[i]["foldername"], mode["trainer"]) for i in ids]
    if roi_subset:
        found.append(Model(CROP_MODEL, TASK_ID_WEIGHTS_CONFIGS[CROP_MODEL]["foldername"], CROP_TRAINER))
    return tuple(found)


def check_weights(weights_dir: Path, fast: bool, roi_subset: bool) -> tuple[Model, ...]:
    """The mode's models, each with its checkpoint present under `weights_dir`.

    Raises WeightsMissingError naming the missing folders and the command that fetches them, so
    TotalSegmentator never gets to download anything itself.
    """
    needed = models(fast, roi_subset)
    missing = [m for m in needed if not m.checkpoint(weights_dir).is_file()]
    if missing:
        folders = ", ".join(str(m.checkpoint(weights_dir).relative_to(weights_dir)) for m in missing)
        raise WeightsMissingError(
            f"TotalSegmentator weights missing in {weights_dir}: {folders}; fetch them with: "
            f"{download_command(weights_dir, fast)}"
        )
    return needed


@cache
def structures() -> dict[int, str]:
    """Label value -> TotalSegmentator's name of the structure, for task `total` (117 of them)."""
    require_package()
    from totalsegmentator.map_to_binary import class_map

    return dict(class_map[TASK])


def check_roi_subset(names: Sequence[str]) -> None:
    """Raise ValueError naming each of `names` that is not a structure of the task (with a near one)."""
    known = set(structures().values())
    unknown = [name for name in names if name not in known]
    if unknown:
        hints = {name: get_close_matches(name, known, n=1) for name in unknown}
        named = ", ".join(f"{n!r}" + (f" (did you mean {h[0]!r}?)" if h else "") for n, h in hints.items())
        raise ValueError(f"roi_subset: not structures of TotalSegmentator's task {TASK}: {named}")


def snomed_rows() -> dict[str, dict[str, str]]:
    """The SNOMED CT table TotalSegmentator ships, by structure name (all its tasks)."""
    require_package()
    text = resources.files("totalsegmentator").joinpath(SNOMED_TABLE).read_text(encoding="utf-8")
    return {row["Structure"]: row for row in csv.DictReader(text.splitlines())}


def _code(row: dict[str, str], sequence: str) -> Code | None:
    value = row[f"{sequence}.CodeValue"]
    if not value:
        return None
    return Code(value, row[f"{sequence}.CodingSchemeDesignator"], row[f"{sequence}.CodeMeaning"])


@cache
def label_table() -> dict[int, LabelSpec]:
    """Label value -> coded segment for the 117 structures, from TotalSegmentator's own table.

    The laterality is the table's type modifier, or its anatomic region modifier where the
    structure is coded by region (the kidney cysts); `dicom_io.results` writes it back in the same
    place. Raises ValueError when a structure of the task has no row (a package this was not
    written for).
    """
    rows = snomed_rows()
    table: dict[int, LabelSpec] = {}
    for value, name in structures().items():
        row = rows.get(name)
        category = None if row is None else _code(row, "SegmentedPropertyCategoryCodeSequence")
        property_type = None if row is None else _code(row, "SegmentedPropertyTypeCodeSequence")
        if row is None or category is None or property_type is None:
            raise ValueError(f"TotalSegmentator's {SNOMED_TABLE} has no codes for {name!r}")
        red, green, blue = (int(c) for c in row["DicomRGBColor"].split(","))
        table[value] = LabelSpec(
            label=name,
            category=category,
            property_type=property_type,
            color_rgb=(red, green, blue),
            anatomic_region=_code(row, "AnatomicRegionSequence"),
            laterality=_code(row, "SegmentedPropertyTypeModifierCodeSequence")
            or _code(row, "AnatomicRegionModifierSequence"),
        )
    return table
