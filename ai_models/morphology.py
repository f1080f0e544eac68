"""Binary morphology as torch ops, so it runs where the tensor lives (GPU or CPU); connected components.

Masks are bool tensors indexed (z, y, x). Neighbourhoods are boxes (one voxel per step along each
axis, or a half-width per axis for anisotropic grids); connected components are face-connected
(6-connected in 3-D, 4-connected per slice), labelled on the CPU and handed back on the mask's device.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy import ndimage


def _max(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Element-wise maximum; logical or for masks (every backend has it for bool)."""
    return torch.logical_or(a, b) if a.dtype == torch.bool else torch.maximum(a, b)


def box_max(t: torch.Tensor, radius: Sequence[int] = (1, 1, 1)) -> torch.Tensor:
    """Maximum over a box of half-widths `radius` (z, y, x), one axis at a time with shifted slices.

    Separable shifts cost 2r cheap element-wise ops per axis instead of a (2r+1)^3 window per voxel.
    Voxels beyond the array do not take part.
    """
    out = t
    for dim, r in enumerate(radius):
        n = out.shape[dim]
        src = out
        out = src.clone()
        for step in range(1, min(r, n - 1) + 1):
            ahead, behind = out.narrow(dim, step, n - step), out.narrow(dim, 0, n - step)
            ahead.copy_(_max(ahead, src.narrow(dim, 0, n - step)))
            behind.copy_(_max(behind, src.narrow(dim, step, n - step)))
    return out


def dilate(mask: torch.Tensor, radius: Sequence[int] = (1, 1, 1)) -> torch.Tensor:
    """Dilation by a box of half-widths `radius` (z, y, x)."""
    return box_max(mask, radius)


def erode(mask: torch.Tensor, radius: Sequence[int] = (1, 1, 1)) -> torch.Tensor:
    """Erosion by a box; beyond the array counts as foreground (structures cut by the field of view stay)."""
    return ~box_max(~mask, radius)


def label(mask: torch.Tensor, dims: Sequence[int] = (0, 1, 2)) -> tuple[torch.Tensor, int]:
    """Face-connected components along `dims`: (int32 labels 1..n on the mask's device, 0 for background; n).

    `dims=(1, 2)` labels each slice on its own (4-connected in the plane). The labelling runs on a
    CPU copy with `scipy.ndimage.label` (docs/design.md, "ct-lung"); callers label working grids,
    not full-resolution volumes, so the copy is small.
    """
    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1, 1, 1] = True
    for dim in dims:
        index = [1, 1, 1]
        for offset in (0, 2):
            index[dim] = offset
            structure[tuple(index)] = True
    labels, n = ndimage.label(mask.cpu().numpy(), structure=structure, output=np.int32)
    return torch.from_numpy(labels).to(mask.device), int(n)


def component_sizes(labels: torch.Tensor, n: int) -> torch.Tensor:
    """Voxel count of each component 0..n (index 0 is the background)."""
    return torch.bincount(labels.reshape(-1).to(torch.int64), minlength=n + 1)


def touching(labels: torch.Tensor, n: int, dims: Sequence[int]) -> torch.Tensor:
    """Bool per label 0..n: the component reaches a face of the array perpendicular to one of `dims`."""
    hit = torch.zeros(n + 1, dtype=torch.bool, device=labels.device)
    for dim in dims:
        for index in (0, labels.shape[dim] - 1):
            hit[labels.select(dim, index).reshape(-1).to(torch.int64)] = True
    hit[0] = False
    return hit


def grow(labels: torch.Tensor, allowed: torch.Tensor, reach: int | Sequence[int]) -> torch.Tensor:
    """Geodesic growth of non-zero labels into `allowed` voxels, at most `reach` voxels along each axis.

    A per-axis reach keeps the growth about equal in millimetres on anisotropic grids: each step
    advances only along the axes whose share of the distance is due. Where two labels meet in the
    same step the larger label value wins.
    """
    reach = (reach,) * 3 if isinstance(reach, int) else tuple(reach)
    steps = max(reach)
    out = labels.clone()
    for i in range(1, steps + 1):
        radius = [(i * r) // steps - ((i - 1) * r) // steps for r in reach]
        grown = box_max(out, radius)
        new = (out == 0) & allowed & (grown > 0)
        if not bool(new.any()):
            break
        out = torch.where(new, grown, out)
    return out


def fill_holes(mask: torch.Tensor, dims: Sequence[int] = (0, 1, 2)) -> torch.Tensor:
    """The mask plus every background pocket it encloses (background not reaching the array's faces).

    With `dims=(1, 2)` each slice is filled on its own: pockets enclosed within the slice's plane.
    """
    labels, n = label(~mask, dims)
    outer = touching(labels, n, dims)
    outer[0] = True
    return mask | ~outer[labels.to(torch.int64)]


def upsample(coarse: torch.Tensor, factors: Sequence[int], shape: Sequence[int]) -> torch.Tensor:
    """Nearest-neighbour upsampling by integer factors, cropped to `shape` (inverse of a ceil-mode pool)."""
    out = coarse
    for dim, f in enumerate(factors):
        if f > 1:
            out = out.repeat_interleave(f, dim=dim)
    return out[: shape[0], : shape[1], : shape[2]]
