"""A model's integer label map on the volume grid + a label table → `Findings` (segments and volumes).

What every label-map model pipeline (monai-bundle, nnunet, totalsegmentator) does last: one coded
segment and one volume measurement per table entry, label values the table lacks left out with a
note, the key slice where the labels cover most area.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

from ai_models.base import UNIT_CM3, VOLUME
from dicom_io.labels import LabelSpec
from dicom_io.types import Findings, GeometryError, Measurement, Segment, Volume


def label_findings(
    pipeline: str, version: str, volume: Volume, labels: npt.NDArray[Any], table: Mapping[int, LabelSpec]
) -> Findings:
    """Findings of `labels` (integers, shape `volume.shape`, 0 background) coded by `table`.

    Raises GeometryError when the label map is not on the volume grid.
    """
    if labels.shape != volume.shape:
        raise GeometryError(f"{pipeline}: a label map of shape {labels.shape} for a volume of {volume.shape}")
    voxel_ml = volume.voxel_volume_ml
    segments, measurements = [], []
    for value, spec in sorted(table.items()):
        mask = labels == value
        segments.append(
            Segment(
                value,
                spec.label,
                spec.category,
                spec.property_type,
                mask,
                anatomic_region=spec.anatomic_region,
                laterality=spec.laterality,
                color_rgb=spec.color_rgb,
            )
        )
        measurements.append(Measurement(VOLUME, float(mask.sum()) * voxel_ml, UNIT_CM3, value))
    unknown = sorted(set(np.unique(labels).tolist()) - set(table) - {0})
    area = (labels > 0).sum(axis=(1, 2))
    return Findings(
        pipeline=pipeline,
        version=version,
        shape=volume.shape,
        segments=tuple(segments),
        measurements=tuple(measurements),
        key_slices=(int(area.argmax()),) if area.any() else (),
        notes=(f"label values without a table entry were left out: {unknown}",) if unknown else (),
    )
