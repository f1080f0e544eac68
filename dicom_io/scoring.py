"""Scoring a segmentation against a reference: overlap, surface distance, volumes; structure matching.

Pure numpy/scipy on masks (z, y, x) with their voxel spacing; nothing here runs a pipeline.

* Dice = 2|A∩B| / (|A| + |B|) (1.0 when both are empty).
* HD95: symmetric 95th-percentile Hausdorff distance in mm between the two surfaces. The surface
  of a mask is its voxels with a 6-neighbour outside it (or at the array's border); the directed
  distances are from every surface voxel centre of one mask to the nearest surface voxel centre of
  the other (Euclidean distance transform with the voxel spacing); HD95 is the larger of the two
  directed 95th percentiles (linear interpolation), as MONAI's `compute_hausdorff_distance(...,
  percentile=95)` defines it. None when exactly one mask is empty (no surface to measure to).
* Matching reference structures to a pipeline's segments (`match_structures`): an explicit
  mapping when given, else by code (the same segmented property type and the same laterality, or
  none on either side), else by name (normalised words: 'Lung L' = 'Left lung' = 'lung_left').
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from dicom_io.reference import ReferenceInputError, Structure
from dicom_io.types import Code, Segment

Spacing = tuple[float, float, float]
"""Voxel size in mm along (z, y, x), like `Volume.spacing`."""


def dice(a: npt.NDArray[np.bool_], b: npt.NDArray[np.bool_]) -> float:
    """Dice coefficient of two masks of the same shape (1.0 when both are empty)."""
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


def surface(mask: npt.NDArray[np.bool_]) -> npt.NDArray[np.bool_]:
    """Voxels of the mask with a 6-neighbour outside it (voxels at the array border count)."""
    inner = ndimage.binary_erosion(
        mask, structure=ndimage.generate_binary_structure(mask.ndim, 1), border_value=0
    )
    return np.logical_and(mask, ~inner)


def bounding_box(mask: npt.NDArray[np.bool_], margin: int) -> tuple[slice, ...]:
    """The slices of the smallest box holding every True voxel of a non-empty mask, widened by
    `margin` voxels on each side and clipped to the array."""
    box = []
    for axis in range(mask.ndim):
        others = tuple(i for i in range(mask.ndim) if i != axis)
        [idx] = np.nonzero(mask.any(axis=others))
        box.append(slice(max(int(idx[0]) - margin, 0), int(idx[-1]) + 1 + margin))
    return tuple(box)


def surface_distances(
    a: npt.NDArray[np.bool_], b: npt.NDArray[np.bool_], spacing: Spacing
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Distances (mm) from each surface voxel of `a` to `b`'s surface, and from `b`'s to `a`'s.

    Both masks must be non-empty. Computed on the bounding box of the two plus one voxel (clipped
    to the array), surfaces included, and equal to the full-array result: a voxel of either mask
    has all its 6-neighbours inside the box unless it lies on the array's border, where the
    surface is the same in the box (its border) as in the array; the distance transform then
    sees exactly the surface voxels it would see on the whole array.
    """
    box = bounding_box(np.logical_or(a, b), margin=1)
    sa, sb = surface(a[box]), surface(b[box])
    to_b = ndimage.distance_transform_edt(~sb, sampling=spacing)
    to_a = ndimage.distance_transform_edt(~sa, sampling=spacing)
    return np.asarray(to_b[sa], dtype=np.float64), np.asarray(to_a[sb], dtype=np.float64)


def hd95(a: npt.NDArray[np.bool_], b: npt.NDArray[np.bool_], spacing: Spacing) -> float | None:
    """Symmetric 95th-percentile Hausdorff distance in mm (module docstring); None if one is empty."""
    if not a.any() and not b.any():
        return 0.0
    if not a.any() or not b.any():
        return None
    ab, ba = surface_distances(a, b, spacing)
    return float(max(np.percentile(ab, 95), np.percentile(ba, 95)))


