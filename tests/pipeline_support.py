"""Helpers the pipeline tests share: volumes straight from phantoms, re-oriented copies, pictures."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from dicom_io.synthetic import SyntheticSeries
from dicom_io.types import SourceRef, Volume

SOP_CT = "1.2.840.10008.5.1.4.1.1.2"


def phantom_volume(series: SyntheticSeries, **attributes: Any) -> Volume:
    """A Volume built from the phantom's voxels and affine (no DICOM round trip)."""
    modality = str(series.datasets[0].Modality)
    refs = tuple(SourceRef(str(ds.SOPClassUID), str(ds.SOPInstanceUID)) for ds in series.datasets)
    attrs = {"Modality": modality, "BodyPartExamined": str(series.datasets[0].BodyPartExamined)}
    attrs.update(attributes)
    return Volume(series.voxels, series.affine, refs, attrs)


def flipped(volume: Volume, axis: int) -> Volume:
    """The same patient with voxel axis `axis` (0 slice, 1 row, 2 column) stored backwards.

    The affine is changed to match, so every voxel keeps its place in the patient: a pipeline that
    reads sides from the affine gives the same answer, one that reads the array index does not.
    """
    n = volume.shape[axis]
    column = 2 - axis  # affine column of that voxel axis
    affine = volume.affine.copy()
    affine[:3, 3] += affine[:3, column] * (n - 1)
    affine[:3, column] *= -1
    sources = volume.sources[::-1] if axis == 0 else volume.sources
    return Volume(
        np.ascontiguousarray(np.flip(volume.voxels, axis)), affine, sources, dict(volume.attributes)
    )


def flip_mask(mask: npt.NDArray[np.bool_], axis: int) -> npt.NDArray[np.bool_]:
    return np.ascontiguousarray(np.flip(mask, axis))


def overlay_png(
    image: npt.NDArray[Any], masks: list[npt.NDArray[np.bool_]], path: Path, window: tuple[float, float]
) -> None:
    """One 2-D image with coloured mask outlines filled at 40 % (for looking, not for asserting)."""
    from PIL import Image

    lo, hi = window
    grey = np.clip((image.astype(np.float32) - lo) / (hi - lo) * 255.0, 0, 255).astype(np.uint8)
    rgb = np.repeat(grey[..., None], 3, axis=2).astype(np.float32)
    colours = [(255, 60, 60), (60, 160, 255), (255, 220, 0), (0, 255, 120)]
    for mask, colour in zip(masks, colours, strict=False):
        rgb[mask] = 0.6 * rgb[mask] + 0.4 * np.array(colour, dtype=np.float32)
    Image.fromarray(rgb.astype(np.uint8)).save(path)
