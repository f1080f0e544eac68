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

import argparse
import csv
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ai_models import Pipeline, PipelineError, UnknownPipelineError, get_pipeline, run_pipeline, select_device
from dicom_io.reference import ReferenceInputError, find_reference, read_reference
from dicom_io.scoring import Score, match_structures, parse_mapping, score, summary
from dicom_io.series import SeriesError
from dicom_io.types import GeometryError
from dicom_io.volume import load_series
from plugin.config import Config
from plugin.offline import input_files, parse_options

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


def _fmt(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def print_report(document: dict[str, Any]) -> None:
    """The per-case table, the summary and the verdict, for a terminal."""
    print(f"pipeline {document['pipeline']} {document['version']}")
    header = (
        f"{'segment':<22} {'reference':<18} {'Dice':>6} {'HD95 mm':>8} {'ref mL':>9} {'ours mL':>9} "
        f"{'diff %':>7}"
    )
    for case in document["cases"]:
        print(f"\n{case['case']}  ({case['reference_kind']} {case['reference']})")
        if case["error"]:
            print(f"  pipeline refused the case: {case['error']}")
            continue
        print("  " + header)
        for s in case["structures"]:
            print(
                f"  {s['segment'][:22]:<22} {s['reference'][:18]:<18} {s['dice']:>6.3f} "
                f"{_fmt(s['hd95_mm'], 1):>8} {s['reference_ml']:>9.1f} {s['pipeline_ml']:>9.1f} "
                f"{s['difference_percent']:>+7.1f}"
            )
        if case["unmatched_reference_structures"]:
            print("  not scored (no segment): " + ", ".join(case["unmatched_reference_structures"]))
        for note in case["notes"]:
            print(f"  note: {note}")
    print(f"\nsummary over {len(document['cases'])} case(s)")
    print(
        f"  {'segment':<22} {'Dice mean':>9} {'worst':>6} {'HD95 mean':>9} {'worst':>7} "
        f"{'diff % mean':>11} {'worst':>7}"
    )
    for s in document["summary"]:
        print(
            f"  {s['segment'][:22]:<22} {s['dice_mean']:>9.3f} {s['dice_worst']:>6.3f} "
            f"{_fmt(s['hd95_mm_mean'], 1):>9} {_fmt(s['hd95_mm_worst'], 1):>7} "
            f"{s['difference_percent_mean']:>+11.1f} {s['difference_percent_worst']:>+7.1f}"
        )
    for b in document["below_min_dice"]:
        print(f"below --min-dice {document['min_dice']}: {b['case']} {b['segment']} Dice {b['dice']:.3f}")
    for case in document["failed_cases"]:
        print(f"failed: {case}")


def command(args: argparse.Namespace, config: Config) -> int:
    """The `radgate validate` command (exit status in the module docstring)."""
    base, configured = config.pipeline_options(args.pipeline)
    try:
        options = {**configured, **parse_options(args.option or [])}
        mapping = parse_mapping(args.map or [])
        pairs = pair_cases(args.cases, args.reference)
        pipeline = get_pipeline(base, **options)
    except (UnusableCaseError, UnknownPipelineError, ValueError) as err:
        print(f"radgate validate: {err}", file=sys.stderr)
        return 2
    device = torch.device(args.device) if args.device else select_device()
    results = []
    for case, reference in pairs:
        try:
            results.append(validate_case(case, reference, pipeline, mapping=mapping, device=device))
        except UnusableCaseError as err:
            print(f"radgate validate: {err}", file=sys.stderr)
            return 2
    document = report(args.pipeline, pipeline.version, results, args.min_dice)
    print_report(document)
    if args.out:
        write_report(document, args.out)
        print(f"\nreport in {args.out / REPORT_JSON}, {args.out / REPORT_CSV}, {args.out / SUMMARY_CSV}")
    return 0 if document["passed"] else 1
