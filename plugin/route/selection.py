"""Which series of a study a pipeline runs on: its requirements first, then its preference.

Works from what routing has without reading pixels: one header per series and how many instances
the series has. Coverage is slices x spacing (SpacingBetweenSlices, else SliceThickness): the node
records no slice positions, and reading every header of a study to get them would cost a read per
instance at completion. The declaration itself is `dicom_io.selection.SeriesWanted`.

Refused for every pipeline, whatever it declares (`always_refused`): a localizer (scout), DERIVED
or SECONDARY images (MPR, MIP, screen captures), a dose report, objects that are no image series
(SR, KO, PR, SEG, RTSTRUCT, ...), and results radgate wrote (Manufacturer and model "radgate",
as `dicom_io.results` stamps them), so a study coming back from the PACS with our results in it is
not run on them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.multival import ConstrainedList

from dicom_io.selection import RESULT_MANUFACTURER, RESULT_MODEL_NAME, Plane, SeriesWanted

Header = Mapping[str, Any] | Dataset
"""One instance's attributes by DICOM keyword: a header-only Dataset or a plain mapping."""

NON_IMAGE_MODALITIES = frozenset(
    {"SR", "KO", "PR", "SEG", "RTSTRUCT", "RTPLAN", "RTDOSE", "RTRECORD", "RTIMAGE", "REG", "RWV", "DOC",
     "PLAN", "FID", "AU", "ECG", "HD", "RESP", "SMR", "OT"}
)  # fmt: skip
"""Modalities of objects that are not an image series a pipeline could analyse (OT: other, e.g. a
scanned form or a secondary capture)."""

OWN_EQUIPMENT = (RESULT_MANUFACTURER.casefold(), RESULT_MODEL_NAME.casefold())
"""Our results' equipment (the synthetic phantoms say Manufacturer radgate too, but another model)."""

_SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"  # and its multi-frame variants .7.1 to .7.4
_DOSE_REPORT = re.compile(r"dose\s*(report|info|summary|record)|patient\s*protocol|screen\s*save", re.I)
_PLANES: tuple[Plane, Plane, Plane] = ("sagittal", "coronal", "axial")  # by the axis of the slice normal


def values(raw: Any) -> list[Any]:
    """The non-empty values of an attribute (a multi-valued one gives several; absent gives none)."""
    items = list(raw) if isinstance(raw, list | tuple | ConstrainedList) else [raw]  # MultiValue, Sequence
    return [v for v in items if v is not None and str(v).strip() != ""]


def number(value: Any) -> float | None:
    """A DICOM number (DS/IS string or a number) as float; None when it is not one."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    try:
        return float(str(value).strip())
    except ValueError:
        return None


def _text(header: Header, keyword: str) -> str:
    return "\\".join(str(v).strip() for v in values(header.get(keyword)))


def _shared(header: Header, group: str, keyword: str) -> Any:
    """An attribute at the top level, else in the shared functional groups (enhanced multi-frame)."""
    if values(header.get(keyword)):
        return header.get(keyword)
    for shared in values(header.get("SharedFunctionalGroupsSequence"))[:1]:
        for item in values(shared.get(group))[:1]:
            return item.get(keyword)
    return None


def _positive(raw: Any) -> float | None:
    found = [x for x in (number(v) for v in values(raw)) if x is not None]
    return found[0] if found and math.isfinite(found[0]) and found[0] > 0 else None


def _plane(header: Header) -> Plane | None:
    orientation = _shared(header, "PlaneOrientationSequence", "ImageOrientationPatient")
    cosines = [number(v) for v in values(orientation)]
    if len(cosines) != 6 or any(c is None for c in cosines):
        return None
    row, column = np.array(cosines[:3], dtype=float), np.array(cosines[3:], dtype=float)
    normal = np.cross(row, column)
    if not np.all(np.isfinite(normal)) or np.linalg.norm(normal) < 1e-6:
        return None
    return _PLANES[int(np.argmax(np.abs(normal)))]


@dataclass(frozen=True)
class SeriesInfo:
    """A series as routing sees it: one instance's header and how many instances it has."""

    series_uid: str
    header: Header
    instances: int


