"""The series each built-in pipeline wants (`dicom_io.selection.SeriesWanted`), without torch.

The pipelines declare them as their `series` attribute by pointing here. They live in a module of
their own because the Orthanc plugin ranks series inside Orthanc's process, where torch must never
load: it reads them from `BUILTIN_SERIES` without importing the pipelines.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from dicom_io.selection import CT_SHARP_KERNELS, CT_SOFT_KERNELS, SeriesWanted

MIN_HEAD_EXTENT_MM = 100.0

CT_LUNG = SeriesWanted(  # densitometry (LAA-950) wants the thinnest soft/standard reconstruction
    modalities=("CT",),
    planes=("axial",),
    min_slices=20,
    min_coverage_mm=80.0,
    slice_thickness_mm=(0.5, 10.0),
    kernels=(CT_SOFT_KERNELS, CT_SHARP_KERNELS),
)

MR_BRAIN = SeriesWanted(  # a whole-head 3-D T1 (MPRAGE and its vendor twins) is what HD-BET is for
    modalities=("MR",),
    min_slices=20,
    min_coverage_mm=MIN_HEAD_EXTENT_MM,
    acquisition="3D",
    descriptions=(r"T1|MPRAGE|MP-?RAGE|SPGR|BRAVO|TFE|FLASH|tfl3d",),
)

TOTALSEGMENTATOR = SeriesWanted(  # any plane; soft-tissue kernels first, as it was trained on
    modalities=("CT",),
    min_slices=10,
    kernels=(CT_SOFT_KERNELS, CT_SHARP_KERNELS),
)

MODALITY_NAMES = {"MRI": "MR", "MR": "MR", "CT": "CT", "PET": "PT", "PT": "PT", "US": "US"}


def bundle_metadata(bundle_dir: str | Path) -> dict[str, Any]:
    """A MONAI bundle's configs/metadata.json; empty when it has none."""
    path = Path(bundle_dir) / "configs" / "metadata.json"
    data: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
    return data


def bundle_modalities(metadata: Mapping[str, Any]) -> tuple[str, ...]:
    """DICOM modalities named by the bundle's metadata (network_data_format.inputs.*.modality)."""
    inputs = metadata.get("network_data_format", {}).get("inputs", {})
    names = {MODALITY_NAMES.get(str(i.get("modality", "")).upper(), "") for i in inputs.values()}
    return tuple(sorted(n for n in names if n))


def monai_bundle(
    bundle_dir: str | Path, modalities: tuple[str, ...] | None = None, min_slices: int = 1, **_: Any
) -> SeriesWanted:
    """What a configured MONAI bundle wants: its modalities (configured, else its metadata's)."""
    return SeriesWanted(
        modalities=tuple(modalities or bundle_modalities(bundle_metadata(bundle_dir))), min_slices=min_slices
    )


def nnunet(
    model_dir: str | Path, modalities: tuple[str, ...] | None = None, min_slices: int = 1, **_: Any
) -> SeriesWanted:
    """What a configured nnU-Net model wants: its modalities (configured, else its input channel's, e.g.
    "CT"; a channel named after no modality, e.g. "T1", leaves any modality)."""
    from ai_models.nnunet_folder import input_channel

    named = MODALITY_NAMES.get(input_channel(model_dir).strip().upper())
    return SeriesWanted(modalities=tuple(modalities or ((named,) if named else ())), min_slices=min_slices)


def totalsegmentator(min_slices: int = TOTALSEGMENTATOR.min_slices, **_: Any) -> SeriesWanted:
    """What a configured TotalSegmentator wants: CT, at least `min_slices` planes."""
    return dataclasses.replace(TOTALSEGMENTATOR, min_slices=min_slices)


BUILTIN_SERIES: dict[str, Callable[..., SeriesWanted]] = {
    "ct-lung": lambda **_: CT_LUNG,
    "mr-brain": lambda **_: MR_BRAIN,
    "monai-bundle": monai_bundle,
    "nnunet": nnunet,
    "totalsegmentator": totalsegmentator,
}
"""Built-in pipeline name -> its declaration, given the pipeline's options."""