@dataclass(frozen=True)
class Score:
    """One structure of one case: the reference's name, the pipeline segment's label, the figures."""

    segment: str
    reference: str
    matched_by: str  # "map", "code" or "label"
    dice: float
    hd95_mm: float | None
    reference_ml: float
    pipeline_ml: float

    @property
    def difference_ml(self) -> float:
        return self.pipeline_ml - self.reference_ml

    @property
    def difference_percent(self) -> float:
        return 100.0 * self.difference_ml / self.reference_ml if self.reference_ml else math.inf

    def as_dict(self) -> dict[str, Any]:
        return {
            "segment": self.segment,
            "reference": self.reference,
            "matched_by": self.matched_by,
            "dice": self.dice,
            "hd95_mm": self.hd95_mm,
            "reference_ml": self.reference_ml,
            "pipeline_ml": self.pipeline_ml,
            "difference_ml": self.difference_ml,
            "difference_percent": self.difference_percent,
        }


def score(
    segment: str,
    reference: str,
    matched_by: str,
    predicted: npt.NDArray[np.bool_],
    truth: npt.NDArray[np.bool_],
    spacing: Spacing,
    voxel_ml: float,
) -> Score:
    """Dice, HD95 and volumes of a predicted mask against the reference mask on the same grid."""
    if predicted.shape != truth.shape:
        raise ValueError(f"masks of different shapes: {predicted.shape} and {truth.shape}")
    return Score(
        segment=segment,
        reference=reference,
        matched_by=matched_by,
        dice=dice(predicted, truth),
        hd95_mm=hd95(predicted, truth, spacing),
        reference_ml=float(truth.sum()) * voxel_ml,
        pipeline_ml=float(predicted.sum()) * voxel_ml,
    )


def summary(cases: Sequence[tuple[str, Sequence[Score]]]) -> list[dict[str, Any]]:
    """Per segment over all cases: the mean and the worst of Dice, HD95 and volume difference.

    The worst Dice is the lowest, the worst HD95 the largest (None, an empty prediction, is worst),
    the worst volume difference the largest in absolute value; each names its case.
    """
    by_segment: dict[str, list[tuple[str, Score]]] = {}
    for case, scores in cases:
        for s in scores:
            by_segment.setdefault(s.segment, []).append((case, s))
    out = []
    for segment, rows in by_segment.items():
        worst_dice = min(rows, key=lambda r: r[1].dice)
        worst_hd = max(rows, key=lambda r: math.inf if r[1].hd95_mm is None else r[1].hd95_mm)
        worst_volume = max(rows, key=lambda r: abs(r[1].difference_percent))
        distances = [s.hd95_mm for _, s in rows if s.hd95_mm is not None]
        out.append(
            {
                "segment": segment,
                "cases": len(rows),
                "dice_mean": float(np.mean([s.dice for _, s in rows])),
                "dice_worst": worst_dice[1].dice,
                "dice_worst_case": worst_dice[0],
                "hd95_mm_mean": float(np.mean(distances)) if len(distances) == len(rows) else None,
                "hd95_mm_worst": worst_hd[1].hd95_mm,
                "hd95_mm_worst_case": worst_hd[0],
                "difference_percent_mean": float(np.mean([s.difference_percent for _, s in rows])),
                "difference_percent_worst": worst_volume[1].difference_percent,
                "difference_percent_worst_case": worst_volume[0],
            }
        )
    return out


# --- matching -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Match:
    """A reference structure paired with the pipeline segment it is scored against."""

    structure: Structure
    segment: Segment
    by: str  # "map", "code" or "label"


