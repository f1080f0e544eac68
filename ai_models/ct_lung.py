"""ct-lung: right and left lung and emphysema (LAA-950) on chest CT, without any trained weights.

Classical, explainable image analysis; the voxelwise work is torch, so it runs on the GPU when there
is one (connected components are labelled on a CPU copy of the working grid, see `morphology.label`).
Figures behind the choices are in docs/design.md, section "ct-lung".

1. Working grid: the HU averaged over blocks of about 2 mm (integer factors per axis), turned by the
   affine so that its axes run head (S), back (P) and patient left (L): slices are axial whatever
   the acquisition plane, and left is a direction in patient space, never an array index.
2. Body: per axial slice, the air (< -500 HU) reaching the slice's border is outside the patient
   when it is mostly gas (a lung cut by a small field of view reaches the border too).
   The rest of the air inside the body is the candidate lung air.
3. Airways: the trachea is found in the top slices (a pocket of very low HU of a trachea's size
   near the body's left-right centre) and grown into the airway tree through voxels < -950 HU, one
   neighbourhood per step; a step that adds far more voxels than the steps before it is a leak
   into the lung and is undone with the step before it. The tree (with its partial-volume wall) is
   removed from the lung air; bronchi inside a lung come back in step 6, trachea and main bronchi
   do not.
4. Lung candidates: 3-D components of the remaining air which keep a core after an erosion of
   about 10 mm (the lungs do; fat folds and table pockets do not) and whose core is not pure gas
   (stomach and bowel gas is about -1000 HU, lung parenchyma denser); plus smaller pieces, not
   pure gas either, close to such a lung (an apex cut off by scarring).
5. Left and right: the lung air is eroded in-plane one voxel at a time until it falls apart into
   two large pieces (lungs touching in front of and behind the mediastinum come apart at their
   thin junction); the one further to patient left is the left lung. Geodesic growth through the
   lung air gives back what the erosion took near the seeds; the rest goes by connected piece to
   the lung it touches most, else to the side of its own centre. Nothing is cut along a plane.
6. Each lung, per axial slice: a closing of a few mm smooths the pleural outline (bounded by the
   body), then the pockets it encloses (vessels, nodules, tumour, bronchi) are filled.
7. Full resolution: within one working voxel of a lung's outline a voxel is lung when its HU says
   it holds at least EDGE_LUNG_SHARE of this patient's parenchyma (partial volume); inside the
   lung, and where step 6 filled, it is lung whatever its HU. Emphysema is lung < -950 HU.
   Volumes, %LAA-950 and mean lung density per lung and for both lungs.

A series whose lung air is absent or a sliver (less than MIN_LUNGS_ML in all, or spanning less than
MIN_LUNG_SPAN_MM head to foot) is not a chest CT: `PipelineError` with that reason.
The body mask is a step on the way, not a finding; the option `keep_body` adds it as a segment.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ai_models import morphology as morph
from ai_models.base import UNIT_CM3, VOLUME, PipelineError, basic_reason, patient_axes
from ai_models.series import CT_LUNG
from dicom_io.types import Code, Findings, Measurement, Segment, Volume

AIR_HU = -500.0  # lung (and outside air) below, soft tissue above
SOFT_TISSUE_HU = 40.0
EDGE_LUNG_SHARE = 0.3  # an outline voxel is lung when its HU says at least this share of it is parenchyma
EDGE_HU_RANGE = (-500.0, -150.0)  # bounds of that HU
AIRWAY_HU = -950.0  # airway lumen below: stricter than parenchyma, so growth stays in the tubes
EMPHYSEMA_HU = -950.0
GAS_MEAN_HU = -975.0  # a lung core denser than this is parenchyma; pure gas is about -1000
WORK_MM = 2.0  # working grid voxel size aimed at (integer pooling factors)
CORE_MM = 10.0  # erosion a lung survives and a trachea, fat fold or table pocket does not
MIN_CORE_ML = 2.0
MIN_PIECE_ML = 0.5  # lung pieces smaller than this are noise
NEAR_MM = 10.0  # a piece of lung-like air this close to a lung belongs to it
MIN_PIECE_AREA_MM2 = 500.0  # if wider in some slice than an airway or the oesophagus' air
MIN_LUNGS_ML = 300.0  # less lung than this in all is no chest CT (a small child's lungs hold more)
MIN_LUNG_SPAN_MM = 50.0  # nor lung spanning fewer mm head to foot (lung bases at the top of an abdomen)
TRACHEA_SEARCH_MM = 40.0  # the trachea is looked for in the top slices down to this depth
TRACHEA_AREA_MM2 = (40.0, 800.0)  # its cross-section: about 7 to 32 mm across
TRACHEA_OFF_CENTRE_MM = 30.0  # its centre lies within this of the body's left-right centre
AIRWAY_MAX_MM = 300.0  # the airway tree is grown at most this far (trachea, main and lobar bronchi)
LEAK_RATIO = 3.0  # a growth step adding this many times the recent steps' voxels leaks into lung
AIRWAY_WALL_MM = 2.0  # the airway's partial-volume rim, removed with it
SPLIT_MAX_MM = 40.0  # in-plane erosion allowed to part the two lungs where they touch
SPLIT_MIN_SHARE = 0.05  # a piece counts as a lung seed from this share of the lung air
CLOSE_MM = 4.0  # closing of each lung's outline per slice
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
# bits of the per-voxel working-grid code: lung side (0, 1, 2) in the low bits, then the flags
SIDE_MASK, SURE_BIT, BODY_BIT, OUTSIDE_BIT = 0b11, 2, 3, 4
SLAB_VOXELS = 1 << 23  # full-resolution voxels per slab: bounded memory, few large allocations
TRUE_WORDS, FALSE_WORDS = {"1", "true", "yes", "on"}, {"0", "false", "no", "off", ""}


@dataclass(frozen=True)
class _Grid:
    """The working grid: pooling factors per voxel axis, and how it turns into (S, P, L) order.

    `perm` takes the voxel axes (z, y, x) to (S, P, L); `flip` lists the turned axes that run
    towards I, A or R and are reversed, so index grows towards head, back and patient left.
    """

    factors: tuple[int, int, int]
    spacing_mm: tuple[float, float, float]  # of the turned grid (S, P, L)
    perm: tuple[int, int, int]
    flip: tuple[int, ...]

    @classmethod
    def for_volume(cls, volume: Volume) -> _Grid:
        spacing = volume.spacing
        f = tuple(max(1, int(WORK_MM / s + 0.25)) for s in spacing)
        axes, flips = patient_axes(volume.affine)
        perm = (axes[2], axes[1], axes[0])
        return cls(
            factors=(f[0], f[1], f[2]),
            spacing_mm=tuple(spacing[a] * f[a] for a in perm),  # type: ignore[arg-type]
            perm=perm,
            flip=tuple(d for d, p in enumerate((2, 1, 0)) if flips[p]),
        )

    def turn(self, t: torch.Tensor) -> torch.Tensor:
        """A working-grid tensor in voxel order -> (S, P, L) order."""
        t = t.permute(self.perm)
        return (t.flip(self.flip) if self.flip else t).contiguous()

    def unturn(self, t: torch.Tensor) -> torch.Tensor:
        """The inverse of `turn`."""
        t = t.flip(self.flip) if self.flip else t
        return t.permute(tuple(int(i) for i in np.argsort(self.perm))).contiguous()

    def steps(self, mm: float, dims: tuple[int, ...] = (0, 1, 2)) -> tuple[int, int, int]:
        """Half-widths in turned voxels that reach `mm` along `dims` (0 along the others)."""
        s = self.spacing_mm
        r = [round(mm / s[d]) if d in dims else 0 for d in range(3)]
        return (r[0], r[1], r[2])

    @property
    def voxel_ml(self) -> float:
        return math.prod(self.spacing_mm) / 1000.0

    @property
    def pixel_mm2(self) -> float:
        return self.spacing_mm[1] * self.spacing_mm[2]


def _flag(name: str, value: bool | str) -> bool:
    """Option `name` as a bool (config) or a string (`--option keep_body=yes`); ValueError if neither."""
    if isinstance(value, bool):
        return value
    word = value.strip().lower()
    if word in TRUE_WORDS | FALSE_WORDS:
        return word in TRUE_WORDS
    raise ValueError(f"ct-lung option {name}: expected yes/no, true/false or 1/0, got {value!r}")


class CtLungPipeline:
    """Right lung, left lung and emphysema on a chest CT (see the module docstring for the method)."""

    name = "ct-lung"
    version = "2.0.0"
    series = CT_LUNG

    def __init__(self, keep_body: bool | str = False) -> None:
        """`keep_body`: add the body mask as segment 4 (a step of the method, not a finding)."""
        self.keep_body = _flag("keep_body", keep_body)

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
        grid = _Grid.for_volume(volume)
        f = grid.factors
        slab = f[0] * max(1, SLAB_VOXELS // (volume.shape[1] * volume.shape[2] * f[0]))  # pooled whole
        work = torch.cat(
            [
                F.avg_pool3d(
                    _hu(volume, z0, z0 + slab, device).to(torch.float32)[None, None],
                    f,
                    ceil_mode=True,
                    count_include_pad=False,
                )[0, 0]
                for z0 in range(0, volume.shape[0], slab)
            ]
        )
        hu = grid.turn(work)
        air = hu < AIR_HU
        outside = _outside(air, hu)
        body = _body(~outside)
        inner_air = air & body
        centre = _centre_columns(body)
        # The lung work happens in the box around the air inside the body (a margin for the
        # closing and the outline band), pasted back into the whole grid at the end.
        if not bool(inner_air.any()):
            _check_chest(torch.zeros_like(inner_air), inner_air, grid)
        roi = _Box.around(inner_air).grown(max(grid.steps(CLOSE_MM)) + 2, tuple(hu.shape))
        z0 = roi.start[0]
        centre = centre[z0 : z0 + roi.mask.shape[0]] - roi.start[2]  # per slice, in the box's columns
        h, a, inner, b = (roi.cut(t) for t in (hu, air, inner_air, body))
        airway = _airway(inner, h, centre, grid)
        sides = _split(_lung_candidates(inner & ~airway, h, grid), centre, grid)
        _check_chest(sides, inner, grid)
        lungs = _fill(sides, b, grid)
        # Where the outline is decided at full resolution: one working voxel around each lung,
        # not into air that is not lung (airways, gas). Inside (eroded) and where filling added
        # tissue, the lung is sure whatever the HU. All maps go into one byte per working voxel,
        # turned back to the voxel order, so that each slab is upsampled once.
        band = morph.grow(lungs, ~(inner & (lungs == 0)), 1)
        sure = morph.erode(lungs > 0) | ((lungs > 0) & ~a)
        code = torch.zeros(hu.shape, dtype=torch.uint8, device=device)
        if self.keep_body:
            code |= (morph.dilate(body).to(torch.uint8) << BODY_BIT) | (
                morph.dilate(outside).to(torch.uint8) << OUTSIDE_BIT
            )
        roi.cut(code)[...] |= band.to(torch.uint8) | (sure.to(torch.uint8) << SURE_BIT)
        # The outline: where a voxel's HU says it holds EDGE_LUNG_SHARE of this patient's parenchyma
        parenchyma = float(h[sure & a].median())
        edge_hu = SOFT_TISSUE_HU + EDGE_LUNG_SHARE * (parenchyma - SOFT_TISSUE_HU)
        edge_hu = min(max(edge_hu, EDGE_HU_RANGE[0]), EDGE_HU_RANGE[1])
        return self._full_resolution(volume, device, f, grid.unturn(code), edge_hu)

    def _full_resolution(
        self,
        volume: Volume,
        device: torch.device,
        factors: tuple[int, int, int],
        code: torch.Tensor,
        edge_hu: float,
    ) -> Findings:
        """Decide each voxel from its HU and the working maps, in the box where the maps are not empty,
        a slab of slices at a time (bounded memory)."""
        shape = volume.shape
        kept = (SEG_RIGHT, SEG_LEFT, SEG_EMPHYSEMA) + ((SEG_BODY,) if self.keep_body else ())
        out = {k: np.zeros(shape, dtype=bool) for k in kept}
        stats = {side: torch.zeros(3, dtype=torch.float64, device=device) for side in (SEG_RIGHT, SEG_LEFT)}
        lung_area = torch.zeros(shape[0], dtype=torch.int64, device=device)
        emphysema_area = torch.zeros(shape[0], dtype=torch.int64, device=device)
        box = _Box.around(code != 0)
        (z_lo, y_lo, x_lo), (z_hi, y_hi, x_hi) = (
            tuple(s * f for s, f in zip(box.start, factors, strict=True)),
            tuple(
                min(n, (s + m) * f)
                for s, m, f, n in zip(box.start, box.mask.shape, factors, shape, strict=True)
            ),
        )
        code = box.cut(code)
        slab = factors[0] * max(1, SLAB_VOXELS // ((y_hi - y_lo) * (x_hi - x_lo) * factors[0]))
        for z0 in range(z_lo, z_hi, slab):
            z1 = min(z0 + slab, z_hi)
            hu = _hu(volume, z0, z1, device)[:, y_lo:y_hi, x_lo:x_hi]
            c0 = (z0 - z_lo) // factors[0]
            c = morph.upsample(code[c0 : c0 + slab // factors[0]], factors, hu.shape)
            low = hu < EMPHYSEMA_HU
            side_of = c & SIDE_MASK
            lung = (hu < edge_hu) | ((c >> SURE_BIT) & 1 == 1)
            region = (slice(z0, z1), slice(y_lo, y_hi), slice(x_lo, x_hi))
            lung_any = torch.zeros_like(lung)
            for side in (SEG_RIGHT, SEG_LEFT):
                mask = (side_of == side) & lung
                lung_any |= mask
                stats[side] += torch.stack(
                    [
                        mask.sum(dtype=torch.float64),
                        (mask & low).sum(dtype=torch.float64),
                        torch.where(mask, hu, 0).sum(dtype=torch.float64),
                    ]
                )
                out[side][region] = mask.cpu().numpy()
            emphysema = lung_any & low
            out[SEG_EMPHYSEMA][region] = emphysema.cpu().numpy()
            if self.keep_body:
                body = ((c >> BODY_BIT) & 1 == 1) & ~((hu < AIR_HU) & ((c >> OUTSIDE_BIT) & 1 == 1))
                out[SEG_BODY][region] = body.cpu().numpy()
            lung_area[z0:z1] = lung_any.sum(dim=(1, 2))
            emphysema_area[z0:z1] = emphysema.sum(dim=(1, 2))
        key_slices = [int(lung_area.argmax())]
        if int(emphysema_area.max()) > 0:
            key_slices.append(int(emphysema_area.argmax()))
        return self._findings(volume, out, {k: v.tolist() for k, v in stats.items()}, key_slices)

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
        if both[1] > 0:  # the emphysema segment's own figure: its volume (both lungs)
            measurements.append(Measurement(VOLUME, both[1] * voxel_ml, UNIT_CM3, SEG_EMPHYSEMA))
        segments = [
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
        ]
        if self.keep_body:
            segments.append(
                Segment(
                    SEG_BODY, "Body", ANATOMICAL_STRUCTURE, BODY, masks[SEG_BODY], color_rgb=(177, 122, 101)
                )
            )
        missing = [name for side, name in ((SEG_RIGHT, "right"), (SEG_LEFT, "left")) if stats[side][0] == 0]
        return Findings(
            pipeline=self.name,
            version=self.version,
            shape=volume.shape,
            segments=tuple(segments),
            measurements=tuple(measurements),
            key_slices=tuple(dict.fromkeys(key_slices)),
            notes=tuple(f"no {name} lung found" for name in missing),
            summary_label="Both lungs",
        )


def _hu(volume: Volume, z0: int, z1: int, device: torch.device) -> torch.Tensor:
    """Slices z0:z1 of the voxels as a tensor on `device` (no copy on the CPU when already contiguous)."""
    return torch.as_tensor(np.ascontiguousarray(volume.voxels[z0:z1]), device=device)


# The steps of the method, on the turned working grid: dim 0 runs to the head, 1 to the back,
# 2 to the patient's left.


def _outside(air: torch.Tensor, hu: torch.Tensor) -> torch.Tensor:
    """Air outside the patient: per axial slice, air connected to the slice's border that is mostly gas.

    Per slice rather than in 3-D, so that lungs joined to the outside through the airway and the
    mouth or nose (a neck-and-chest series) stay inside. Mostly gas (at least half its voxels below
    GAS_MEAN_HU, which clothes, blankets and a mattress in it do not change), so that a lung cut by a
    small field of view, which touches the border too, stays inside.
    """
    labels, n = morph.label(air, (1, 2))
    flat = labels.reshape(-1).to(torch.int64)
    count = torch.bincount(flat, minlength=n + 1)
    gas = torch.bincount(flat, weights=(hu < GAS_MEAN_HU).reshape(-1).to(torch.float64), minlength=n + 1)
    outside = morph.touching(labels, n, (1, 2)) & (2 * gas >= count)
    return outside[flat].reshape(air.shape)


def _centre_columns(body: torch.Tensor) -> torch.Tensor:
    """Per slice, the body's mean column (its left-right centre; 0 where a slice has no body)."""
    columns = torch.arange(body.shape[2], device=body.device, dtype=torch.float64)
    area = body.sum(dim=(1, 2)).to(torch.float64).clamp(min=1)
    return (body.sum(dim=1).to(torch.float64) * columns).sum(dim=1) / area


