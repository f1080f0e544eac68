"""The TID 1500 Measurement Report (Comprehensive 3D SR) that carries the numbers.

One volumetric group (TID 1411) per segment with measurements, referencing its SEG segment, and one
for measurements that belong to no segment, whose ROI is a Volume Surface POINT inside what was
found. (Not a plain TID 1501 group: pixelmed picks one template for all groups of a report, so it
rejects 1411 and 1501 groups side by side.) Every NUM is INFERRED FROM a
SCOORD3D POINT inside its segment (world LPS, the source frame of reference): OHIF 3.13's SR loader
drops a whole report whose groups carry no coordinates. Each volumetric group is followed by one
planar group (TID 1410) per measurement, an image-region POINT on the CT, which OHIF lists.
Segments the pipeline looked for but did not find, and the pipeline's notes, go into the root
"Qualitative Evaluations" container as text, so an empty result is still a valid report that says
so. (OHIF 3.13 shows a measured value of 0 as blank.)

With a prior study's result (`ResultOptions.prior`), each volumetric group also carries the change
of its measurements since the prior (absolute and relative NUMs whose Derivation says so,
`dicom_io.results.prior`), the root's qualitative evaluations say how many days earlier the prior
was (no identifier or date: a de-identified export keeps the text), and the prior's SR is listed
in the Pertinent Other Evidence Sequence (it is another study's instance). Without one,
`ResultOptions.comparison_note` says there why nothing was compared.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import highdicom as hd
import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from dicom_io.results.common import Context
from dicom_io.results.prior import changes
from dicom_io.results.seg import SegInfo, coded, segment_reference
from dicom_io.types import Measurement, Segment

# TID 1500 row 10: the report-level qualitative evaluations container.
QUALITATIVE_EVALUATIONS = hd.sr.CodedConcept("C0034375", "UMLS", "Qualitative Evaluations")

# Procedure Reported (CID 100) by modality; any imaging procedure otherwise.
_PROCEDURES = {
    "CT": hd.sr.CodedConcept("25045-6", "LN", "CT unspecified body region"),
    "MR": hd.sr.CodedConcept("25056-3", "LN", "MRI unspecified body region"),
}
_IMAGING_PROCEDURE = hd.sr.CodedConcept("363679005", "SCT", "Imaging procedure")


def inside_point(mask: npt.NDArray[np.bool_], counts: npt.NDArray[np.int64]) -> npt.NDArray[np.float64]:
    """A voxel (z, y, x) of the mask near its centroid, on a source slice (`counts`: voxels per slice).

    The slice nearest the centroid's z, then the in-plane centroid, or the mask pixel nearest to it
    when the centroid falls outside (a ring, a crescent): a viewer jumps to a slice that shows it.
    """
    filled = np.flatnonzero(counts)
    centre_z = float(np.dot(counts, np.arange(len(counts))) / counts.sum())
    z = int(filled[np.argmin(np.abs(filled - centre_z))])
    ys, xs = np.nonzero(mask[z])
    y, x = round(float(ys.mean())), round(float(xs.mean()))
    if not mask[z, y, x]:
        nearest = int(np.argmin((ys - y) ** 2 + (xs - x) ** 2))
        y, x = int(ys[nearest]), int(xs[nearest])
    return np.array([z, y, x], dtype=np.float64)


def _observation_context(ctx: Context) -> hd.sr.ObservationContext:
    """The device observer (TID 1004) is the node itself, so a reader knows no person made the report."""
    return hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device,
            observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                uid=ctx.device_uid,
                name=ctx.options.model_name,
                manufacturer_name=ctx.options.manufacturer,
                model_name=ctx.options.model_name,
                serial_number=ctx.options.serial_number,
            ),
        )
    )


def _measurements(items: Sequence[Measurement]) -> list[hd.sr.Measurement]:
    return [
        hd.sr.Measurement(
            name=coded(m.concept),
            value=m.value,
            unit=coded(m.unit),
            derivation=coded(m.modifier) if m.modifier else None,
        )
        for m in items
    ]


def _changes(ctx: Context, measurements: Sequence[Measurement], label: str) -> list[Measurement]:
    """The change of each measurement since the prior (none without a prior), for the group `label`."""
    prior = ctx.options.prior
    return [] if prior is None else changes(measurements, label[:64], prior)


def _locate(ctx: Context, group: Sequence[Dataset], point_zyx: npt.NDArray[np.float64]) -> None:
    """Give every NUM of the group an INFERRED FROM SCOORD3D POINT (TID 300 row 8) at point_zyx."""
    _infer_from(
        group,
        hd.sr.CoordinatesForMeasurement3D(
            graphic_type=hd.sr.GraphicTypeValues3D.POINT,
            graphic_data=ctx.voxel_to_patient(point_zyx[np.newaxis, :]),
            frame_of_reference_uid=ctx.frame_of_reference_uid,
        ),
    )


def _infer_from(group: Sequence[Dataset], coordinates: Dataset) -> None:
    """Append `coordinates` (TID 300 row 8, INFERRED FROM) to every NUM of the built group.

    highdicom refuses coordinates on the measurements of ROI groups, so they are added afterwards.
    """
    for item in group[0].ContentSequence:
        if item.ValueType != "NUM":
            continue
        if "ContentSequence" not in item:
            item.ContentSequence = hd.sr.ContentSequence()
        item.ContentSequence.append(copy.deepcopy(coordinates))


def _algorithm(ctx: Context) -> hd.sr.AlgorithmIdentification:
    return hd.sr.AlgorithmIdentification(name=ctx.algorithm_name, version=ctx.algorithm_version)


def _finding_sites(segment: Segment) -> list[hd.sr.FindingSite]:
    site = segment.anatomic_region or segment.property_type
    laterality = coded(segment.laterality) if segment.laterality else None
    return [hd.sr.FindingSite(anatomic_location=coded(site), laterality=laterality)]


def _segment_groups(
    ctx: Context, seg: SegInfo, segment: Segment
) -> list[
    hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
    | hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
]:
    """The segment's volumetric group, then one planar group per measurement on its key slice."""
    measurements = ctx.findings.measurements_for(segment.number)
    group = hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=seg.tracking_uids[segment.number], identifier=segment.label[:64]
        ),
        referenced_segment=segment_reference(seg, segment.number),
        finding_type=coded(segment.property_type),
        finding_category=coded(segment.category),
        finding_sites=_finding_sites(segment),
        algorithm_id=_algorithm(ctx),
        measurements=_measurements([*measurements, *_changes(ctx, measurements, segment.label)]),
    )
    point = inside_point(segment.mask, ctx.slice_counts(segment))
    _locate(ctx, group, point)
    planar = _planar_groups(ctx, segment.label, point, measurements, segment)
    return [group, *planar]


