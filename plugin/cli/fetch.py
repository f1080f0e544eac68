"""``radgate fetch``: ask a configured source for a study, record the request, list requests."""

from __future__ import annotations

import getpass
import json
import sys
import time
from dataclasses import asdict

from plugin.config import Config
from plugin.fetch import (
    FetchError,
    FetchStatus,
    NoMatch,
    UnknownSource,
    get_fetch,
    list_fetches,
    submit_fetch,
)
from plugin.logs import escape_controls
from plugin.store.engine import Store, migrated_store
from plugin.store.models import FetchState

EXIT_FAILED = 1  # the request FAILED (--wait) or did not end in time, or an accession is ambiguous
EXIT_USAGE = 2  # unknown source or pipeline
EXIT_NO_MATCH = 3  # the source holds no such study


def _pipelines(config: Config, pipeline: str | None) -> list[str]:
    """The names --pipeline may take (the registry is read only when one is given)."""
    if pipeline is None:
        return []
    from ai_models.registry import available_pipelines
    from plugin.route.rules import usable_pipelines

    return sorted(usable_pipelines(config, available_pipelines()))


def _row(f: FetchStatus) -> str:
    what = f"study {f.study_uid}" if f.study_uid else f"accession {f.accession}"
    jobs = ", ".join(map(str, f.jobs)) or "-"
    line = (
        f"{f.id:>5} {f.state:<8} {f.source:<12} {f.attempts:>3}  {what}  "
        f"[{f.pipeline or 'rules'}] [jobs {jobs}]"
    )
    return line + (f"  {escape_controls(f.error)}" if f.error else "")


def print_fetches(config: Config, as_json: bool) -> int:
    """`radgate fetch --list`: the latest fetch requests, newest first (UIDs and accessions only)."""
    with migrated_store(config.db_url) as store:
        rows = list_fetches(store)
    if as_json:
        json.dump([asdict(r) for r in rows], sys.stdout, indent=2, default=lambda v: v.isoformat())
        sys.stdout.write("\n")
    elif not rows:
        print("no fetch requests")
    else:
        print(f"{'ID':>5} {'STATE':<8} {'SOURCE':<12} {'TRY':>3}  STUDY  [PIPELINE] [JOBS]  ERROR")
        for row in rows:
            print(_row(row))
    return 0


def fetch_command(
    config: Config,
    source: str,
    *,
    study_uid: str | None,
    accession: str | None,
    pipeline: str | None,
    wait_s: float | None,
) -> int:
    """`radgate fetch --source S --accession A | --study UID [--pipeline P] [--wait SECONDS]`."""
    with migrated_store(config.db_url) as store:
        try:
            submitted = submit_fetch(
                config,
                store,
                source,
                study_uid=study_uid,
                accession=accession,
                pipeline=pipeline,
                pipelines=_pipelines(config, pipeline),
                reason=f"radgate fetch by {getpass.getuser()}",
            )
        except NoMatch as err:
            print(f"radgate: {err}", file=sys.stderr)
            return EXIT_NO_MATCH
        except (UnknownSource, FetchError) as err:
            print(f"radgate: {err}", file=sys.stderr)
            return EXIT_USAGE if isinstance(err, UnknownSource) else EXIT_FAILED
        except ValueError as err:
            print(f"radgate: {err}", file=sys.stderr)
            return EXIT_USAGE
        found = f" (study {submitted.study_uid})" if submitted.study_uid and accession else ""
        print(f"fetch request {submitted.request_id} queued{found}; `radgate serve` retrieves it")
        if submitted.note:
            print(f"note: {submitted.note}")
        if wait_s is None:
            return 0
        return _wait(store, submitted.request_id, wait_s)


def _wait(store: Store, request_id: int, wait_s: float) -> int:
    """Poll the request until it is DONE (0) or FAILED (1), or ``wait_s`` has passed (1)."""
    deadline = time.monotonic() + wait_s
    while True:
        status = get_fetch(store, request_id)
        if status is not None and status.state in (FetchState.DONE, FetchState.FAILED):
            print(_row(status))
            return 0 if status.state == FetchState.DONE else EXIT_FAILED
        if time.monotonic() >= deadline:
            print(f"radgate: fetch request {request_id} not done after {wait_s:.0f} s", file=sys.stderr)
            return EXIT_FAILED
        time.sleep(0.5)
