"""The DICOM Segmentation (SEG): one segment per non-empty finding segment, on the source grid.

Frames are taken from the source plane each mask slice came from (`Volume.sources`), empty frames
are kept (OHIF has shifted segments when they were omitted), and the pixel data stay uncompressed
Explicit VR Little Endian, which every viewer decodes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import highdicom as hd
import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset

from dicom_io.results.common import Context
from dicom_io.types import Code, Segment


@dataclass(frozen=True)
class SegInfo:
    """The written SEG and, per finding segment number, its segment number in the SEG (1..n)."""

    dataset: hd.seg.Segmentation
    segment_numbers: dict[int, int]
    tracking_uids: dict[int, str]


def coded(code: Code) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(code.value, code.scheme, code.meaning)


def _stacked_array(segments: list[Segment]) -> npt.NDArray[np.uint8]:
    """Segments stacked on the last axis (z, y, x, n): the only form that keeps overlaps.

    Stacked on a first axis and transposed, so each segment stays contiguous for highdicom's overlap
    sum and per-segment frame reads. Only used when segments overlap; otherwise the label array is
    passed (docs/design.md, "Results").
    """
    return np.stack([s.mask.view(np.uint8) for s in segments], axis=0).transpose(1, 2, 3, 0)


def _ohif_overlap_order(ctx: Context, segments: list[Segment]) -> list[Segment]:
    """Overlapping segments ordered so that OHIF 3.13 does not drop slices of any of them.

    OHIF (Cornerstone3D 5.6 adapters, compactMergeSegmentDataWithoutInformationLoss) packs
    overlapping segments into layers of per-slice arrays indexed in its display order, which runs
    down the slice normal, and merges a segment into a layer by iterating the longer array with
    forEach: a sparse array skips the slices the layer lacks, so a segment that ends lower in that
    order than the layer loses its slices there. With segments sorted by their first slice in our
    (ascending) order, last first, every segment reaches at least as far as the layers before it.
    """
    return sorted(segments, key=lambda s: -int(np.flatnonzero(ctx.slice_counts(s))[0]))


def _to_source_frames(ctx: Context, array: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
    """Put mask slice k at the frame of its source; single-frame sources are already in slice order."""
    if ctx.frames[0] is None:
        return array
    frames = np.zeros((int(ctx.first_source.NumberOfFrames), *array.shape[1:]), dtype=array.dtype)
    for k, frame in enumerate(ctx.frames):
        assert frame is not None  # checked in make_context: all or none
        frames[frame - 1] = array[k]
    return frames


def _drop_background_item(seg: Dataset) -> None:
    """Remove highdicom's "Background" item (segment 0) from a LABELMAP SegmentSequence.

    The background is already declared by PixelPaddingValue 0 (as Sup 243 intends), and OHIF 3.13
    keys segments by number but takes colours by position, so with item 0 first every segment
    would be drawn in the colour of the one before it (segment 1 in the background's black).
    """
    seg.SegmentSequence = [item for item in seg.SegmentSequence if item.SegmentNumber != 0]


def _add_laterality(description: hd.seg.SegmentDescription, segment: Segment) -> None:
    """The segment's laterality as a modifier: of its anatomic region when it has one, else of its type.

    highdicom has no argument for either. Region-coded structures (a cyst in the left kidney) carry
    it on the region, the others (the left adrenal gland) on the type, as TotalSegmentator's table
    and DCMQI code them; `dicom_io.reference` reads both places back.
    """
    if segment.laterality is None:
        return
    if segment.anatomic_region is not None:
        description.AnatomicRegionSequence[0].AnatomicRegionModifierSequence = [coded(segment.laterality)]
    else:
        description.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [
            coded(segment.laterality)
        ]


def _content_label(name: str) -> str:
    """ContentLabel is a CS: upper-case letters, digits, space and underscore, 16 characters."""
    return (re.sub(r"[^A-Z0-9_ ]", "_", name.upper()) or "RADGATE")[:16]


def build_seg(ctx: Context) -> SegInfo | None:
    """The SEG for the non-empty segments, or None when nothing was found (no empty SEG is written)."""
    segments = ctx.non_empty_segments()
    if not segments:
        return None
    labels, overlap = ctx.labels()
    if overlap:
        segments = _ohif_overlap_order(ctx, segments)
    algorithm = hd.AlgorithmIdentificationSequence(
        name=ctx.algorithm_name,
        family=coded(ctx.options.algorithm_family),
        version=ctx.algorithm_version,
    )
    tracking_uids = {s.number: ctx.uid(f"segment-{s.number}") for s in segments}
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=index,
            segment_label=s.label[:64],
            segmented_property_category=coded(s.category),
            segmented_property_type=coded(s.property_type),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            tracking_uid=tracking_uids[s.number],
            tracking_id=s.label[:64],
            anatomic_regions=[coded(s.anatomic_region)] if s.anatomic_region else None,
            display_color=hd.color.CIELabColor.from_rgb(*s.color_rgb),
        )
        for index, s in enumerate(segments, start=1)
    ]
    for description, segment in zip(descriptions, segments, strict=True):
        _add_laterality(description, segment)
    labelmap = ctx.options.segmentation_type == "LABELMAP"
    array = _stacked_array(segments) if overlap else labels
    seg = hd.seg.Segmentation(
        source_images=ctx.source_instances,
        pixel_array=_to_source_frames(ctx, array),
        segmentation_type=(
            hd.seg.SegmentationTypeValues.LABELMAP if labelmap else hd.seg.SegmentationTypeValues.BINARY
        ),
        segment_descriptions=descriptions,
        series_instance_uid=ctx.uid("seg-series"),
        series_number=ctx.series_number_base,
        sop_instance_uid=ctx.uid("seg"),
        instance_number=1,
        manufacturer=ctx.options.manufacturer,
        manufacturer_model_name=ctx.options.model_name,
        software_versions=ctx.options.software_version,
        device_serial_number=ctx.options.serial_number,
        content_description=f"{ctx.algorithm_name} {ctx.algorithm_version}"[:64],
        content_label=_content_label(ctx.findings.pipeline),
        omit_empty_frames=False,
    )
    if labelmap:
        _drop_background_item(seg)
    ctx.stamp(seg, "SEG")
    return SegInfo(
        dataset=seg,
        segment_numbers={s.number: index for index, s in enumerate(segments, start=1)},
        tracking_uids=tracking_uids,
    )


def segment_reference(info: SegInfo, finding_segment: int) -> hd.sr.ReferencedSegment:
    """The TID 1411 reference of one finding segment into the SEG, with the source series."""
    seg: Dataset = info.dataset
    return hd.sr.ReferencedSegment(
        sop_class_uid=seg.SOPClassUID,
        sop_instance_uid=seg.SOPInstanceUID,
        segment_number=info.segment_numbers[finding_segment],
        source_series=hd.sr.SourceSeriesForSegmentation(seg.ReferencedSeriesSequence[0].SeriesInstanceUID),
    )
