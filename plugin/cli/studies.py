"""``radgate studies``: what the node has received, read straight from the job store."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

from plugin.config import Config
from plugin.store.engine import migrated_store
from plugin.store.queries import StudySummary


def _load(config: Config) -> list[StudySummary]:
    """The studies in the store; none if the default SQLite file does not exist (nothing received)."""
    if config.database_url is None and not Path(config.db_url.split(":///", 1)[1]).exists():
        return []
    with migrated_store(config.db_url) as store:
        return store.studies()


def print_studies(config: Config, as_json: bool) -> int:
    studies = _load(config)
    if as_json:
        rows = [asdict(s) for s in studies]
        json.dump(rows, sys.stdout, indent=2, default=lambda v: v.isoformat())
        sys.stdout.write("\n")
        return 0
    if not studies:
        print(f"no studies in {config.db_url}")
        return 0
    print(f"{'STUDY INSTANCE UID':<64}  REV  {'STATE':<9}  SERIES  INSTANCES  LAST RECEIVED")
    for s in studies:
        print(
            f"{s.study_uid:<64}  {s.revision:>3}  {s.state:<9}  {s.series_count:>6}  {s.instance_count:>9}  "
            f"{s.last_received_at:%Y-%m-%d %H:%M:%S}Z"
        )
    return 0