def words(name: str) -> frozenset[str]:
    """A name as a set of normalised words: 'Lung_L', 'LungL', 'left lungs' -> {'lung', 'left'}."""
    out = set()
    for raw in re.findall(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|\d+", name):
        word = raw.lower()
        word = _ALIASES.get(word, word)
        if len(word) > 3 and word.endswith("s") and not word.endswith("ss"):
            word = word[:-1]
        out.add(word)
    return frozenset(out)


_ALIASES = {
    "l": "left",
    "lt": "left",
    "lft": "left",
    "sin": "left",
    "r": "right",
    "rt": "right",
    "rgt": "right",
    "dx": "right",
    "pulmonary": "lung",
}


def parse_mapping(pairs: Sequence[str]) -> dict[str, str]:
    """--map REFERENCE=SEGMENT pairs as a dict; ValueError for a pair without '=' or a side empty."""
    out: dict[str, str] = {}
    for pair in pairs:
        ref, sep, seg = pair.partition("=")
        if not sep or not ref.strip() or not seg.strip():
            raise ValueError(f"--map needs REFERENCE=SEGMENT, got {pair!r}")
        out[ref.strip()] = seg.strip()
    return out


def _same(a: Code | None, b: Code | None) -> bool:
    return a is not None and b is not None and (a.value, a.scheme) == (b.value, b.scheme)


def _segment_names(segment: Segment) -> list[frozenset[str]]:
    names = [words(segment.label)]
    coded = " ".join(c.meaning for c in (segment.laterality, segment.property_type) if c is not None)
    if coded:
        names.append(words(coded))
    return names


def _find(name: str, candidates: Sequence[Any], names: Any) -> Any:
    exact = [c for c in candidates if name in names(c)]
    folded = [c for c in candidates if name.casefold() in {n.casefold() for n in names(c)}]
    found = exact or folded
    return found[0] if len(found) == 1 else None


def match_structures(
    structures: Sequence[Structure], segments: Sequence[Segment], mapping: Mapping[str, str] | None = None
) -> list[Match]:
    """Pair reference structures with the pipeline's segments (module docstring for the order).

    With `mapping` ({reference name or alias: segment label or number}) exactly those pairs are
    scored. Raises ReferenceInputError for a mapping that names an unknown structure or segment,
    for two structures on one segment, and when nothing matches.
    """
    if mapping:
        matches = []
        for ref_name, seg_name in mapping.items():
            structure = _find(ref_name, structures, lambda s: (s.name, *s.aliases))
            if structure is None:
                known = ", ".join(repr(s.name) for s in structures)
                raise ReferenceInputError(
                    f"--map: the reference has no structure {ref_name!r} (it has {known})"
                )
            segment = _find(seg_name, segments, lambda s: (s.label, str(s.number)))
            if segment is None:
                known = ", ".join(f"{s.number} {s.label!r}" for s in segments)
                raise ReferenceInputError(f"--map: the pipeline has no segment {seg_name!r} (it has {known})")
            matches.append(Match(structure, segment, "map"))
    else:
        matches = [m for m in (_auto_match(s, segments) for s in structures) if m is not None]
    taken: dict[int, Match] = {}
    for m in matches:
        if m.segment.number in taken:
            raise ReferenceInputError(
                f"reference structures {taken[m.segment.number].structure.name!r} and "
                f"{m.structure.name!r} both match segment {m.segment.label!r}; say which with --map"
            )
        taken[m.segment.number] = m
    if not matches:
        raise ReferenceInputError(
            "no reference structure matches a segment of the pipeline (reference: "
            + ", ".join(repr(s.name) for s in structures)
            + "; pipeline: "
            + ", ".join(repr(s.label) for s in segments)
            + "); pair them with --map REFERENCE=SEGMENT"
        )
    return matches


def _auto_match(structure: Structure, segments: Sequence[Segment]) -> Match | None:
    if structure.property_type is not None:
        coded = [
            s
            for s in segments
            if _same(s.property_type, structure.property_type)
            and (_same(s.laterality, structure.laterality) or s.laterality is structure.laterality is None)
        ]
        if len(coded) == 1:
            return Match(structure, coded[0], "code")
    name = words(structure.name)
    named = [s for s in segments if name in _segment_names(s)]
    return Match(structure, named[0], "label") if len(named) == 1 else None