@dataclass(frozen=True)
class Measured:
    """A series as the selection sees it: what its header says, and its rank by a declaration."""

    series_uid: str
    instances: int
    slices: int
    plane: Plane | None
    thickness_mm: float | None
    coverage_mm: float | None
    kernel: str
    kernel_rank: int
    description_rank: int

    def key(self) -> tuple[int, int, float, float, int, str]:
        """The preference order: lower is better (see `SeriesWanted`)."""
        thickness = math.inf if self.thickness_mm is None else self.thickness_mm
        return (
            self.kernel_rank,
            self.description_rank,
            thickness,
            -(self.coverage_mm or 0.0),
            -self.instances,
            self.series_uid,
        )


def _rank(patterns: Sequence[str], texts: Sequence[str]) -> int:
    """The index of the first pattern any text matches; len(patterns) when none does."""
    for index, pattern in enumerate(patterns):
        if any(re.search(pattern, text, re.IGNORECASE) for text in texts if text):
            return index
    return len(patterns)


def measure(series_uid: str, header: Header, instances: int, wanted: SeriesWanted) -> Measured:
    """What selection needs from one header and the instance count (nothing is read from disk)."""
    frames = _positive(header.get("NumberOfFrames")) or 1.0  # a peer's "1A", NaN or -3 counts as 1
    slices = instances * max(1, int(min(frames, 2**31)))
    thickness = _positive(_shared(header, "PixelMeasuresSequence", "SliceThickness"))
    step = _positive(_shared(header, "PixelMeasuresSequence", "SpacingBetweenSlices")) or thickness
    kernels = [str(v).strip() for v in values(header.get("ConvolutionKernel"))]
    described = [_text(header, k) for k in ("SeriesDescription", "ProtocolName", "SequenceName")]
    return Measured(
        series_uid=series_uid,
        instances=instances,
        slices=slices,
        plane=_plane(header),
        thickness_mm=thickness,
        coverage_mm=None if step is None else slices * step,
        kernel="\\".join(kernels),
        kernel_rank=_rank(wanted.kernels, kernels),
        description_rank=_rank(wanted.descriptions, described),
    )


def always_refused(header: Header) -> str | None:
    """Why no pipeline runs on this series whatever it declares (see the module doc); else None."""
    modality = _text(header, "Modality").upper()
    if modality in NON_IMAGE_MODALITIES:
        return f"Modality {modality}: not an image series"
    if tuple(_text(header, k).casefold() for k in ("Manufacturer", "ManufacturerModelName")) == OWN_EQUIPMENT:
        return "results radgate wrote (Manufacturer and model radgate)"
    if str(header.get("SOPClassUID") or "").startswith(_SECONDARY_CAPTURE):
        return "a secondary capture"
    image_type = [str(v).strip().upper() for v in values(header.get("ImageType"))]
    if "LOCALIZER" in image_type:
        return "a localizer (scout): ImageType " + "\\".join(image_type)
    if image_type[:1] == ["DERIVED"] or image_type[1:2] == ["SECONDARY"] or "SCREEN SAVE" in image_type:
        return "not ORIGINAL\\PRIMARY: ImageType " + "\\".join(image_type)
    if _DOSE_REPORT.search(_text(header, "SeriesDescription")):
        return f"a dose report: SeriesDescription {_text(header, 'SeriesDescription')!r}"
    return None


def _mm(value: float) -> str:
    return f"{value:g} mm"


def _between(low: float | None, high: float | None) -> str:
    if low is None:
        return f"at most {_mm(high or 0.0)}"
    return f"at least {_mm(low)}" if high is None else f"{low:g} to {_mm(high)}"