def _planar_groups(
    ctx: Context,
    label: str,
    point_zyx: npt.NDArray[np.float64],
    measurements: Sequence[Measurement],
    segment: Segment | None,
) -> list[hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations]:
    """One TID 1410 group per measurement: the same value at an image-region POINT on source slice z.

    Its NUM is INFERRED FROM that point too, and a Comment names it ("Right lung: Volume (cm3)"):
    what OHIF 3.13 needs to list it (docs/design.md, "The SR in OHIF"). The volumetric group stays
    the one that says which segment was measured.
    """
    z = int(point_zyx[0])
    source, frame = ctx.slice_sources[z], ctx.frames[z]
    column_row = ctx.image_point(z, ctx.voxel_to_patient(point_zyx[np.newaxis, :])[0])[np.newaxis, :]
    image = hd.sr.SourceImageForRegion(
        referenced_sop_class_uid=source.SOPClassUID,
        referenced_sop_instance_uid=source.SOPInstanceUID,
        referenced_frame_numbers=[frame] if frame is not None else None,
    )
    groups = []
    for m in measurements:
        name = f"{label}: {m.concept.meaning}"
        group = hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=ctx.uid(f"planar {name}"), identifier=name[:64]),
            referenced_region=hd.sr.ImageRegion(
                graphic_type=hd.sr.GraphicTypeValues.POINT, graphic_data=column_row, source_image=image
            ),
            finding_type=coded(segment.property_type) if segment else None,
            finding_category=coded(segment.category) if segment else None,
            finding_sites=_finding_sites(segment) if segment else None,
            algorithm_id=_algorithm(ctx),
            measurements=_measurements([m]),
        )
        _infer_from(
            group,
            hd.sr.CoordinatesForMeasurement(
                graphic_type=hd.sr.GraphicTypeValues.POINT, graphic_data=column_row, source_image=image
            ),
        )
        # OHIF labels a probe only with a Comment (or its own private free-text codes)
        group[0].ContentSequence.append(
            hd.sr.TextContentItem(
                name=codes.DCM.Comment,
                value=f"{name} ({m.unit.value})"[:1024],
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            )
        )
        groups.append(group)
    return groups


