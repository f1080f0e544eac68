"""Secondary Capture pictures for PACS that show no SEG or SR: key images and a report card.

Key images are the source slice, windowed, resampled to square pixels (so anatomy is never
stretched when a PACS ignores PixelSpacing), with each segment burned in as a translucent fill plus
an outline, a colour legend, orientation letters and a "not for diagnostic use" footer. The report
card lists the measurements as text, with their change since a prior study in brackets when the
results are compared with one (its date only: the card names no accession or UID). Every
picture is RGB, DERIVED\\SECONDARY, BurnedInAnnotation YES.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache

import highdicom as hd
import numpy as np
import numpy.typing as npt
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from scipy import ndimage

from dicom_io.results.common import REPORT_CARD, Context, format_value
from dicom_io.results.prior import changes
from dicom_io.types import Measurement, Segment

DISCLAIMER = "Produced by an algorithm — not for diagnostic use"
_FONT_FILES = ("DejaVuSans.ttf", "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")
_MIN_SIDE = 512  # key images are scaled up to at least this, so text stays legible beside anatomy
_MAX_SIDE = 1024
_FILL_ALPHA = 0.35
_OUTLINE_ONLY_FRACTION = 0.25  # a segment filling more of the slice (a body) is outlined, not tinted
_CARD_SIZE = (1024, 768)
Font = ImageFont.FreeTypeFont | ImageFont.ImageFont


@cache
def font(size: int) -> Font:
    """DejaVu Sans when installed (Debian's fonts-dejavu), PIL's bundled font at that size otherwise."""
    for name in _FONT_FILES:
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            continue
    return ImageFont.load_default(size=size)


def window_for(ctx: Context, pixels: npt.NDArray[np.floating]) -> tuple[float, float]:
    """(low, high) display range: CT lung or soft-tissue window, percentiles for MR and the rest."""
    if ctx.volume.modality == "CT":
        centre, width = (-600.0, 1500.0) if "lung" in ctx.findings.pipeline.lower() else (40.0, 400.0)
        return centre - width / 2, centre + width / 2
    low, high = np.percentile(pixels, (1.0, 99.5))
    return float(low), float(max(high, low + 1.0))


def _direction_letter(vector: npt.NDArray[np.float64]) -> str:
    """The patient direction a vector points to most (LPS: +x Left, +y Posterior, +z Head)."""
    axis = int(np.argmax(np.abs(vector)))
    return ("RL", "AP", "FH")[axis][int(vector[axis] > 0)]


def _opposite(letter: str) -> str:
    return {"L": "R", "R": "L", "A": "P", "P": "A", "H": "F", "F": "H"}[letter]


def _outline(mask: npt.NDArray[np.bool_], width: int) -> npt.NDArray[np.bool_]:
    return mask & ~ndimage.binary_erosion(mask, iterations=width, border_value=0)


def _shadowed_text(
    draw: ImageDraw.ImageDraw,
    xy: tuple[int, int],
    text: str,
    size: int,
    fill: tuple[int, int, int] = (255, 255, 255),
) -> None:
    """Text with a dark shadow, readable on bright bone and on black air alike."""
    x, y = xy
    draw.text((x + 1, y + 1), text, font=font(size), fill=(0, 0, 0))
    draw.text((x, y), text, font=font(size), fill=fill)


def render_key_image(
    ctx: Context, k: int, segments: Sequence[Segment]
) -> tuple[npt.NDArray[np.uint8], float]:
    """Slice k with the segments burned in, as (RGB array, output pixel spacing in mm)."""
    _, row_spacing, column_spacing = ctx.volume.spacing
    rows, columns = ctx.volume.shape[1:]
    pixel = min(row_spacing, column_spacing)
    height, width = rows * row_spacing / pixel, columns * column_spacing / pixel
    scale = min(max(1.0, _MIN_SIDE / max(height, width)), _MAX_SIDE / max(height, width))
    size = (round(width * scale), round(height * scale))

    pixels = ctx.volume.voxels[k].astype(np.float32)
    low, high = window_for(ctx, pixels)
    grey = (np.clip((pixels - low) / (high - low), 0.0, 1.0) * 255).astype(np.uint8)
    image = np.asarray(Image.fromarray(grey).resize(size, Image.Resampling.BILINEAR), dtype=np.float32)
    rgb = np.repeat(image[:, :, np.newaxis], 3, axis=2)
    outline_width = max(2, round(size[0] / 300))
    for segment in segments:
        plane = Image.fromarray(segment.mask[k].view(np.uint8) * 255).resize(size, Image.Resampling.BILINEAR)
        mask = np.asarray(plane) >= 128
        colour = np.array(segment.color_rgb, dtype=np.float32)
        if mask.mean() < _OUTLINE_ONLY_FRACTION:
            rgb[mask] = (1 - _FILL_ALPHA) * rgb[mask] + _FILL_ALPHA * colour
        rgb[_outline(mask, outline_width)] = colour
    canvas = Image.fromarray(rgb.astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    text = max(16, size[0] // 32)

    for i, segment in enumerate(segments):  # legend, top left
        y = 8 + i * (text + 8)
        draw.rectangle((8, y, 8 + text, y + text), fill=segment.color_rgb, outline=(255, 255, 255))
        _shadowed_text(draw, (16 + text, y - 2), segment.label, text)

    row_dir, col_dir = ctx.volume.affine[:3, 0], ctx.volume.affine[:3, 1]
    right, down = _direction_letter(row_dir), _direction_letter(col_dir)
    w, h = size
    _shadowed_text(draw, (w - text - 6, h // 2 - text // 2), right, text, (255, 255, 0))
    _shadowed_text(draw, (6, h // 2 - text // 2), _opposite(right), text, (255, 255, 0))
    _shadowed_text(draw, (w // 2 - text // 3, h - text - 8), down, text, (255, 255, 0))
    _shadowed_text(draw, (w // 2 - text // 3, 6), _opposite(down), text, (255, 255, 0))

    # the footer gets its own band below the image, so it never hides anatomy
    small = max(14, text * 3 // 4)
    framed = Image.new("RGB", (w, h + 2 * small + 20), (0, 0, 0))
    framed.paste(canvas, (0, 0))
    draw = ImageDraw.Draw(framed)
    footer = f"{ctx.algorithm_name} {ctx.algorithm_version} · slice {k + 1}/{ctx.volume.shape[0]}"
    draw.text((8, h + 4), footer, font=font(small), fill=(255, 255, 255))
    draw.text((8, h + small + 10), DISCLAIMER, font=font(small), fill=(255, 200, 0))
    return np.asarray(framed, dtype=np.uint8), pixel / scale


@dataclass(frozen=True)
class CardRow:
    """One line of the report card: a heading (with its segment colour) or a name/value pair."""

    text: str
    value: str = ""
    colour: tuple[int, int, int] | None = None
    heading: bool = False


def _signed(m: Measurement) -> str:
    return ("+" if m.value > 0 else "") + format_value(m.value, m.unit)


def card_rows(ctx: Context) -> list[CardRow]:
    """The report card's table: per segment its measurements (with the change since the prior in
    brackets when there is one), then the unsegmented ones, then the notes."""
    prior = ctx.options.prior

    def measured(items: Sequence[Measurement], label: str) -> list[CardRow]:
        rows = []
        for m in items:
            value = format_value(m.value, m.unit)
            if prior is not None and (delta := changes([m], label[:64], prior)):
                value += f" ({', '.join(_signed(d) for d in delta)})"
            rows.append(
                CardRow(
                    f"{m.concept.meaning}{f' ({m.modifier.meaning.lower()})' if m.modifier else ''}", value
                )
            )
        return rows

    rows: list[CardRow] = []
    if prior is not None:  # the date only: the card carries no accession or UID
        rows.append(CardRow(f"In brackets: the change since the prior study of {prior.when}"))
    for segment in sorted(ctx.findings.segments, key=lambda s: s.number):
        status = "not found" if segment.is_empty else ""
        rows.append(CardRow(segment.label, status, segment.color_rgb, heading=True))
        if not segment.is_empty:
            rows += measured(ctx.findings.measurements_for(segment.number), segment.label)
    if ctx.findings.measurements_for(None):
        rows.append(CardRow(ctx.findings.summary_label, heading=True))
        rows += measured(ctx.findings.measurements_for(None), ctx.findings.summary_label)
    notes = [*ctx.findings.notes, *([ctx.options.comparison_note] if ctx.options.comparison_note else [])]
    if notes:
        rows.append(CardRow("Notes", heading=True))
        rows += [CardRow(line) for note in notes for line in textwrap.wrap(note, 70)]
    return rows or [CardRow("Nothing found", heading=True)]


def render_report_card(ctx: Context) -> npt.NDArray[np.uint8]:
    """The measurements as a two-column table, with the algorithm's identity and the disclaimer."""
    width, height = _CARD_SIZE
    canvas = Image.new("RGB", _CARD_SIZE, (16, 16, 24))
    draw = ImageDraw.Draw(canvas)
    white, grey, amber = (255, 255, 255), (190, 190, 200), (255, 200, 0)
    date = ctx.content_date
    draw.text((40, 28), f"{ctx.findings.pipeline} — AI results", font=font(36), fill=white)
    draw.text(
        (40, 80),
        f"Algorithm {ctx.algorithm_name} {ctx.algorithm_version} · {ctx.options.manufacturer} "
        f"{ctx.options.software_version} · {date[:4]}-{date[4:6]}-{date[6:]}",
        font=font(20),
        fill=grey,
    )
    draw.line((40, 118, width - 40, 118), fill=grey, width=1)
    y, bottom = 134, height - 104
    rows = card_rows(ctx)
    # shrink the table (down to 60 %) rather than cut it when a pipeline reports many values
    needed = sum(50 if row.heading else 34 for row in rows)
    scale = max(0.6, min(1.0, (bottom - y) / needed))
    heading, body = font(round(28 * scale)), font(round(24 * scale))
    for index, row in enumerate(rows):
        step, line = round((50 if row.heading else 34) * scale), round(34 * scale)
        if y + step + (line if index < len(rows) - 1 else 0) > bottom:  # keep a line for "… more"
            draw.text(
                (76, y),
                f"… {len(rows) - index} more lines in the structured report (SR)",
                font=body,
                fill=grey,
            )
            break
        if row.heading:
            y += round(8 * scale)
            if row.colour is not None:
                box = round(22 * scale)
                draw.rectangle((40, y + 5, 40 + box, y + 5 + box), fill=row.colour, outline=white)
            draw.text((76, y), row.text, font=heading, fill=white)
            if row.value:
                draw.text((560, y + 2), row.value, font=body, fill=amber)
            y += step - round(8 * scale)
        else:
            draw.text((76, y), row.text, font=body, fill=grey)
            if row.value:
                value_width = draw.textlength(row.value, font=body)
                draw.text((width - 60 - value_width, y), row.value, font=body, fill=white)
            y += step
    draw.line((40, height - 92, width - 40, height - 92), fill=grey, width=1)
    draw.text((40, height - 74), DISCLAIMER, font=font(28), fill=amber)
    return np.asarray(canvas, dtype=np.uint8)


