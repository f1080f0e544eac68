"""``radgate jobs`` and ``radgate jobs retry``: the job queue, printed for an operator."""

from __future__ import annotations

import json
import sys

from plugin.config import Config
from plugin.jobs.queue import STEPS, list_jobs, placement_text, retry_job
from plugin.logs import escape_controls
from plugin.store.engine import migrated_store


def _seconds(timings: dict[str, float]) -> str:
    return " ".join(f"{k.removesuffix('_s')} {timings[k]:.1f}s" for k in STEPS if k in timings) or "-"


def _deliveries(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} {state}" for state, n in sorted(counts.items())) or "-"


def print_jobs(config: Config, as_json: bool) -> int:
    """`radgate jobs`: a table (or JSON) of every job, with where its last attempt ran; UIDs and
    accession numbers only."""
    with migrated_store(config.db_url) as store:
        jobs = list_jobs(store, config.results_dir)
    if as_json:
        print(json.dumps(jobs, indent=2))
        return 0
    if not jobs:
        print("no jobs")
        return 0
    columns = "STUDY / STEPS / WHERE / DELIVERIES / ERROR"
    print(f"{'ID':>5} {'STATE':<9} {'PIPELINE':<10} {'REV':>3} {'TRY':>3}  {columns}")
    for j in jobs:
        where = escape_controls(placement_text(j["placement"]))
        print(
            f"{j['id']:>5} {j['state']:<9} {j['pipeline'] or '-':<10} {j['revision']:>3} {j['attempts']:>3}  "
            f"{j['study_uid']}  [{_seconds(j['timings'])}]  [{where}]  "
            f"[{_deliveries(j['deliveries'])}]"
            + (f"  {escape_controls(j['error'])}" if j["error"] else "")  # one row, whatever the text
        )
    return 0


def retry_command(config: Config, job_id: int) -> int:
    """`radgate jobs retry JOB_ID`: 0 when something was re-queued, 1 when there was nothing to do."""
    try:
        with migrated_store(config.db_url) as store:
            print(retry_job(store, job_id))
        return 0
    except (LookupError, ValueError) as err:
        print(f"radgate: {err}", file=sys.stderr)
        return 1