def _unsegmented_groups(
    ctx: Context, found: Sequence[Segment]
) -> list[
    hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
    | hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
]:
    """Measurements of no segment, located at a point of what was found (or the volume centre)."""
    if found:
        labels = ctx.labels()[0]
        point = inside_point(labels > 0, np.array([np.count_nonzero(plane) for plane in labels]))
    else:
        point = (np.array(ctx.volume.shape, dtype=np.float64) - 1) / 2
    unsegmented = ctx.findings.measurements_for(None)
    group = hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=ctx.uid("whole-volume"), identifier=ctx.findings.summary_label
        ),
        referenced_volume_surface=hd.sr.VolumeSurface(
            graphic_type=hd.sr.GraphicTypeValues3D.POINT,
            graphic_data=ctx.voxel_to_patient(point[np.newaxis, :]),
            frame_of_reference_uid=ctx.frame_of_reference_uid,
            source_series=hd.sr.SourceSeriesForSegmentation(str(ctx.first_source.SeriesInstanceUID)),
        ),
        algorithm_id=_algorithm(ctx),
        measurements=_measurements([*unsegmented, *_changes(ctx, unsegmented, ctx.findings.summary_label)]),
    )
    _locate(ctx, group, point)
    point = np.round(point)  # the planar groups need a voxel; the volume centre may fall between
    label = ctx.findings.summary_label
    return [group, *_planar_groups(ctx, label, point, unsegmented, None)]


def _qualitative_container(ctx: Context) -> hd.sr.ContainerContentItem | None:
    """What was looked for and not found, and the pipeline's notes, as report-level text."""
    texts = [(codes.DCM.Finding, f"No {s.label} found") for s in ctx.findings.segments if s.is_empty]
    if not ctx.findings.segments and not ctx.findings.measurements:
        texts.append((codes.DCM.Finding, "Nothing found"))
    texts += [(codes.DCM.Comment, note) for note in ctx.findings.notes]
    prior = ctx.options.prior
    if prior is not None:  # no identifier or date: the text stays in a de-identified export
        study_date = str(ctx.first_source.get("StudyDate", "") or "")
        texts.append(
            (
                codes.DCM.Comment,
                f"Compared with {prior.earlier_than(study_date)};"
                " its report is listed as Pertinent Other Evidence",
            )
        )
    elif ctx.options.comparison_note:
        texts.append((codes.DCM.Comment, ctx.options.comparison_note))
    if not texts:
        return None
    container = hd.sr.ContainerContentItem(
        name=QUALITATIVE_EVALUATIONS, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
    )
    container.ContentSequence = hd.sr.ContentSequence(
        [
            hd.sr.TextContentItem(
                name=name, value=text[:1024], relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
            )
            for name, text in texts
        ]
    )
    return container


def build_sr(ctx: Context, seg: SegInfo | None) -> hd.sr.Comprehensive3DSR:
    """The measurement report; `seg` is None when nothing was segmented."""
    found = ctx.non_empty_segments()
    groups: list[
        hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
        | hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
    ] = []
    if seg is not None:
        for s in found:
            if ctx.findings.measurements_for(s.number):
                groups += _segment_groups(ctx, seg, s)
    if ctx.findings.measurements_for(None):
        groups += _unsegmented_groups(ctx, found)
    placeholder = not groups
    report = hd.sr.MeasurementReport(
        observation_context=_observation_context(ctx),
        procedure_reported=_PROCEDURES.get(
            ctx.volume.modality or str(ctx.first_source.Modality), _IMAGING_PROCEDURE
        ),
        # highdicom insists on one group; with nothing measured it is removed again below
        imaging_measurements=groups
        or [
            hd.sr.MeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(uid=ctx.uid("empty"), identifier="empty")
            )
        ],
    )
    root = report[0]
    if placeholder:
        del root.ContentSequence[-1]
    qualitative = _qualitative_container(ctx)
    if qualitative is not None:
        root.ContentSequence.append(qualitative)
    evidence = ([seg.dataset] if seg is not None else []) + ctx.source_instances
    if ctx.options.prior is not None:  # another study's: highdicom lists it as Pertinent Other Evidence
        evidence.append(ctx.options.prior.evidence(ctx.first_source))
    sr = hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=root,
        series_instance_uid=ctx.uid("sr-series"),
        series_number=ctx.series_number_base + 1,
        sop_instance_uid=ctx.uid("sr"),
        instance_number=1,
        manufacturer=ctx.options.manufacturer,
        is_complete=True,
    )
    ctx.stamp(sr, "SR")
    return sr
