"""The TID 1500 Measurement Report (Comprehensive 3D SR) that carries the numbers.

One volumetric group (TID 1411) per segment with measurements, referencing its SEG segment, and one
for measurements that belong to no segment, whose ROI is a Volume Surface POINT inside what was
found. (Not a plain TID 1501 group: pixelmed picks one template for all groups of a report, so it
rejects 1411 and 1501 groups side by side.) Every NUM is INFERRED FROM a
SCOORD3D POINT inside its segment (world LPS, the source frame of reference): OHIF 3.13's SR loader
drops a whole report whose groups carry no coordinates. Segments the pipeline looked for but did not
find, and the pipeline's notes, go into the root "Qualitative Evaluations" container as text, so an
empty result is still a valid report that says so. (OHIF 3.13 shows a measured value of 0 as blank.)
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from dicom_io.results.common import Context
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


def _locate(ctx: Context, group: Sequence[Dataset], point_zyx: npt.NDArray[np.float64]) -> None:
    """Give every NUM of the group an INFERRED FROM SCOORD3D POINT (TID 300 row 8) at point_zyx.

    highdicom refuses coordinates in volumetric groups, so they are added to the built items.
    """
    point = ctx.voxel_to_patient(point_zyx[np.newaxis, :])
    for item in group[0].ContentSequence:
        if item.ValueType != "NUM":
            continue
        coordinates = hd.sr.CoordinatesForMeasurement3D(
            graphic_type=hd.sr.GraphicTypeValues3D.POINT,
            graphic_data=point,
            frame_of_reference_uid=ctx.frame_of_reference_uid,
        )
        if "ContentSequence" not in item:
            item.ContentSequence = hd.sr.ContentSequence()
        item.ContentSequence.append(coordinates)


def _algorithm(ctx: Context) -> hd.sr.AlgorithmIdentification:
    return hd.sr.AlgorithmIdentification(name=ctx.algorithm_name, version=ctx.algorithm_version)


def _segment_group(
    ctx: Context, seg: SegInfo, segment: Segment
) -> hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations:
    site = segment.anatomic_region or segment.property_type
    group = hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=seg.tracking_uids[segment.number], identifier=segment.label[:64]
        ),
        referenced_segment=segment_reference(seg, segment.number),
        finding_type=coded(segment.property_type),
        finding_category=coded(segment.category),
        finding_sites=[
            hd.sr.FindingSite(
                anatomic_location=coded(site),
                laterality=coded(segment.laterality) if segment.laterality else None,
            )
        ],
        algorithm_id=_algorithm(ctx),
        measurements=_measurements(ctx.findings.measurements_for(segment.number)),
    )
    _locate(ctx, group, inside_point(segment.mask, ctx.slice_counts(segment)))
    return group


def _unsegmented_group(
    ctx: Context, found: Sequence[Segment]
) -> hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations:
    """Measurements of no segment, located at a point of what was found (or the volume centre)."""
    if found:
        labels = ctx.labels()[0]
        point = inside_point(labels > 0, np.array([np.count_nonzero(plane) for plane in labels]))
    else:
        point = (np.array(ctx.volume.shape, dtype=np.float64) - 1) / 2
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
        measurements=_measurements(ctx.findings.measurements_for(None)),
    )
    _locate(ctx, group, point)
    return group


def _qualitative_container(ctx: Context) -> hd.sr.ContainerContentItem | None:
    """What was looked for and not found, and the pipeline's notes, as report-level text."""
    texts = [(codes.DCM.Finding, f"No {s.label} found") for s in ctx.findings.segments if s.is_empty]
    if not ctx.findings.segments and not ctx.findings.measurements:
        texts.append((codes.DCM.Finding, "Nothing found"))
    texts += [(codes.DCM.Comment, note) for note in ctx.findings.notes]
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
    groups: list[hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations] = []
    if seg is not None:
        groups += [_segment_group(ctx, seg, s) for s in found if ctx.findings.measurements_for(s.number)]
    if ctx.findings.measurements_for(None):
        groups.append(_unsegmented_group(ctx, found))
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
