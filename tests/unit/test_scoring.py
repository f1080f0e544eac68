"""HD95's surface distances on the masks' bounding box equal those on the whole array, bit for bit.

`dicom_io.scoring.surface_distances` crops both masks before finding their surfaces; the reference
here finds them and measures on the whole array. Masks touching the array's border (where the
border itself makes a voxel a surface voxel), single voxels, whole volumes and anisotropic spacing
are the cases a wrong crop (too tight, one mask's box only, padding) would change.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest
from scipy import ndimage

from dicom_io.scoring import Spacing, bounding_box, hd95, surface, surface_distances

Mask = npt.NDArray[np.bool_]


def uncropped(a: Mask, b: Mask, spacing: Spacing) -> tuple[npt.NDArray[np.float64], ...]:
    sa, sb = surface(a), surface(b)
    to_b = ndimage.distance_transform_edt(~sb, sampling=spacing)
    to_a = ndimage.distance_transform_edt(~sa, sampling=spacing)
    return np.asarray(to_b[sa], dtype=np.float64), np.asarray(to_a[sb], dtype=np.float64)


def assert_identical(a: Mask, b: Mask, spacing: Spacing) -> None:
    ours, theirs = surface_distances(a, b, spacing), uncropped(a, b, spacing)
    for mine, full in zip(ours, theirs, strict=True):
        assert mine.dtype == full.dtype and np.array_equal(mine, full)


def _border_cases() -> list[tuple[Mask, Mask]]:
    shape = (6, 9, 7)
    cases = []
    for axis in range(3):
        for end in (0, -1):
            face = np.zeros(shape, dtype=bool)
            index: list[slice | int] = [slice(None)] * 3
            index[axis] = end
            face[tuple(index)] = True  # one whole face of the array: its voxels are all surface
            inside = np.zeros(shape, dtype=bool)
            inside[2:4, 3:6, 2:5] = True  # away from the border: its box is smaller than the face's
            cases += [(face, inside), (inside, face)]
    whole = np.ones(shape, dtype=bool)
    corner = np.zeros(shape, dtype=bool)
    corner[-1, -1, -1] = True
    slab = np.zeros(shape, dtype=bool)
    slab[:, 4:, :] = True  # touches five faces; its inner voxels are not surface
    cases += [(whole, corner), (corner, whole), (slab, corner), (whole, slab), (corner, corner)]
    return cases


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (3.0, 0.7, 0.9), (0.1, 7.3, 1e-3)])
def test_masks_at_the_border_measure_as_on_the_whole_array(spacing: Spacing) -> None:
    for a, b in _border_cases():
        assert_identical(a, b, spacing)
        ab, ba = uncropped(a, b, spacing)
        assert hd95(a, b, spacing) == float(max(np.percentile(ab, 95), np.percentile(ba, 95)))


def test_random_masks_measure_as_on_the_whole_array() -> None:
    rng = np.random.default_rng(3)
    for shape in [(1, 12, 20), (18, 30, 26), (7, 40, 3), (2, 2, 2)]:
        for spacing in [(1.0, 1.0, 1.0), (2.5, 0.976562, 0.976562)]:
            for sigma in (0.0, 1.5):
                a = ndimage.gaussian_filter(rng.random(shape), sigma) > 0.55
                b = ndimage.gaussian_filter(rng.random(shape), sigma) > 0.55
                if a.any() and b.any():
                    assert_identical(a, b, spacing)


def test_the_box_holds_every_voxel_plus_the_margin_clipped_to_the_array() -> None:
    mask = np.zeros((5, 6, 7), dtype=bool)
    mask[0, 2, 3] = mask[2, 4, 6] = True
    assert bounding_box(mask, 1) == (slice(0, 4), slice(1, 6), slice(2, 8))
    assert bounding_box(mask, 0) == (slice(0, 3), slice(2, 5), slice(3, 7))
    empty = np.zeros((4, 4, 4), dtype=bool)
    assert hd95(empty, empty, (1.0, 1.0, 1.0)) == 0.0
    assert hd95(mask, np.zeros_like(mask), (1.0, 1.0, 1.0)) is None
