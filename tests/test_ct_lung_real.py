"""ct-lung on a real chest CT, scored end to end: SEG written, read back, Dice against clinical contours.

The case is LUNG1-001 of NSCLC-Radiomics (see shared/testdata/README.md): 134 axial slices with a
tumour, and the radiotherapy contours `Lung L` / `Lung R` rasterised onto the CT grid
(`lungs-reference.nii.gz`: 1 left, 2 right, RAS affine). The pipeline runs the way
`radgate run --pipeline ct-lung` runs it; the lungs are rebuilt from the SEG's frames, placed on
the CT grid through their source references, and compared with the reference placed there
through the affines (never by assuming an axis order).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import numpy.typing as npt
import pydicom
import pytest
import torch

from dicom_io.volume import load_series
from plugin.offline import DICOM_DIR, run_offline

CASE = "ct-chest-nsclc-lung1-001"
REFERENCE_LABELS = {"Left lung": 1, "Right lung": 2}  # label values of lungs-reference.nii.gz
MIN_DICE = 0.95
MAX_VOLUME_ERROR = 0.07
Mask = npt.NDArray[np.bool_]


def _dice(a: Mask, b: Mask) -> float:
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


def _reference_on_ct_grid(
    path: Path, ct_affine: npt.NDArray[np.float64], shape: tuple[int, ...]
) -> np.ndarray:
    """The NIfTI label map sampled on the CT grid (z, y, x), through the affines.

    The NIfTI affine maps (i, j, k) to RAS mm, the CT's maps (x, y, z) = (column, row, slice) to LPS.
    The reference is on the CT grid, so the voxel-to-voxel map must be a signed axis permutation
    with whole-voxel offsets; anything else fails the assertion instead of being resampled.
    """
    image = nib.load(path)
    data = np.asarray(image.dataobj)
    lps_to_ras = np.diag([-1.0, -1.0, 1.0, 1.0])
    ct_to_ref = np.linalg.inv(image.affine) @ lps_to_ras @ ct_affine  # CT (x, y, z) -> reference (i, j, k)
    turn = np.round(ct_to_ref[:3, :3])
    assert np.allclose(ct_to_ref[:3, :3], turn, atol=1e-3), "the reference is not on the CT grid"
    assert (np.abs(turn).sum(axis=0) == 1).all() and (np.abs(turn).sum(axis=1) == 1).all()
    ct_lengths = (shape[2], shape[1], shape[0])  # along x, y, z
    index: list[np.ndarray] = [np.empty(0, dtype=int)] * 3
    ref_axis_of = []
    for c in range(3):
        a = int(np.nonzero(turn[:, c])[0][0])
        along = turn[a, c] * np.arange(ct_lengths[c]) + ct_to_ref[a, 3]
        assert np.allclose(along, np.round(along), atol=1e-3), "the reference is shifted by part of a voxel"
        index[a] = np.round(along).astype(int)
        assert index[a].min() >= 0 and index[a].max() < data.shape[a]
        ref_axis_of.append(a)
    sampled = data[np.ix_(*index)]
    return np.transpose(sampled, (ref_axis_of[2], ref_axis_of[1], ref_axis_of[0]))


@dataclass(frozen=True)
class Scored:
    segments: dict[str, Mask]  # SEG segment label -> mask on the CT grid (z, y, x)
    reference: np.ndarray
    voxel_ml: float


@pytest.fixture(scope="module")
def scored(testdata: Path, tmp_path_factory: pytest.TempPathFactory) -> Scored:
    case = testdata / CASE
    out = tmp_path_factory.mktemp("lung1")
    run_offline("ct-lung", case / "ct", out, device=torch.device("cpu"), progress=False)
    volume = load_series(sorted((case / "ct").iterdir()))
    [seg_path] = [
        p
        for p in (out / DICOM_DIR).iterdir()
        if pydicom.dcmread(p, stop_before_pixels=True).Modality == "SEG"
    ]
    seg = hd.seg.segread(seg_path)
    numbers = {str(s.SegmentLabel): int(s.SegmentNumber) for s in seg.SegmentSequence}
    order = sorted(numbers.values())
    # frames in the CT's slice order, by the source instance each frame was derived from
    pixels = seg.get_pixels_by_source_instance(
        [s.sop_instance_uid for s in volume.sources],
        segment_numbers=order,
        assert_missing_frames_are_empty=True,
    )
    segments = {label: pixels[..., order.index(number)] > 0 for label, number in numbers.items()}
    reference = _reference_on_ct_grid(case / "lungs-reference.nii.gz", volume.affine, volume.shape)
    return Scored(segments, reference, volume.voxel_volume_ml)


def test_the_seg_holds_the_lungs_and_emphysema_not_the_body(scored: Scored) -> None:
    assert set(scored.segments) == {"Right lung", "Left lung", "Emphysema (LAA-950)"}
    lungs = scored.segments["Right lung"] | scored.segments["Left lung"]
    assert not (scored.segments["Right lung"] & scored.segments["Left lung"]).any()
    assert not (scored.segments["Emphysema (LAA-950)"] & ~lungs).any(), "emphysema outside the lungs"


@pytest.mark.parametrize("label", sorted(REFERENCE_LABELS))
def test_each_lung_matches_the_clinical_contour(scored: Scored, label: str) -> None:
    mask, truth = scored.segments[label], scored.reference == REFERENCE_LABELS[label]
    dice = _dice(mask, truth)
    ml, truth_ml = float(mask.sum()) * scored.voxel_ml, float(truth.sum()) * scored.voxel_ml
    assert dice >= MIN_DICE, f"{label}: Dice {dice:.3f}"
    assert abs(ml - truth_ml) <= MAX_VOLUME_ERROR * truth_ml, (
        f"{label}: {ml:.0f} mL, contour {truth_ml:.0f} mL"
    )