def _body(not_outside: torch.Tensor) -> torch.Tensor:
    """The patient: pieces of the non-outside region at least MIN_BODY_PART of the largest."""
    labels, n = morph.label(not_outside)
    if n == 0:
        raise PipelineError(CtLungPipeline.name, "no body found: the whole field of view is air")
    sizes = morph.component_sizes(labels, n)
    sizes[0] = 0
    keep = sizes >= MIN_BODY_PART * sizes.max()
    return keep[labels.to(torch.int64)]


def _lung_candidates(inner_air: torch.Tensor, hu: torch.Tensor, grid: _Grid) -> torch.Tensor:
    """The air inside the body that is lung (step 3 of the module docstring).

    Lungs are the components that keep a core of parenchyma (not pure gas) after a CORE_MM erosion;
    smaller components that are not pure gas either, lie within NEAR_MM of a lung and are wider
    than an airway or the oesophagus' air in some slice (an apex or a base cut off by scarring, a
    pleural fold or a slice's partial volume) belong to it.
    """
    labels, n = morph.label(inner_air)
    flat = labels.reshape(-1).to(torch.int64)
    core = morph.erode(inner_air, grid.steps(CORE_MM))
    core_count = torch.bincount(flat, weights=core.reshape(-1).to(torch.float64), minlength=n + 1)
    core_hu = torch.bincount(
        flat, weights=torch.where(core, hu, 0.0).reshape(-1).to(torch.float64), minlength=n + 1
    )
    lungs = (core_count * grid.voxel_ml >= MIN_CORE_ML) & (core_hu > GAS_MEAN_HU * core_count)
    lungs[0] = False
    count = torch.bincount(flat, minlength=n + 1).to(torch.float64)
    hu_sum = torch.bincount(flat, weights=hu.reshape(-1).to(torch.float64), minlength=n + 1)
    near = morph.dilate(lungs[flat].reshape(inner_air.shape), grid.steps(NEAR_MM))
    touching = torch.zeros(n + 1, dtype=torch.bool, device=labels.device)
    touching[flat[near.reshape(-1)]] = True
    slices = inner_air.shape[0]
    z = torch.arange(slices, device=labels.device).repeat_interleave(inner_air[0].numel())
    per_slice = torch.bincount(flat * slices + z, minlength=(n + 1) * slices).reshape(n + 1, slices)
    widest_mm2 = per_slice.max(dim=1).values.to(torch.float64) * grid.pixel_mm2
    pieces = (
        touching
        & (count * grid.voxel_ml >= MIN_PIECE_ML)
        & (hu_sum > GAS_MEAN_HU * count)
        & (widest_mm2 >= MIN_PIECE_AREA_MM2)
    )
    pieces[0] = False
    return (lungs | pieces)[flat].reshape(inner_air.shape)


