"""Dispatch: the persistent outbox that sends result instances to the configured destinations.

The executor queues one ``Delivery`` row per (result instance, destination) in the same
transaction that marks its job SUCCEEDED, so a result is either queued durably or not produced at
all; nothing about pending sends lives only in memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from plugin.store import Delivery, DeliveryState, utcnow


def enqueue_deliveries(
    session: Session, job_id: int, results: Sequence[tuple[str, Path]], destinations: Sequence[str]
) -> int:
    """Queue every result for every destination inside the caller's transaction; returns rows added.

    Idempotent: a (job, SOP Instance UID, destination) already queued is left as it is, so an
    executor that repeats its last step after a crash queues nothing twice. No destinations
    queues nothing: the results stay in the data folder only.
    """
    wanted = {
        (uid, dest): Path(path).resolve() for uid, path in results for dest in dict.fromkeys(destinations)
    }
    if not wanted:
        return 0
    existing = set(
        session.execute(
            select(Delivery.sop_instance_uid, Delivery.destination).where(Delivery.job_id == job_id)
        ).tuples()
    )
    now = utcnow()
    added = 0
    for (uid, dest), path in wanted.items():
        if (uid, dest) in existing:
            continue
        session.add(
            Delivery(
                job_id=job_id,
                sop_instance_uid=uid,
                destination=dest,
                state=DeliveryState.PENDING,
                attempts=0,
                next_attempt_at=now,
                file_path=str(path),
                created_at=now,
                updated_at=now,
            )
        )
        added += 1
    session.flush()
    return added