def rejections(header: Header, measured: Measured, wanted: SeriesWanted) -> tuple[str, ...]:
    """Every requirement of `wanted` the series fails (empty: it is a candidate)."""
    refused = always_refused(header)
    if refused is not None:
        return (refused,)
    reasons = []
    modality = _text(header, "Modality").upper()
    if wanted.modalities and modality not in wanted.modalities:
        reasons.append(f"Modality {modality or 'absent'}, needs {' or '.join(wanted.modalities)}")
    if wanted.planes and measured.plane is not None and measured.plane not in wanted.planes:
        reasons.append(f"{measured.plane} slices, needs {' or '.join(wanted.planes)}")
    if measured.slices < wanted.min_slices:
        reasons.append(f"{measured.slices} slice(s), needs at least {wanted.min_slices}")
    low, high = wanted.slice_thickness_mm
    thick = measured.thickness_mm
    if thick is not None and ((low is not None and thick < low) or (high is not None and thick > high)):
        reasons.append(f"slices {_mm(thick)} thick, needs {_between(low, high)}")
    coverage = measured.coverage_mm
    if coverage is not None and coverage < wanted.min_coverage_mm:
        reasons.append(f"covers {_mm(round(coverage, 1))}, needs at least {_mm(wanted.min_coverage_mm)}")
    acquisition = _text(header, "MRAcquisitionType").upper()
    if wanted.acquisition is not None and acquisition and acquisition != wanted.acquisition:
        reasons.append(f"MRAcquisitionType {acquisition}, needs {wanted.acquisition}")
    return tuple(reasons)


def why_lost(loser: Measured, winner: Measured, wanted: SeriesWanted) -> str:
    """The first criterion of the preference order on which `loser` ranks below `winner`."""
    if loser.kernel_rank != winner.kernel_rank:
        return (
            f"kernel {loser.kernel or 'absent'!r} is preferred less than {winner.kernel!r} "
            f"(rank {loser.kernel_rank + 1} vs {winner.kernel_rank + 1} of {len(wanted.kernels) + 1})"
        )
    if loser.description_rank != winner.description_rank:
        return (
            f"its description is preferred less (rank {loser.description_rank + 1} vs "
            f"{winner.description_rank + 1} of {len(wanted.descriptions) + 1})"
        )
    if loser.thickness_mm != winner.thickness_mm:
        shown = "unknown" if loser.thickness_mm is None else _mm(loser.thickness_mm)
        return f"thicker slices ({shown} vs {_mm(winner.thickness_mm or 0.0)})"
    if (loser.coverage_mm or 0.0) != (winner.coverage_mm or 0.0):
        return (
            f"less coverage ({_mm(round(loser.coverage_mm or 0.0, 1))}"
            f" vs {_mm(round(winner.coverage_mm or 0.0, 1))})"
        )
    if loser.instances != winner.instances:
        return f"fewer instances ({loser.instances} vs {winner.instances})"
    return "equal on every criterion; the lower SeriesInstanceUID wins"


@dataclass(frozen=True)
class Ranked:
    """One series in a pipeline's ranking: its place (1 is chosen; None: rejected) and why."""

    series_uid: str
    place: int | None
    reasons: tuple[str, ...]  # rejected: each requirement it fails; ranked below 1: why it lost


def rank_series(series: Sequence[SeriesInfo], wanted: SeriesWanted) -> tuple[Ranked, ...]:
    """The series by `wanted`'s preference, best first, then those it rejects (in the given order)."""
    candidates: list[Measured] = []
    rejected: list[Ranked] = []
    for s in series:
        measured = measure(s.series_uid, s.header, s.instances, wanted)
        reasons = rejections(s.header, measured, wanted)
        if reasons:
            rejected.append(Ranked(s.series_uid, None, reasons))
        else:
            candidates.append(measured)
    candidates.sort(key=Measured.key)
    ranked = [
        Ranked(m.series_uid, place, () if place == 1 else (why_lost(m, candidates[0], wanted),))
        for place, m in enumerate(candidates, start=1)
    ]
    return (*ranked, *rejected)


def chosen(ranking: Sequence[Ranked]) -> str | None:
    """The series a ranking chose; None when every series was rejected."""
    return ranking[0].series_uid if ranking and ranking[0].place == 1 else None