def _trachea_seed(strict: torch.Tensor, centre: torch.Tensor, grid: _Grid) -> torch.Tensor | None:
    """The trachea's cross-section in the highest slice that shows it, or None.

    Looked for in the top TRACHEA_SEARCH_MM: a pocket of airway-dark air of a trachea's area whose
    centre lies near the body's left-right centre in that slice; the largest in the highest slice.
    """
    depth = max(1, grid.steps(TRACHEA_SEARCH_MM, (0,))[0])
    top = max(0, strict.shape[0] - depth)
    labels, n = morph.label(strict[top:], (1, 2))
    if n == 0:
        return None
    flat = labels.reshape(-1).to(torch.int64)
    z, _, x = (
        t.reshape(-1)
        for t in torch.meshgrid(
            *(torch.arange(s, device=strict.device, dtype=torch.float64) for s in labels.shape), indexing="ij"
        )
    )
    count = torch.bincount(flat, minlength=n + 1).to(torch.float64)
    centre_x = torch.bincount(flat, weights=x, minlength=n + 1) / count.clamp(min=1)
    slice_of = (torch.bincount(flat, weights=z, minlength=n + 1) / count.clamp(min=1)).round().to(torch.int64)
    area = count * grid.pixel_mm2
    ok = (
        (area >= TRACHEA_AREA_MM2[0])
        & (area <= TRACHEA_AREA_MM2[1])
        & ((centre_x - centre[top:][slice_of]).abs() * grid.spacing_mm[2] <= TRACHEA_OFF_CENTRE_MM)
    )
    ok[0] = False
    if not bool(ok.any()):
        return None
    # highest slice first, then the largest pocket in it
    score = torch.where(ok, slice_of.to(torch.float64) * (labels[0].numel() + 1) + count, -1.0)
    seed = torch.zeros_like(strict)
    seed[top:] = labels == int(score.argmax())
    return seed


