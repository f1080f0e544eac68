"""``radgate run``: one pipeline on one series folder, without the node; prints the measurements."""

from __future__ import annotations

import argparse
import sys

import torch

from ai_models import PipelineError, UnknownPipelineError
from dicom_io.results import ResultError
from dicom_io.series import SeriesError
from plugin.config import Config
from plugin.offline.run import parse_options, run_offline


def command(args: argparse.Namespace, config: Config) -> int:
    """The `radgate run` command: prints the measurements; exit 1 with the reason when it cannot.

    A name from the config's `pipelines` (--config) runs with its options; --option adds or overrides.
    """
    base, configured = config.pipeline_options(args.pipeline)
    try:
        findings = run_offline(
            base,
            args.input_dir,
            args.out,
            options={**configured, **parse_options(args.option or [])},
            device=torch.device(args.device) if args.device else None,
            write_dicom=not args.no_dicom,
        )
    except (UnknownPipelineError, PipelineError, SeriesError, ResultError, ValueError, OSError) as err:
        print(f"radgate run: {err}", file=sys.stderr)
        return 1
    for m in findings.measurements:
        where = f"segment {m.segment}" if m.segment is not None else "all"
        modifier = f" ({m.modifier.meaning})" if m.modifier else ""
        print(f"{m.concept.meaning}{modifier} [{where}]: {m.value:.2f} {m.unit.value}")
    for note in findings.notes:
        print(f"note: {note}")
    print(f"results in {args.out}")
    return 0
