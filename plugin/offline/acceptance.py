"""`radgate validate`: score a pipeline against a department's own reference segmentations.

For each case (a folder with the DICOM files of a study; the series is chosen as `radgate run`
chooses it): load the series, read the reference onto its grid (`dicom_io.reference`), run the
pipeline, pair reference structures with the pipeline's segments and score each pair
(`dicom_io.scoring`: Dice, HD95, volumes). Prints a table per case and a summary per segment;
with --out writes `validation.json` (everything), `validation.csv` (one row per case and
segment) and `validation-summary.csv` (one row per segment).

Exit status: 0 when every case was scored (and, with --min-dice, every Dice reached it); 1 when a
Dice is below --min-dice or the pipeline refused a case (the case is in the report with its
reason); 2 for input that cannot be scored (no reference, an unreadable one, a reference on
another grid, no structure that matches), with the case and the reason, before anything is written.
"""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ai_models import Pipeline, PipelineError, run_pipeline
from dicom_io.reference import ReferenceInputError, find_reference, read_reference
from dicom_io.scoring import Score, match_structures, score, summary
from dicom_io.series import SeriesError
from dicom_io.types import GeometryError
from dicom_io.volume import load_series
from plugin.offline.run import input_files

REPORT_JSON = "validation.json"
REPORT_CSV = "validation.csv"
SUMMARY_CSV = "validation-summary.csv"
CSV_FIELDS = (
    "case",
    "segment",
    "reference",
    "matched_by",
    "dice",
    "hd95_mm",
    "reference_ml",
    "pipeline_ml",
    "difference_ml",
    "difference_percent",
)


class UnusableCaseError(ValueError):
    """A case that cannot be scored (its reference or series); the message names the case."""


@dataclass
class CaseResult:
    """One case: where it came from, what was scored, or why the pipeline refused it."""

    case: str
    reference: str
    reference_kind: str
    series_instance_uid: str
    seconds: float = 0.0
    scores: list[Score] = field(default_factory=list)
    unmatched: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "case": self.case,
            "reference": self.reference,
            "reference_kind": self.reference_kind,
            "series_instance_uid": self.series_instance_uid,
            "pipeline_seconds": self.seconds,
            "error": self.error,
            "structures": [s.as_dict() for s in self.scores],
            "unmatched_reference_structures": self.unmatched,
            "notes": self.notes,
        }


def pair_cases(cases: Sequence[Path], references: Sequence[Path] | None) -> list[tuple[Path, Path]]:
    """Each case with its reference: given in the same order, or the one found inside the case.

    Raises UnusableCaseError when the counts differ or a case has no (or several) references.
    """
    if references:
        if len(references) != len(cases):
            raise UnusableCaseError(
                f"{len(references)} --reference for {len(cases)} cases: give one per case, in the same "
                "order, or none to find each case's reference inside its folder"
            )
        missing = [str(r) for r in references if not r.is_file()]
        if missing:
            raise UnusableCaseError(f"no such reference file: {', '.join(missing)}")
        return list(zip(cases, references, strict=True))
    out = []
    for case in cases:
        if not case.is_dir():
            raise UnusableCaseError(f"{case}: not a folder")
        try:
            out.append((case, find_reference(case)))
        except ReferenceInputError as err:
            raise UnusableCaseError(str(err)) from err
    return out


def validate_case(
    case: Path,
    reference_path: Path,
    pipeline: Pipeline,
    *,
    mapping: dict[str, str],
    device: torch.device,
) -> CaseResult:
    """Load, read the reference, run the pipeline and score one case.

    Raises UnusableCaseError (series or reference unusable, nothing to score); a pipeline that
    refuses the series gives a CaseResult with `error` set.
    """
    try:
        volume = load_series(input_files(case))
        reference = read_reference(reference_path, volume)
    except (SeriesError, ReferenceInputError, GeometryError, OSError) as err:
        raise UnusableCaseError(f"{case}: {err}") from err
    result = CaseResult(
        str(case), str(reference_path), reference.kind, str(volume.attributes.get("SeriesInstanceUID", ""))
    )
    started = time.perf_counter()
    try:
        findings = run_pipeline(pipeline, volume, device)
    except (PipelineError, GeometryError) as err:  # refused the series, or findings off its grid
        result.error = str(err)
        return result
    result.seconds = time.perf_counter() - started
    try:
        matches = match_structures(reference.structures, findings.segments, mapping)
        for m in matches:
            truth = reference.mask(m.structure)
            if not truth.any():
                raise ReferenceInputError(f"reference structure {m.structure.name!r} is empty on this series")
            result.scores.append(
                score(
                    m.segment.label,
                    m.structure.name,
                    m.by,
                    m.segment.mask,
                    truth,
                    volume.spacing,
                    volume.voxel_volume_ml,
                )
            )
    except ReferenceInputError as err:
        raise UnusableCaseError(f"{case}: {err}") from err
    matched = {m.structure.name for m in matches}
    result.unmatched = [s.name for s in reference.structures if s.name not in matched]
    result.notes = [*reference.notes, *findings.notes]
    return result


def report(
    pipeline: str, version: str, results: Sequence[CaseResult], min_dice: float | None
) -> dict[str, Any]:
    """The whole validation as JSON data: cases, summary per segment and the verdict."""
    below = [
        {"case": r.case, "segment": s.segment, "dice": s.dice}
        for r in results
        for s in r.scores
        if min_dice is not None and s.dice < min_dice
    ]
    return {
        "pipeline": pipeline,
        "version": version,
        "min_dice": min_dice,
        "cases": [r.as_dict() for r in results],
        "summary": summary([(r.case, r.scores) for r in results]),
        "below_min_dice": below,
        "failed_cases": [r.case for r in results if r.error],
        "passed": not below and not any(r.error for r in results),
    }


def write_report(document: dict[str, Any], out: Path) -> None:
    """validation.json, validation.csv and validation-summary.csv in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    (out / REPORT_JSON).write_text(json.dumps(document, indent=2) + "\n")
    with (out / REPORT_CSV).open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for case in document["cases"]:
            for row in case["structures"]:
                writer.writerow({"case": case["case"], **row})
    with (out / SUMMARY_CSV).open("w", newline="") as f:
        rows = document["summary"]
        if rows:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
