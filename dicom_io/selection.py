"""What series a pipeline wants: a declaration in plain data, read before any pixel is.

A study as a PACS sends it holds several series of one acquisition (a scout, reconstructions with
different kernels and slice thicknesses, a dose report, perhaps our own earlier results). A
pipeline says here which of them it can use and which it prefers; the node (`plugin.route.selection`)
checks every series' header against it and runs the pipeline on the best one. This module holds
the declaration only: no pydicom, no torch, so pipelines (`ai_models`) and the torch-free parts of
the node (the Orthanc plugin) can both import it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

Plane = Literal["axial", "coronal", "sagittal"]

RESULT_MANUFACTURER = RESULT_MODEL_NAME = "radgate"
"""Manufacturer and ManufacturerModelName of every SEG, SR, SC and KOS `dicom_io.results` writes:
how a series of our own results is told apart, so that no pipeline ever runs on one."""

CT_SOFT_KERNELS = (
    r"(?i)^("
    r"STANDARD|STND|SOFT( ?TISSUE)?|SMOOTH|BODY|ABDOMEN|MEDIASTINUM|"
    r"[BDHIJQ][a-z]?[0-4]\d[a-z]?|"  # Siemens B19f, B30f, Br40, Hr38, I30f, Qr40: up to 49 is soft
    r"FC(0\d|1\d)|"  # Canon/Toshiba FC01-FC19: body kernels
    r"[AB]|UB"  # Philips A (smooth), B (standard), UB
    r")$"
)
"""ConvolutionKernel values of soft and standard reconstructions (vendor names; ignore case)."""

CT_SHARP_KERNELS = (
    r"(?i)^("
    r"LUNG|BONE|BONE ?PLUS|EDGE|SHARP|DETAIL|HI(GH)? ?RES(OLUTION)?|"
    r"[BDHIJQ][a-z]?[5-9]\d[a-z]?|"  # Siemens B60f, B70f, Bl57, Br64, Hr68, I70f: 50 and up is sharp
    r"FC([5-9]\d)|"  # Canon/Toshiba FC50-FC99: lung and bone kernels
    r"[CDEL]|Y[A-F]"  # Philips C, D (sharp), E, L (lung), YA-YF (lung/high resolution)
    r")$"
)
"""ConvolutionKernel values of sharp (lung, bone, high-resolution) reconstructions."""


@dataclass(frozen=True)
class SeriesWanted:
    """The series a pipeline can use (requirements) and the order it prefers them in.

    Requirements reject a series with a reason; a header that does not say (no SliceThickness,
    no orientation) is not held against it, the pipeline's own check judges the volume later.
    Every pipeline also refuses, whatever it declares: localizers, DERIVED or SECONDARY images,
    dose reports, non-image objects (SR, KO, PR, SEG, RTSTRUCT, ...) and results radgate wrote.

    modalities: DICOM Modality values it takes; empty: any image modality.
    planes: the slice planes it takes (from ImageOrientationPatient); empty: any.
    min_slices: image planes (instances, or frames of a multi-frame instance).
    min_coverage_mm: slices x spacing along the slice normal (SpacingBetweenSlices, else
        SliceThickness).
    slice_thickness_mm: inclusive (min, max) of SliceThickness; None on a side: open.
    acquisition: MRAcquisitionType it needs ("2D" or "3D"); None: either.
    kernels: regular expressions on ConvolutionKernel, best first (re.search); a series whose
        kernel matches none of them ranks after those that match one.
    descriptions: regular expressions on SeriesDescription, ProtocolName and SequenceName, best
        first, ranked the same way.

    Ranking of the series that meet the requirements: kernel, then description, then the thinnest
    slices, then the most coverage, then the most instances, then SeriesInstanceUID (stable).
    """

    modalities: tuple[str, ...] = ()
    planes: tuple[Plane, ...] = ()
    min_slices: int = 1
    min_coverage_mm: float = 0.0
    slice_thickness_mm: tuple[float | None, float | None] = (None, None)
    acquisition: Literal["2D", "3D"] | None = None
    kernels: tuple[str, ...] = ()
    descriptions: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        low, high = self.slice_thickness_mm
        if self.min_slices < 1 or self.min_coverage_mm < 0:
            raise ValueError(f"min_slices must be >= 1 and min_coverage_mm >= 0: {self!r}")
        if low is not None and high is not None and low > high:
            raise ValueError(f"slice_thickness_mm min {low} is above max {high}")
        for pattern in (*self.kernels, *self.descriptions):
            try:
                re.compile(pattern)
            except re.error as err:  # here, not at the first study it would be matched against
                raise ValueError(f"invalid pattern {pattern!r}: {err}") from None


ANY_SERIES = SeriesWanted()
"""The declaration of a pipeline that declares none: any image series, in the common order."""
