"""``radgate deliveries`` and ``radgate deliveries retry``: the outbox, printed for an operator."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import asdict

from plugin.config import Config
from plugin.dispatch.outbox import list_deliveries, retry_deliveries
from plugin.logs import escape_controls
from plugin.store.engine import migrated_store
from plugin.store.models import DeliveryState


def print_deliveries(config: Config, as_json: bool, state: str | None = None) -> int:
    """`radgate deliveries`: a table, or JSON, of the deliveries in the store."""
    with migrated_store(config.db_url) as store:
        found = list_deliveries(store, state)
    if as_json:
        json.dump([asdict(d) for d in found], sys.stdout, indent=2, default=lambda v: v.isoformat())
        sys.stdout.write("\n")
        return 0
    if not found:
        print(f"no deliveries in {config.db_url}")
        return 0
    header = f"{'ID':>6}  {'JOB':>5}  {'SOP INSTANCE UID':<64}  {'DESTINATION':<16}  {'STATE':<7}"
    print(f"{header}  TRIES  NEXT / ERROR")
    for d in found:
        if d.state == DeliveryState.SENT and d.sent_at is not None:
            note = f"sent {d.sent_at:%Y-%m-%d %H:%M:%S}Z"
        else:
            due = f"next {d.next_attempt_at:%Y-%m-%d %H:%M:%S}Z" if d.state == DeliveryState.PENDING else ""
            note = "  ".join(x for x in (due, d.last_error or "") if x)
        print(
            f"{d.id:>6}  {d.job_id:>5}  {d.sop_instance_uid:<64}  {d.destination:<16}  {d.state:<7}  "
            f"{d.attempts:>5}  {escape_controls(note)}"  # a destination's error text: one row
        )
    return 0


def retry_command(config: Config, ids: Sequence[int], all_dead: bool) -> int:
    """`radgate deliveries retry`: 0 when every named delivery was re-queued, 1 otherwise."""
    if not ids and not all_dead:
        print("radgate: name delivery ids or give --all-dead", file=sys.stderr)
        return 2
    with migrated_store(config.db_url) as store:
        requeued = retry_deliveries(store, ids, all_dead)
    print(
        f"re-queued {len(requeued)} dead deliveries"
        + (f": {', '.join(map(str, requeued))}" if requeued else "")
    )
    not_dead = sorted(set(ids) - set(requeued))
    if not_dead:
        print(f"not DEAD (or unknown), left as they are: {', '.join(map(str, not_dead))}", file=sys.stderr)
        return 1
    return 0
