"""``radgate validate``: score a pipeline against reference segmentations and print the report."""

from __future__ import annotations

import argparse
import sys
from typing import Any

import torch

from ai_models import UnknownPipelineError, get_pipeline, select_device
from dicom_io.scoring import parse_mapping
from plugin.config import Config
from plugin.offline.acceptance import (
    REPORT_CSV,
    REPORT_JSON,
    SUMMARY_CSV,
    UnusableCaseError,
    pair_cases,
    report,
    validate_case,
    write_report,
)
from plugin.offline.run import parse_options


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