def key_slices(ctx: Context) -> list[int]:
    """The pipeline's key slices, or the slice with the most segmented area; none when nothing was found."""
    if ctx.findings.key_slices:
        return list(dict.fromkeys(ctx.findings.key_slices))[: ctx.options.max_key_images]
    found = ctx.non_empty_segments()
    if not found:
        return []
    area = sum(ctx.slice_counts(s) for s in found)
    return [int(np.argmax(area))]


def _sc(
    ctx: Context,
    pixels: npt.NDArray[np.uint8],
    number: int,
    orientation: tuple[str, str],
    spacing: float | None,
) -> hd.sc.SCImage:
    source = ctx.first_source
    sc = hd.sc.SCImage(
        pixel_array=pixels,
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        study_instance_uid=source.StudyInstanceUID,
        series_instance_uid=ctx.uid("sc-series"),
        series_number=ctx.series_number_base + 2,
        sop_instance_uid=ctx.uid(f"sc-{number}"),
        instance_number=number,
        manufacturer=ctx.options.manufacturer,
        pixel_spacing=(spacing, spacing) if spacing else None,
        patient_orientation=orientation,
    )
    sc.ImageType = ["DERIVED", "SECONDARY"]
    # type 2C; dciodvfy cannot tell the part is unpaired. R or L only: the source's may be anything
    laterality = str(source.get("Laterality") or "").strip().upper()
    sc.Laterality = laterality if laterality in ("R", "L") else ""
    sc.BurnedInAnnotation = "YES"
    sc.ConversionType = "WSD"
    ctx.stamp(sc, "key images")  # patient and study, checked
    return sc


