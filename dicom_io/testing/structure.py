"""A viewer's-eye summary of any SEG or TID 1500 SR, ours or another toolkit's (dcmqi, Slicer).

The same reader runs over radgate's output and reference objects, so tests can compare the
features viewers depend on: ReferencedSeriesSequence, per-frame source references, CIELab colours,
algorithm identification (SEG); tracking identifiers, segment references and, above all, coordinates
on every measurement group, without which OHIF 3.13 shows nothing of the SR.

Compared with dcmqi's examples (testdata/dcmqi, read by this module in tests/test_sr.py) our
objects differ where it matters to viewers:
* dcmqi's SR groups carry no SCOORD/SCOORD3D, so OHIF's SR loader rejects the report; every
  radgate NUM is INFERRED FROM a SCOORD3D POINT inside its segment. That needs Comprehensive 3D SR
  (dcmqi writes Comprehensive SR, which cannot hold SCOORD3D).
* Both reference the SEG segment and the source series (TID 1411); dcmqi adds an Image Library
  listing every source image, radgate lists them only as evidence (same for OHIF, smaller SR).
* dcmqi's observer is a person, radgate's the node as a device (TID 1004); dcmqi marks the report
  PARTIAL, radgate COMPLETE (UNVERIFIED) with TID 4019 algorithm name/version in every group.
* dcmqi uses retired SRT codes (G-D705 Volume, R-00317 Mean); radgate SCT/DCM/UCUM only.
* dcmqi's liver SEG is SEMIAUTOMATIC without the Algorithm Identification macro; radgate writes
  AUTOMATIC with family, name and version. Both have ReferencedSeriesSequence, CIELab colours,
  shared pixel measures, one source image per frame, uncompressed Explicit VR Little Endian.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from pydicom.dataset import Dataset

_TRACKING_ID, _TRACKING_UID = "112039", "112040"
_REFERENCED_SEGMENT, _SOURCE_SERIES = "121191", "121232"
_MEASUREMENT_GROUP, _IMAGE_LIBRARY, _OBSERVER_TYPE = "125007", "111028", "121005"
_ALGORITHM_NAME = "111001"


@dataclass(frozen=True)
class SegmentStructure:
    number: int
    label: str
    category: str
    property_type: str
    algorithm_type: str
    algorithm_identification: bool
    cielab: bool


@dataclass(frozen=True)
class SegStructure:
    sop_class_uid: str
    segmentation_type: str
    transfer_syntax_uid: str
    frames: int
    frames_with_source_image: int
    referenced_series: int
    shared_pixel_measures: bool
    segments: tuple[SegmentStructure, ...]


@dataclass(frozen=True)
class GroupStructure:
    tracking_id: str | None
    tracking_uid: bool
    referenced_segment: bool
    source_series: bool
    measurements: tuple[tuple[str, str], ...]  # (concept meaning, UCUM unit)
    located_measurements: int  # NUMs with an INFERRED FROM SCOORD/SCOORD3D
    group_coordinates: bool  # a SCOORD/SCOORD3D directly in the group
    algorithm_identification: bool

    @property
    def viewer_locatable(self) -> bool:
        """What OHIF 3.13 needs to show the group at all."""
        return self.group_coordinates or self.located_measurements > 0


@dataclass(frozen=True)
class SrStructure:
    sop_class_uid: str
    template: str | None
    completion: str
    observer_types: tuple[str, ...]
    image_library: bool
    evidence_instances: int
    groups: tuple[GroupStructure, ...]
    root_items: tuple[str, ...]  # concept meanings of the root's direct children


def _code(item: Dataset, keyword: str = "ConceptNameCodeSequence") -> tuple[str, str]:
    sequence = item.get(keyword)
    if not sequence:
        return ("", "")
    return (str(sequence[0].CodeValue), str(sequence[0].CodeMeaning))


def _children(item: Dataset) -> Iterator[Dataset]:
    yield from item.get("ContentSequence", [])


def describe_seg(seg: Dataset) -> SegStructure:
    frames = seg.get("PerFrameFunctionalGroupsSequence", [])
    with_source = sum(
        1
        for frame in frames
        if any(d.get("SourceImageSequence") for d in frame.get("DerivationImageSequence", []))
    )
    shared = seg.get("SharedFunctionalGroupsSequence", [Dataset()])[0]
    segments = tuple(
        SegmentStructure(
            number=int(s.SegmentNumber),
            label=str(s.get("SegmentLabel", "")),
            category=_code(s, "SegmentedPropertyCategoryCodeSequence")[1],
            property_type=_code(s, "SegmentedPropertyTypeCodeSequence")[1],
            algorithm_type=str(s.get("SegmentAlgorithmType", "")),
            algorithm_identification="SegmentationAlgorithmIdentificationSequence" in s,
            cielab="RecommendedDisplayCIELabValue" in s,
        )
        for s in seg.get("SegmentSequence", [])
    )
    return SegStructure(
        sop_class_uid=str(seg.SOPClassUID),
        segmentation_type=str(seg.get("SegmentationType", "")),
        transfer_syntax_uid=str(getattr(seg, "file_meta", Dataset()).get("TransferSyntaxUID", "")),
        frames=int(seg.get("NumberOfFrames", 0)),
        frames_with_source_image=with_source,
        referenced_series=len(seg.get("ReferencedSeriesSequence", [])),
        shared_pixel_measures="PixelMeasuresSequence" in shared,
        segments=segments,
    )


def _describe_group(group: Dataset) -> GroupStructure:
    tracking_id, tracking_uid, segment, series, algorithm, coordinates = (
        None,
        False,
        False,
        False,
        False,
        False,
    )
    measurements: list[tuple[str, str]] = []
    located = 0
    for item in _children(group):
        code, _ = _code(item)
        value_type = item.ValueType
        if code == _TRACKING_ID:
            tracking_id = str(item.TextValue)
        tracking_uid |= code == _TRACKING_UID
        segment |= code == _REFERENCED_SEGMENT
        series |= code == _SOURCE_SERIES
        algorithm |= code == _ALGORITHM_NAME
        coordinates |= value_type in ("SCOORD", "SCOORD3D")
        if value_type == "NUM":
            value = item.MeasuredValueSequence[0] if item.get("MeasuredValueSequence") else Dataset()
            measurements.append((_code(item)[1], _code(value, "MeasurementUnitsCodeSequence")[0]))
            located += any(
                child.ValueType in ("SCOORD", "SCOORD3D") and child.RelationshipType == "INFERRED FROM"
                for child in _children(item)
            )
    return GroupStructure(
        tracking_id=tracking_id,
        tracking_uid=tracking_uid,
        referenced_segment=segment,
        source_series=series,
        measurements=tuple(measurements),
        located_measurements=located,
        group_coordinates=coordinates,
        algorithm_identification=algorithm,
    )


def _groups(item: Dataset) -> Iterator[Dataset]:
    for child in _children(item):
        if child.ValueType == "CONTAINER":
            if _code(child)[0] == _MEASUREMENT_GROUP:
                yield child
            else:
                yield from _groups(child)


def describe_sr(sr: Dataset) -> SrStructure:
    template = sr.get("ContentTemplateSequence")
    root_children = list(_children(sr))
    evidence = sum(
        len(series.get("ReferencedSOPSequence", []))
        for study in sr.get("CurrentRequestedProcedureEvidenceSequence", [])
        for series in study.get("ReferencedSeriesSequence", [])
    )
    return SrStructure(
        sop_class_uid=str(sr.SOPClassUID),
        template=str(template[0].TemplateIdentifier) if template else None,
        completion=str(sr.get("CompletionFlag", "")),
        observer_types=tuple(
            _code(item, "ConceptCodeSequence")[1]
            for item in root_children
            if _code(item)[0] == _OBSERVER_TYPE
        ),
        image_library=any(_code(item)[0] == _IMAGE_LIBRARY for item in root_children),
        evidence_instances=evidence,
        groups=tuple(_describe_group(group) for group in _groups(sr)),
        root_items=tuple(_code(item)[1] for item in root_children),
    )
