"""Binary morphology and connected components as torch ops, so they run where the tensor lives (GPU or CPU).

Masks are bool tensors indexed (z, y, x). Neighbourhoods are boxes (one voxel per step along each
axis, or a half-width per axis for anisotropic grids); connected components are 6-connected.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


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


def _run_max(labels: torch.Tensor, mask: torch.Tensor, dim: int) -> torch.Tensor:
    """Give every voxel of each straight run of `mask` along `dim` the run's largest label."""
    n = mask.shape[dim]
    starts = mask.clone()
    starts.narrow(dim, 1, n - 1).logical_and_(~mask.narrow(dim, 0, n - 1))
    # run number within its line, made unique by the line's index (a line holds at most n // 2 + 1 runs)
    local = torch.cumsum(starts, dim, dtype=torch.int64)
    line_shape = [1 if d == dim else size for d, size in enumerate(mask.shape)]
    lines = torch.arange(mask.numel() // n, device=mask.device).reshape(line_shape)
    run_id = (lines * (n // 2 + 2) + local).reshape(-1)
    best = torch.zeros(int(run_id.max()) + 1, dtype=labels.dtype, device=labels.device)
    best.scatter_reduce_(0, run_id, labels.reshape(-1), reduce="amax")
    return torch.where(mask, best[run_id].reshape(mask.shape), 0)


def label(mask: torch.Tensor) -> tuple[torch.Tensor, int]:
    """6-connected components: (labels 1..n, 0 for background; n).

    Label propagation along whole straight runs (one scatter per axis per sweep) converges in as
    many sweeps as a component's paths have turns, far fewer than voxel-by-voxel flooding.
    """
    flat = mask.reshape(-1)
    labels = torch.where(
        mask, torch.arange(1, flat.numel() + 1, device=mask.device, dtype=torch.int32).reshape(mask.shape), 0
    )
    while True:
        before = labels
        for dim in (2, 1, 0):
            labels = _run_max(labels, mask, dim)
        if torch.equal(before, labels):
            break
    # renumber the surviving labels 1..n in order
    present = torch.zeros(flat.numel() + 1, dtype=torch.int32, device=mask.device)
    present[labels.reshape(-1).to(torch.int64)] = 1
    present[0] = 0
    new_ids = torch.cumsum(present, 0, dtype=torch.int32)
    return new_ids[labels.to(torch.int64)], int(new_ids[-1])


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


def fill_holes(mask: torch.Tensor) -> torch.Tensor:
    """The mask plus every background pocket it encloses (background not reaching the array's faces)."""
    labels, n = label(~mask)
    outer = touching(labels, n, (0, 1, 2))
    outer[0] = True
    return mask | ~outer[labels.to(torch.int64)]


def upsample(coarse: torch.Tensor, factors: Sequence[int], shape: Sequence[int]) -> torch.Tensor:
    """Nearest-neighbour upsampling by integer factors, cropped to `shape` (inverse of a ceil-mode pool)."""
    out = coarse
    for dim, f in enumerate(factors):
        if f > 1:
            out = out.repeat_interleave(f, dim=dim)
    return out[: shape[0], : shape[1], : shape[2]]