@dataclass(frozen=True)
class _Box:
    """A bool mask held as its bounding box (`mask`) and the box's start in the whole grid."""

    mask: torch.Tensor
    start: tuple[int, int, int]

    @classmethod
    def around(cls, mask: torch.Tensor, offset: tuple[int, int, int] = (0, 0, 0)) -> _Box:
        """The box of a mask's voxels (the mask given at `offset` in the whole grid; not empty)."""
        where = torch.nonzero(mask)
        lo, hi = where.min(dim=0).values.tolist(), (where.max(dim=0).values + 1).tolist()
        box = mask[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
        return cls(box, (lo[0] + offset[0], lo[1] + offset[1], lo[2] + offset[2]))

    def _slices(self, origin: tuple[int, int, int] = (0, 0, 0)) -> tuple[slice, slice, slice]:
        """Where this box lies in a grid whose first voxel is at `origin` of the whole grid."""
        s = [a - b for a, b in zip(self.start, origin, strict=True)]
        n = self.mask.shape
        return (slice(s[0], s[0] + n[0]), slice(s[1], s[1] + n[1]), slice(s[2], s[2] + n[2]))

    def grown(self, margin: int, shape: tuple[int, ...]) -> _Box:
        """An empty box `margin` voxels larger on each side, within a grid of `shape`."""
        lo = [max(0, s - margin) for s in self.start]
        hi = [min(shape[d], self.start[d] + self.mask.shape[d] + margin) for d in range(3)]
        empty = torch.zeros(
            [b - a for a, b in zip(lo, hi, strict=True)], dtype=torch.bool, device=self.mask.device
        )
        return _Box(empty, (lo[0], lo[1], lo[2]))

    def cut(self, whole: torch.Tensor) -> torch.Tensor:
        """This box's part of a whole-grid tensor (a view)."""
        return whole[self._slices()]

    def paste(self, inner: _Box) -> torch.Tensor:
        """A mask of this box's shape holding `inner` (a box inside this one)."""
        out = torch.zeros_like(self.mask)
        out[inner._slices(self.start)] = inner.mask
        return out

    def set(self, whole: torch.Tensor) -> None:
        """Set this box's voxels in a whole-grid mask."""
        whole[self._slices()] |= self.mask

    def clear(self, whole: torch.Tensor) -> None:
        """Clear this box's voxels in a whole-grid mask."""
        whole[self._slices()] &= ~self.mask


def _airway(inner_air: torch.Tensor, hu: torch.Tensor, centre: torch.Tensor, grid: _Grid) -> torch.Tensor:
    """Trachea and bronchi with their partial-volume rim (empty when no trachea is found).

    Region growing from the trachea through voxels < AIRWAY_HU, one 26-neighbourhood per step; a
    step adding more than LEAK_RATIO times the largest of the three before it has leaked into the
    lung, and is undone with the step before it.
    """
    strict = inner_air & (hu < AIRWAY_HU)
    airway = _trachea_seed(strict, centre, grid)
    if airway is None:
        return torch.zeros_like(inner_air)
    # Each step works in the box around the last front (the growing tips), not the whole grid.
    front = _Box.around(airway)
    previous: _Box | None = None
    added: list[int] = []
    for _ in range(round(AIRWAY_MAX_MM / min(grid.spacing_mm))):
        window = front.grown(1, airway.shape)
        new = morph.dilate(window.paste(front)) & window.cut(strict) & ~window.cut(airway)
        count = int(new.sum())
        if count == 0:
            break
        if len(added) >= 3 and count > LEAK_RATIO * max(added[-3:]):
            if previous is not None:
                previous.clear(airway)
            break
        front = _Box.around(new, window.start)
        front.set(airway)
        previous = front
        added.append(count)
    return morph.dilate(airway, grid.steps(AIRWAY_WALL_MM, (1, 2))) & inner_air


def _split(lung_air: torch.Tensor, centre: torch.Tensor, grid: _Grid) -> torch.Tensor:
    """Label map of the lungs: SEG_RIGHT / SEG_LEFT, 0 elsewhere (see step 5 of the module docstring)."""
    labels, n = morph.label(lung_air)
    sizes = morph.component_sizes(labels, n)
    keep = sizes.to(torch.float64) * grid.voxel_ml >= MIN_PIECE_ML
    keep[0] = False
    lung_air = keep[labels.to(torch.int64)]
    total = int(lung_air.sum())
    if total == 0:
        return torch.zeros(lung_air.shape, dtype=torch.int32, device=lung_air.device)
    x = torch.arange(lung_air.shape[2], device=lung_air.device, dtype=torch.float64)

    def centres(lab: torch.Tensor, m: int) -> torch.Tensor:
        """Mean column (towards patient left) of each label 0..m."""
        flat = lab.reshape(-1).to(torch.int64)
        xs = x.expand(lab.shape).reshape(-1)
        count = torch.bincount(flat, minlength=m + 1).to(torch.float64)
        return torch.bincount(flat, weights=xs, minlength=m + 1) / count.clamp(min=1)

    seeds, depth = None, 0
    eroded = lung_air
    for depth in range(grid.steps(SPLIT_MAX_MM, (1, 2))[1] + 1):
        if depth > 0:
            eroded = morph.erode(eroded, (0, 1, 1))
        pieces, m = morph.label(eroded)
        piece_sizes = morph.component_sizes(pieces, m)
        piece_sizes[0] = 0
        big = torch.nonzero(piece_sizes >= SPLIT_MIN_SHARE * total).reshape(-1)
        if len(big) >= 2:
            a, b = big[piece_sizes[big].argsort(descending=True)[:2]].tolist()
            cx = centres(pieces, m)
            left, right = (a, b) if float(cx[a]) > float(cx[b]) else (b, a)
            seeds = torch.where(pieces == left, SEG_LEFT, torch.where(pieces == right, SEG_RIGHT, 0))
            midline = float(cx[a] + cx[b]) / 2.0
            break
        if len(big) == 0:
            break
    if seeds is None:  # one lung, or lungs that no erosion parts: the largest piece, by its side
        sizes = morph.component_sizes(labels, n).to(torch.float64) * keep
        largest = int(sizes.argmax())
        midline = float(centre.mean())
        side = SEG_LEFT if float(centres(labels, n)[largest]) > midline else SEG_RIGHT
        seeds, depth = torch.where(labels == largest, side, 0), 0
    # Geodesic growth decides the voxels the erosion took near the seeds (where the lungs touch);
    # the rest (thin parts the erosion took whole, pieces apart) goes by piece, to the lung it
    # touches most, else to the side of its centre.
    sides = morph.grow(seeds.to(torch.int32), lung_air, depth + 2)
    rest = lung_air & (sides == 0)
    if not bool(rest.any()):
        return sides
    pieces, m = morph.label(rest)
    flat = pieces.reshape(-1).to(torch.int64)
    touch = [
        torch.bincount(
            flat, weights=(morph.dilate(sides == side) & rest).reshape(-1).to(torch.float64), minlength=m + 1
        )
        for side in (SEG_RIGHT, SEG_LEFT)
    ]
    on_left = torch.where(touch[0] + touch[1] > 0, touch[1] > touch[0], centres(pieces, m) > midline)
    by_piece = torch.where(on_left, SEG_LEFT, SEG_RIGHT).to(torch.int32)
    return torch.where(rest, by_piece[flat].reshape(rest.shape), sides)


def _check_chest(sides: torch.Tensor, inner_air: torch.Tensor, grid: _Grid) -> None:
    """Raise PipelineError unless the lungs are those of a chest CT (not absent, not a sliver)."""
    lung = sides > 0
    lung_ml = float(lung.sum()) * grid.voxel_ml
    rows = torch.nonzero(lung.any(dim=2).any(dim=1)).reshape(-1)
    span_mm = 0.0 if len(rows) == 0 else float(rows[-1] - rows[0] + 1) * grid.spacing_mm[0]
    if lung_ml >= MIN_LUNGS_ML and span_mm >= MIN_LUNG_SPAN_MM:
        return
    air_ml = float(inner_air.sum()) * grid.voxel_ml
    found = "none" if lung_ml == 0 else f"{lung_ml:.0f} mL over {span_mm:.0f} mm head to foot"
    raise PipelineError(
        CtLungPipeline.name,
        f"no lung found in this series: of {air_ml:.0f} mL of air inside the body, lung-like air: {found} "
        f"(a chest CT shows at least {MIN_LUNGS_ML:.0f} mL over {MIN_LUNG_SPAN_MM:.0f} mm); "
        "is this a chest CT?",
    )


def _fill(sides: torch.Tensor, body: torch.Tensor, grid: _Grid) -> torch.Tensor:
    """Each lung per axial slice: closed by CLOSE_MM inside the body, enclosed pockets filled."""
    radius = grid.steps(CLOSE_MM, (1, 2))
    right, left = (
        morph.fill_holes(mask | (morph.erode(morph.dilate(mask, radius), radius) & body), (1, 2))
        for mask in (sides == SEG_RIGHT, sides == SEG_LEFT)
    )
    lungs = torch.where(right, SEG_RIGHT, torch.where(left, SEG_LEFT, 0)).to(sides.dtype)
    # where both lungs claim a voxel, the lung air's own side decides (neither when it was no lung air)
    return torch.where(right & left, sides, lungs)
