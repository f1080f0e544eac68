"""Accuracy benchmark: a pipeline scored against the clinical contours of the real chest CT.

Runs what `radgate validate` runs (plugin.offline.acceptance.validate_case: load the series, read the
reference onto its grid, run the pipeline, pair structures with segments, score) on
shared/testdata/ct-chest-nsclc-lung1-001 and prints, per lung, Dice, HD95 (mm), the reference and
pipeline volumes and their difference, then the seconds of each step. Prints figures, never fails
on them; the accuracy figures of record live in bench/README.md ("## accuracy").

    .venv/bin/python bench/accuracy.py [--pipeline ct-lung] [--reference rtstruct.dcm|lungs-reference.nii.gz]
                                       [--device cpu|cuda] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CASE = "ct-chest-nsclc-lung1-001"
NIFTI_MAP = {"1": "Left lung", "2": "Right lung"}  # lungs-reference.nii.gz has label values only


def _testdata() -> Path:
    return Path(os.environ.get("RADGATE_TESTDATA") or ROOT.parent / "shared" / "testdata")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pipeline", default="ct-lung")
    parser.add_argument("--reference", default="rtstruct.dcm", help="file name inside the case folder")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--json", action="store_true", help="print the case's JSON instead of a table")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    import torch

    from ai_models import get_pipeline, select_device
    from plugin.offline.acceptance import validate_case

    case = _testdata() / CASE
    if not case.is_dir():
        print(f"bench/accuracy: {case} is missing (set RADGATE_TESTDATA)", file=sys.stderr)
        return 1
    device = torch.device(args.device) if args.device else select_device()
    pipeline = get_pipeline(args.pipeline)
    mapping = NIFTI_MAP if args.reference.endswith((".nii", ".nii.gz")) else {}
    started = time.perf_counter()
    result = validate_case(case, case / args.reference, pipeline, mapping=mapping, device=device)
    total = time.perf_counter() - started
    if args.json:
        print(json.dumps({**result.as_dict(), "total_seconds": total}, indent=2))
        return 0
    print(f"{args.pipeline} {pipeline.version} on {CASE} ({device}), reference {args.reference}")
    print(
        f"{'segment':<12} {'reference':<10} {'Dice':>6} {'HD95 mm':>8} {'ref mL':>8} {'ours mL':>8} "
        f"{'diff %':>7}"
    )
    for s in result.scores:
        hd = "-" if s.hd95_mm is None else f"{s.hd95_mm:.1f}"
        print(
            f"{s.segment:<12} {s.reference:<10} {s.dice:>6.3f} {hd:>8} {s.reference_ml:>8.0f} "
            f"{s.pipeline_ml:>8.0f} {s.difference_percent:>+7.1f}"
        )
    print(f"pipeline {result.seconds:.1f} s; load, reference and scoring {total - result.seconds:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
