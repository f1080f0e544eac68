"""ct-lung: body, right and left lung and emphysema (LAA-950) on chest CT, without any trained weights.

Classical, explainable image analysis, all in torch so it runs on the GPU when there is one:

1. Air is < -500 HU. On a coarse grid (about 4 mm voxels, average-pooled HU) the air reaching the
   side faces of the field of view is outside the patient; the body is the rest (largest pieces).
2. Air inside the body is eroded by a box of about 12 mm: the trachea and main bronchi (about 20 mm
   wide) vanish while the lungs keep a core. Cores of at least 30 mL that are not pure gas (stomach
   and bowel gas is about -1000 HU, lung parenchyma much denser) are lungs; each gets its side from
   its centroid in patient coordinates (LPS: patient left is +x), never from the array index.
3. The cores grow back through the inner air by the erosion depth plus a little, with enclosed
   pockets (vessels, nodules) filled, then the boundary is taken at full resolution: within one
   coarse voxel of the lung, voxels < -500 HU are lung; deeper voxels are lung whatever their HU.
4. Emphysema is lung < -950 HU. Volumes, %LAA-950 and mean lung density are computed per lung and
   for both lungs (measurements without a segment number are of both lungs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ai_models import morphology as morph
from ai_models.base import UNIT_CM3, VOLUME, PipelineError, basic_reason, patient_axes
from dicom_io.selection import CT_SHARP_KERNELS, CT_SOFT_KERNELS, SeriesWanted
from dicom_io.types import Code, Findings, Measurement, Segment, Volume

AIR_HU = -500.0
EMPHYSEMA_HU = -950.0
GAS_MEAN_HU = -975.0  # a lung core denser than this is parenchyma; pure gas is about -1000
COARSE_MM = 4.0
CORE_ERODE_MM = 12.0
MIN_LUNG_ML = 30.0
STRADDLE_SHARE = 0.25  # a core with at least this share on each side of the midline is both lungs
SPLIT = 3  # side code of such a core until it is cut at the midline
MIN_BODY_PART = 0.05  # body pieces kept: at least this fraction of the largest (trunk + arms, not the table)

SCT = "SCT"
ANATOMICAL_STRUCTURE = Code("123037004", SCT, "Anatomical Structure")
MORPHOLOGICALLY_ALTERED = Code("49755003", SCT, "Morphologically Altered Structure")
LUNG = Code("39607008", SCT, "Lung")
RIGHT = Code("24028007", SCT, "Right")
LEFT = Code("7771000", SCT, "Left")
BODY = Code("38266002", SCT, "Entire body")
EMPHYSEMA = Code("87433001", SCT, "Pulmonary emphysema")
ATTENUATION = Code("112031", "DCM", "Attenuation Coefficient")
MEAN = Code("373098007", SCT, "Mean")
# No standard code exists for the relative area below -950 HU; a private scheme says so openly.
LAA950 = Code("LAA950", "99RADGATE", "Percent low attenuation area below -950 HU")
UNIT_PERCENT = Code("%", "UCUM", "percent")
UNIT_HU = Code("[hnsf'U]", "UCUM", "Hounsfield unit")

SEG_RIGHT, SEG_LEFT, SEG_EMPHYSEMA, SEG_BODY = 1, 2, 3, 4
# bits of the per-voxel coarse code: lung side (0, 1, 2) in the low bits, then the flags
SIDE_MASK, CORE_BIT, BODY_BIT, OUTSIDE_BIT = 0b11, 2, 3, 4
SLAB_VOXELS = 1 << 23  # full-resolution voxels per slab: bounded memory, few large allocations


@dataclass(frozen=True)
class _Grid:
    """The coarse analysis grid: integer pooling factors per voxel axis and the coarse voxel size."""

    factors: tuple[int, int, int]
    spacing_mm: tuple[float, float, float]

    @classmethod
    def for_spacing(cls, spacing: tuple[float, float, float]) -> _Grid:
        factors = tuple(max(1, round(COARSE_MM / s)) for s in spacing)
        return cls(
            factors=(factors[0], factors[1], factors[2]),
            spacing_mm=(spacing[0] * factors[0], spacing[1] * factors[1], spacing[2] * factors[2]),
        )

    def steps(self, mm: float) -> tuple[int, int, int]:
        """Half-widths in coarse voxels that reach `mm` along each axis."""
        s = self.spacing_mm
        return (round(mm / s[0]), round(mm / s[1]), round(mm / s[2]))

    @property
    def voxel_ml(self) -> float:
        return math.prod(self.spacing_mm) / 1000.0


class CtLungPipeline:
    """Lungs, emphysema and body on a chest CT (see the module docstring for the method)."""

    name = "ct-lung"
    version = "1.0.0"
    series = SeriesWanted(  # densitometry (LAA-950) wants the thinnest soft/standard reconstruction
        modalities=("CT",),
        planes=("axial",),
        min_slices=20,
        min_coverage_mm=80.0,
        slice_thickness_mm=(0.5, 10.0),
        kernels=(CT_SOFT_KERNELS, CT_SHARP_KERNELS),
    )

    def accepts(self, volume: Volume) -> str | None:
        reason = basic_reason(volume, modalities={"CT"}, min_slices=5)
        if reason is not None:
            return reason
        axes, _ = patient_axes(volume.affine)
        spacing = volume.spacing
        extent_si = volume.shape[axes[2]] * spacing[axes[2]]
        if extent_si < 30.0:
            return f"the series covers only {extent_si:.0f} mm head to foot; lungs need at least 30 mm"
        return None

    def run(self, volume: Volume, device: torch.device) -> Findings:
        with torch.inference_mode():
            return self._run(volume, device)

    def _run(self, volume: Volume, device: torch.device) -> Findings:
        grid = _Grid.for_spacing(volume.spacing)
        axes, _ = patient_axes(volume.affine)
        side_dims = [d for d in (0, 1, 2) if d != axes[2]]  # faces not cut head/foot
        slab = grid.factors[0] * max(1, SLAB_VOXELS // (volume.shape[1] * volume.shape[2] * grid.factors[0]))

        coarse_hu = torch.cat(
            [
                F.avg_pool3d(
                    _hu(volume, z0, z0 + slab, device).to(torch.float32)[None, None],
                    grid.factors,
                    ceil_mode=True,
                    count_include_pad=False,
                )[0, 0]
                for z0 in range(0, volume.shape[0], slab)
            ]
        )
        air = coarse_hu < AIR_HU
        labels, n = morph.label(air)
        outside = morph.touching(labels, n, side_dims)[labels.to(torch.int64)]
        body = self._body(~outside)
        inner_air = air & body

        side_labels = self._lung_cores(inner_air, coarse_hu, grid, volume, body)
        growth = grid.steps(CORE_ERODE_MM + COARSE_MM)
        lungs = self._fill_pockets(morph.grow(side_labels, inner_air, growth))
        # One coarse voxel more around each lung is the band where the boundary is decided at full
        # resolution; the core (one coarse voxel in) is lung whatever its HU. All coarse maps go into
        # one byte per voxel so that each slab is upsampled once.
        band = morph.grow(lungs, torch.ones_like(inner_air), 1).to(torch.uint8)
        code = (
            band
            | (morph.erode(lungs > 0).to(torch.uint8) << CORE_BIT)
            | (morph.dilate(body).to(torch.uint8) << BODY_BIT)
            | (morph.dilate(outside).to(torch.uint8) << OUTSIDE_BIT)
        )
        return self._full_resolution(volume, device, grid, code, slab)

    def _full_resolution(
        self, volume: Volume, device: torch.device, grid: _Grid, code: torch.Tensor, slab: int
    ) -> Findings:
        """Decide every voxel from its HU and the coarse maps, a slab of slices at a time (bounded memory)."""
        shape = volume.shape
        out = {k: np.zeros(shape, dtype=bool) for k in (SEG_RIGHT, SEG_LEFT, SEG_EMPHYSEMA, SEG_BODY)}
        stats = {side: torch.zeros(3, dtype=torch.float64, device=device) for side in (SEG_RIGHT, SEG_LEFT)}
        lung_area = torch.zeros(shape[0], dtype=torch.int64, device=device)
        emphysema_area = torch.zeros(shape[0], dtype=torch.int64, device=device)
        for z0 in range(0, shape[0], slab):
            hu = _hu(volume, z0, z0 + slab, device)
            c0 = z0 // grid.factors[0]
            c = morph.upsample(code[c0 : c0 + slab // grid.factors[0]], grid.factors, hu.shape)
            air = hu < AIR_HU
            low = hu < EMPHYSEMA_HU
            side_of = c & SIDE_MASK
            core = (c >> CORE_BIT) & 1 == 1
            lung_any = torch.zeros_like(air)
            for side in (SEG_RIGHT, SEG_LEFT):
                mask = (side_of == side) & (air | core)
                lung_any |= mask
                stats[side] += torch.stack(
                    [mask.sum(), (mask & low).sum(), hu[mask].to(torch.float64).sum()]
                ).to(torch.float64)
                out[side][z0 : z0 + slab] = mask.cpu().numpy()
            emphysema = lung_any & low
            body = ((c >> BODY_BIT) & 1 == 1) & ~(air & ((c >> OUTSIDE_BIT) & 1 == 1))
            out[SEG_EMPHYSEMA][z0 : z0 + slab] = emphysema.cpu().numpy()
            out[SEG_BODY][z0 : z0 + slab] = body.cpu().numpy()
            lung_area[z0 : z0 + slab] = lung_any.sum(dim=(1, 2))
            emphysema_area[z0 : z0 + slab] = emphysema.sum(dim=(1, 2))
        key_slices = [int(lung_area.argmax())]
        if int(emphysema_area.max()) > 0:
            key_slices.append(int(emphysema_area.argmax()))
        return self._findings(volume, out, {k: v.tolist() for k, v in stats.items()}, key_slices)

    @staticmethod
    def _body(not_outside: torch.Tensor) -> torch.Tensor:
        """The patient: pieces of the non-outside region at least MIN_BODY_PART of the largest."""
        labels, n = morph.label(not_outside)
        if n == 0:
            raise PipelineError(CtLungPipeline.name, "no body found: the whole field of view is air")
        sizes = morph.component_sizes(labels, n)
        sizes[0] = 0
        keep = sizes >= MIN_BODY_PART * sizes.max()
        return keep[labels.to(torch.int64)]

    @staticmethod
    def _lung_cores(
        inner_air: torch.Tensor, coarse_hu: torch.Tensor, grid: _Grid, volume: Volume, body: torch.Tensor
    ) -> torch.Tensor:
        """Label map of lung cores: SEG_RIGHT / SEG_LEFT by side in patient space, 0 elsewhere.

        A core is a lung when big enough and not pure gas; its side is that of its centroid relative
        to the body's midline (patient x, LPS), and a core spreading well over both sides is cut there.
        """
        cores = morph.erode(inner_air, grid.steps(CORE_ERODE_MM))
        labels, n = morph.label(cores)
        sizes = morph.component_sizes(labels, n)
        flat = labels.reshape(-1).to(torch.int64)
        hu_sum = torch.bincount(flat, weights=coarse_hu.reshape(-1).to(torch.float64), minlength=n + 1)
        # the grown lung is about twice the core; judge size on the core grown by the erosion depth
        grown = morph.grow(labels, inner_air, grid.steps(CORE_ERODE_MM))
        grown_sizes = morph.component_sizes(grown, n)
        x_mm = _lps_x_mm(volume.affine, grid, tuple(labels.shape), labels.device)
        midline = float(x_mm[body].mean())
        grown_flat = grown.reshape(-1).to(torch.int64)
        x_sum = torch.bincount(grown_flat, weights=x_mm.reshape(-1), minlength=n + 1)
        on_left = (x_mm > midline).reshape(-1).to(torch.float64)
        left_count = torch.bincount(grown_flat, weights=on_left, minlength=n + 1)

        sides = torch.zeros(n + 1, dtype=torch.int32, device=labels.device)
        gas = 0
        for i in range(1, n + 1):
            if float(grown_sizes[i]) * grid.voxel_ml < MIN_LUNG_ML:
                continue
            if float(hu_sum[i] / sizes[i]) < GAS_MEAN_HU:
                gas += 1
                continue
            centroid_x = float(x_sum[i] / grown_sizes[i])
            sides[i] = SEG_LEFT if centroid_x > midline else SEG_RIGHT
            left_share = float(left_count[i] / grown_sizes[i])
            if STRADDLE_SHARE <= left_share <= 1.0 - STRADDLE_SHARE:
                sides[i] = SPLIT
        if not bool((sides > 0).any()):
            air_ml = float(inner_air.sum()) * grid.voxel_ml
            detail = f" ({gas} pocket(s) of pure gas, e.g. stomach or bowel)" if gas else ""
            raise PipelineError(
                CtLungPipeline.name,
                f"no lung found in this series: {air_ml:.0f} mL of air inside the body, none of it a lung "
                f"of at least {MIN_LUNG_ML:.0f} mL{detail}; is this a chest CT?",
            )
        cores = sides[labels.to(torch.int64)]
        # lungs joined across the midline (even after erosion) are cut by the midsagittal plane
        by_plane = torch.where(x_mm > midline, SEG_LEFT, SEG_RIGHT).to(cores.dtype)
        return torch.where(cores == SPLIT, by_plane, cores)

    @staticmethod
    def _fill_pockets(lungs: torch.Tensor) -> torch.Tensor:
        """Give enclosed non-air pockets (vessels, nodules) to the lung around them."""
        filled = morph.fill_holes(lungs > 0)
        pockets = filled & (lungs == 0)
        if not bool(pockets.any()):
            return lungs
        return morph.grow(lungs, pockets, int(max(lungs.shape)))

    def _findings(
        self,
        volume: Volume,
        masks: dict[int, np.ndarray],
        stats: dict[int, list[float]],
        key_slices: list[int],
    ) -> Findings:
        """Segments and measurements; stats per lung are [voxels, voxels < -950 HU, HU sum]."""
        voxel_ml = volume.voxel_volume_ml
        both = [stats[SEG_RIGHT][i] + stats[SEG_LEFT][i] for i in range(3)]
        measurements: list[Measurement] = []
        for segment, (count, low, hu_sum) in (
            (SEG_RIGHT, stats[SEG_RIGHT]),
            (SEG_LEFT, stats[SEG_LEFT]),
            (None, both),
        ):
            if count == 0:
                continue
            measurements += [
                Measurement(VOLUME, count * voxel_ml, UNIT_CM3, segment),
                Measurement(LAA950, 100.0 * low / count, UNIT_PERCENT, segment),
                Measurement(ATTENUATION, hu_sum / count, UNIT_HU, segment, modifier=MEAN),
            ]
        segments = (
            Segment(
                SEG_RIGHT,
                "Right lung",
                ANATOMICAL_STRUCTURE,
                LUNG,
                masks[SEG_RIGHT],
                laterality=RIGHT,
                color_rgb=(128, 174, 128),
            ),
            Segment(
                SEG_LEFT,
                "Left lung",
                ANATOMICAL_STRUCTURE,
                LUNG,
                masks[SEG_LEFT],
                laterality=LEFT,
                color_rgb=(111, 184, 210),
            ),
            Segment(
                SEG_EMPHYSEMA,
                "Emphysema (LAA-950)",
                MORPHOLOGICALLY_ALTERED,
                EMPHYSEMA,
                masks[SEG_EMPHYSEMA],
                anatomic_region=LUNG,
                color_rgb=(241, 214, 145),
            ),
            Segment(SEG_BODY, "Body", ANATOMICAL_STRUCTURE, BODY, masks[SEG_BODY], color_rgb=(177, 122, 101)),
        )
        missing = [name for side, name in ((SEG_RIGHT, "right"), (SEG_LEFT, "left")) if stats[side][0] == 0]
        return Findings(
            pipeline=self.name,
            version=self.version,
            shape=volume.shape,
            segments=segments,
            measurements=tuple(measurements),
            key_slices=tuple(dict.fromkeys(key_slices)),
            notes=tuple(f"no {name} lung found" for name in missing),
            summary_label="Both lungs",
        )


def _hu(volume: Volume, z0: int, z1: int, device: torch.device) -> torch.Tensor:
    """Slices z0:z1 of the voxels as a tensor on `device` (no copy on the CPU when already contiguous)."""
    return torch.as_tensor(np.ascontiguousarray(volume.voxels[z0:z1]), device=device)


def _lps_x_mm(affine: np.ndarray, grid: _Grid, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Patient x (LPS, + is patient left) in mm of each coarse voxel centre (approximately: pool centres)."""
    f = grid.factors
    centres = [
        torch.arange(n, device=device, dtype=torch.float64) * f[d] + (f[d] - 1) / 2
        for d, n in enumerate(shape)
    ]
    z, y, x = torch.meshgrid(*centres, indexing="ij")
    a = affine[0]
    return float(a[0]) * x + float(a[1]) * y + float(a[2]) * z + float(a[3])