def build_sc(ctx: Context) -> list[hd.sc.SCImage]:
    """Key images first, then the report card, with consecutive instance numbers from 1."""
    affine = ctx.volume.affine
    orientation = (_direction_letter(affine[:3, 0]), _direction_letter(affine[:3, 1]))
    segments = ctx.non_empty_segments()
    images: list[hd.sc.SCImage] = []
    for k in key_slices(ctx):
        pixels, spacing = render_key_image(ctx, k, [s for s in segments if s.mask[k].any()])
        sc = _sc(ctx, pixels, len(images) + 1, orientation, spacing)
        reference = Dataset()
        reference.ReferencedSOPClassUID = ctx.slice_sources[k].SOPClassUID
        reference.ReferencedSOPInstanceUID = ctx.slice_sources[k].SOPInstanceUID
        if ctx.frames[k] is not None:
            reference.ReferencedFrameNumber = ctx.frames[k]
        sc.SourceImageSequence = [reference]
        sc.DerivationDescription = f"Source slice with {ctx.algorithm_name} segmentation overlay"[:1024]
        sc.ImageComments = f"Key image {len(images) + 1}, slice {k + 1}"
        images.append(sc)
    card = _sc(ctx, render_report_card(ctx), len(images) + 1, orientation, None)
    del card.PatientOrientation
    card.add_new("PatientOrientation", "CS", None)  # type 2: a text page has no patient orientation
    card.ImageComments = REPORT_CARD
    images.append(card)
    return images
