"""``radgate rules check``: validate the rules and dry-run them over files on disk."""

from __future__ import annotations

import json
import sys
from collections.abc import Collection, Sequence
from pathlib import Path

from plugin.config import Config, ConfigError
from plugin.route.rules import SeriesLookup, dry_run, format_report, validate_rules


def rules_check(
    config: Config,
    paths: Sequence[Path],
    available_pipelines: Collection[str],
    *,
    destinations: Sequence[str] | None = None,
    series_lookup: SeriesLookup | None = None,
    as_json: bool = False,
) -> int:
    """`radgate rules check`: validate the rules, dry-run them over files on disk, print the result.

    `series_lookup`: the pipelines' series declarations (None: the common order for all).
    Exit status: 0 done, 1 no DICOM series found, 2 bad rules or a path that does not exist.
    """
    try:
        rules = validate_rules(config, available_pipelines, destinations, series_lookup)
    except ConfigError as err:
        print(f"radgate: {err}", file=sys.stderr)
        return 2
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        print(f"radgate: no such file or folder: {', '.join(missing)}", file=sys.stderr)
        return 2
    report = dry_run(paths, rules)
    print(json.dumps(report, indent=2) if as_json else format_report(report))
    if not report["studies"]:
        print("radgate: no DICOM series found", file=sys.stderr)
        return 1
    return 0
