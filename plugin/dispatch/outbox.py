"""Dispatch: the persistent outbox that sends result instances to the configured destinations.

The executor queues one ``Delivery`` row per (result instance, destination) in the same
transaction that marks its job SUCCEEDED, so a result is either queued durably or not produced at
all; nothing about pending sends lives only in memory.

A delivery's life: PENDING (due at ``next_attempt_at``) -> SENDING (claimed by one dispatcher
under a lease, attempts+1) -> SENT; a failure puts it back to PENDING with a capped exponential
backoff and the reason in ``last_error``, and after ``dispatch.max_attempts`` it is DEAD (the dead
letter; ``radgate deliveries retry`` re-queues it). Each destination gets one association or one
STOW-RS request per batch. Delivery is at least once, which is safe because receivers are
idempotent per SOP Instance UID (see ``Dispatcher``). A destination an operator paused in the web
console keeps its deliveries PENDING, unclaimed, until it is resumed: a pause never fails one.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from plugin.config import Config, Deidentify, DispatchConfig
from plugin.dispatch.base import Outcomes, Outgoing, Sender, redact
from plugin.dispatch.pseudonyms import StorePseudonyms, load_key
from plugin.dispatch.senders import destination_secrets, make_sender
from plugin.store.engine import Store
from plugin.store.models import Delivery, DeliveryState, utcnow
from plugin.store.pauses import Paused, PauseKind
from plugin.wakeup import Wakeup

log = logging.getLogger(__name__)


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
    existing = {
        (uid, dest)
        for uid, dest in session.execute(
            select(Delivery.sop_instance_uid, Delivery.destination).where(Delivery.job_id == job_id)
        )
    }
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


# --- the dispatcher ---------------------------------------------------------------------------


def _not_paused() -> Any:
    """Deliveries to a destination an operator paused wait, PENDING, until it is resumed."""
    paused = select(Paused.name).where(Paused.kind == PauseKind.DESTINATION)
    return Delivery.destination.not_in(paused)


def backoff_delay(attempts: int, config: DispatchConfig, rng: random.Random) -> timedelta:
    """Delay before the next try after ``attempts`` failed ones: base·2^(n-1), capped, minus jitter.

    Jitter only shortens the delay, so the cap holds, and deliveries that failed together (one
    destination down) do not all come back in the same second.
    """
    raw = min(config.retry_max_s, config.retry_base_s * 2.0 ** max(attempts - 1, 0))
    return timedelta(seconds=raw * (1.0 - config.retry_jitter * rng.random()))


@dataclass(frozen=True)
class _Claimed:
    """A delivery row this dispatcher claimed (SENDING), with the attempt number it is on."""

    id: int
    sop_instance_uid: str
    file_path: str
    attempts: int


class Dispatcher:
    """Sends due deliveries in batches per destination and records every outcome in the store.

    Several dispatchers (threads, node processes) may share one store: a batch is claimed in one
    write transaction (SQLite's write lock; ``FOR UPDATE SKIP LOCKED`` elsewhere), so a row is
    sent by one of them. Delivery is at least once: a node that dies after the peer stored an
    instance but before SENT was committed leaves the row SENDING; when its claim expires the row
    is sent again. Receivers key instances by SOP Instance UID (Orthanc keeps one instance per
    UID; a PACS overwrites or ignores a duplicate), so the second send is harmless. SENT rows are
    never sent again.
    """

    def __init__(
        self, store: Store, config: Config, owner: str | None = None, seed: int | None = None
    ) -> None:
        self.store = store
        self.config = config.dispatch
        self.destinations = config.destinations
        self.calling_ae_title = config.dicom.ae_title
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._rng = random.Random(seed)
        self._data_dir = config.data_dir
        self._secrets_dir = config.secrets_dir
        self._results_dir = config.results_dir
        self._key: bytes | None = None
        self._key_lock = threading.Lock()
        self._wakeup = Wakeup()
        self._threads: list[threading.Thread] = []

    # ------------------------------------------------------------------ store transitions

    def release_stale_claims(self) -> int:
        """SENDING rows whose claim expired (their dispatcher died) go back to PENDING, due now.

        A row already at max_attempts becomes DEAD instead, so an instance that kills the node
        while it is sent cannot loop forever.
        """
        now = utcnow()
        stale = (Delivery.state == DeliveryState.SENDING, Delivery.lease_expires_at < now)
        error = "the dispatcher sending this stopped before recording the outcome (claim expired)"
        values = {"lease_owner": None, "lease_expires_at": None, "last_error": error, "updated_at": now}
        with self.store.session() as s:
            dead = s.execute(
                update(Delivery)
                .where(*stale, Delivery.attempts >= self.config.max_attempts)
                .values(state=DeliveryState.DEAD, **values)
            )
            again = s.execute(
                update(Delivery)
                .where(*stale)
                .values(state=DeliveryState.PENDING, next_attempt_at=now, **values)
            )
        count = int(dead.rowcount) + int(again.rowcount)  # type: ignore[attr-defined]
        if count:
            log.warning("%d delivery claim(s) expired; sending again (or DEAD at max attempts)", count)
        return count

    def due_destinations(self) -> list[str]:
        """Destinations not paused with a PENDING delivery that is due, the longest-waiting first."""
        with self.store.session() as s:
            rows = s.execute(
                select(Delivery.destination, func.min(Delivery.next_attempt_at))
                .where(
                    Delivery.state == DeliveryState.PENDING,
                    Delivery.next_attempt_at <= utcnow(),
                    _not_paused(),
                )
                .group_by(Delivery.destination)
                .order_by(func.min(Delivery.next_attempt_at))
            ).all()
        return [str(name) for name, _ in rows]

    def claim(self, destination: str) -> list[_Claimed]:
        """Claim up to batch_size due deliveries of one destination: SENDING, attempts+1, leased."""
        now = utcnow()
        with self.store.session() as s:
            ids = list(
                s.scalars(
                    select(Delivery.id)
                    .where(
                        Delivery.destination == destination,
                        Delivery.state == DeliveryState.PENDING,
                        Delivery.next_attempt_at <= now,
                        _not_paused(),
                    )
                    .order_by(Delivery.next_attempt_at, Delivery.id)
                    .limit(self.config.batch_size)
                    .with_for_update(skip_locked=True)
                )
            )
            if not ids:
                return []
            s.execute(
                update(Delivery)
                .where(Delivery.id.in_(ids), Delivery.state == DeliveryState.PENDING)
                .values(
                    state=DeliveryState.SENDING,
                    attempts=Delivery.attempts + 1,
                    lease_owner=self.owner,
                    lease_expires_at=now + timedelta(seconds=self.config.claim_timeout_s),
                    updated_at=now,
                )
            )
            rows = s.execute(
                select(Delivery.id, Delivery.sop_instance_uid, Delivery.file_path, Delivery.attempts)
                .where(Delivery.id.in_(ids), Delivery.lease_owner == self.owner)
                .order_by(Delivery.id)
            ).all()
        return [_Claimed(r.id, r.sop_instance_uid, r.file_path or "", r.attempts) for r in rows]

    def record(
        self,
        destination: str,
        claimed: Sequence[_Claimed],
        outcomes: Outcomes,
        final: Collection[int] = (),
    ) -> None:
        """Write each outcome: SENT, or PENDING with a backoff delay, or DEAD at max attempts.

        A failure whose delivery id is in ``final`` (refused: another try cannot help) is DEAD at
        once. Only rows still claimed by this dispatcher are written: if the claim expired
        meanwhile and another dispatcher took the row, its outcome wins.
        """
        now = utcnow()
        secrets = self._secrets(destination)
        with self.store.session() as s:
            for item in claimed:
                reason = outcomes.get(item.id, "no outcome reported by the sender")
                mine = (Delivery.id == item.id, Delivery.lease_owner == self.owner)
                cleared = {"lease_owner": None, "lease_expires_at": None, "updated_at": now}
                if reason is None:
                    values: dict[str, Any] = {"state": DeliveryState.SENT, "sent_at": now, "last_error": None}
                elif item.attempts >= self.config.max_attempts or item.id in final:
                    values = {"state": DeliveryState.DEAD, "last_error": redact(reason, secrets)}
                else:
                    values = {
                        "state": DeliveryState.PENDING,
                        "next_attempt_at": now + backoff_delay(item.attempts, self.config, self._rng),
                        "last_error": redact(reason, secrets),
                    }
                s.execute(update(Delivery).where(*mine).values(**values, **cleared))
        sent = sum(1 for item in claimed if outcomes.get(item.id, "") is None)
        failed = [item for item in claimed if outcomes.get(item.id, "") is not None]
        if sent:
            log.info("sent %d instance(s) to %s", sent, destination)
        for item in failed:
            log.warning(
                "delivery %d (SOP %s) to %s failed on attempt %d: %s",
                *(item.id, item.sop_instance_uid, destination, item.attempts),
                redact(outcomes.get(item.id) or "no outcome reported by the sender", secrets),
            )

    def _secrets(self, destination: str) -> list[str]:
        known = self.destinations.get(destination)
        return destination_secrets(known) if known is not None else []

    # ------------------------------------------------------------------ sending

    def send_batch(self, destination: str) -> int:
        """Claim, send and record one batch for one destination; returns how many were handled."""
        claimed = self.claim(destination)
        if not claimed:
            return 0
        target = self.destinations.get(destination)
        refused: Outcomes = {}
        if target is None:
            outcomes: Outcomes = {c.id: f"destination {destination!r} is not configured" for c in claimed}
        else:
            items = [Outgoing(c.id, c.sop_instance_uid, Path(c.file_path)) for c in claimed]
            sender = make_sender(target, self.calling_ae_title, self.config.timeout_s)
            try:
                if target.deidentify is None:
                    outcomes = sender.send(items)
                else:
                    outcomes, refused = self._send_deidentified(destination, target.deidentify, sender, items)
            except Exception as err:  # a sender bug must not kill the loop or leave rows SENDING
                log.exception("sender for %s failed", destination)
                outcomes = {c.id: f"internal error: {type(err).__name__}" for c in claimed}
                refused = {}
        self.record(destination, claimed, outcomes, refused.keys())
        return len(claimed)

    def _send_deidentified(
        self, destination: str, settings: Deidentify, sender: Sender, items: Sequence[Outgoing]
    ) -> tuple[Outcomes, Outcomes]:
        """Send de-identified copies of ``items`` (`plugin.dispatch.deidentify`); (outcomes, refused).

        The copies live in a private temporary folder under the data dir for the send only; every
        pseudonym they use is committed before they are sent.
        """
        # imported here, not above: de-identifying (dicomanonymizer's tables, pydicom's) is a delivery's
        # cost, not every start's
        from plugin.dispatch.deidentify import prepare

        with self._key_lock:
            if self._key is None:
                self._key = load_key(self._secrets_dir)
        domain = settings.pseudonym_domain or destination
        outgoing = self._data_dir / "outgoing"
        outgoing.mkdir(mode=0o700, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=outgoing, prefix="deid-") as work:
            names = StorePseudonyms(self.store, self._key, domain)
            prepared = prepare(items, settings, names, self._results_dir, Path(work))
            outcomes = {**prepared.failed, **prepared.refused}
            outcomes.update(sender.send(prepared.items) if prepared.items else {})
        return outcomes, prepared.refused

    def run_once(self) -> int:
        """One round: release stale claims, then one batch per due destination; returns rows handled."""
        self.release_stale_claims()
        return sum(self.send_batch(destination) for destination in self.due_destinations())

    def wake(self) -> None:
        """Deliveries may have been queued: idle sending threads look now, not at their next poll."""
        self._wakeup.wake()

    def start(self) -> None:
        """Run ``workers`` sending threads in the background until `stop`: each goes round again at
        once after a busy round, else after poll_interval_s or the next `wake`.

        First removes de-identified copies a killed dispatcher left in ``<data_dir>/outgoing``
        (folders older than the claim timeout: no live send still uses them). A database error
        (e.g. the disk is full) is logged and retried on the next round; the rows stay in the store.
        """
        self._remove_stale_copies()
        self._threads = [
            threading.Thread(
                target=self._wakeup.loop,
                args=(self.config.poll_interval_s, self._round),
                name=f"dispatch-{n}",
                daemon=True,
            )
            for n in range(self.config.workers)
        ]
        for thread in self._threads:
            thread.start()

    def _round(self) -> bool:
        try:
            return self.run_once() > 0
        except SQLAlchemyError as err:
            log.error("dispatch round failed on the store: %s", err)
            return False

    def _remove_stale_copies(self) -> None:
        outgoing = self._data_dir / "outgoing"
        if not outgoing.is_dir():
            return
        cutoff = time.time() - self.config.claim_timeout_s
        for folder in outgoing.glob("deid-*"):
            if folder.stat().st_mtime < cutoff:
                shutil.rmtree(folder, ignore_errors=True)
                log.info("removed de-identified copies left by a stopped dispatcher: %s", folder.name)

    def stop(self, timeout: float | None = None) -> None:
        """Stop the threads after their current batch (whose outcome is recorded)."""
        self._wakeup.stop()
        for thread in self._threads:
            thread.join(timeout)
        self._threads = []


# --- operator views and actions (`radgate deliveries`) ------------------------------------------


@dataclass(frozen=True)
class DeliveryInfo:
    """One delivery as an operator sees it (no file contents, no patient data: UIDs only)."""

    id: int
    job_id: int
    sop_instance_uid: str
    destination: str
    state: str
    attempts: int
    next_attempt_at: datetime | None
    last_error: str | None
    sent_at: datetime | None
    created_at: datetime


def list_deliveries(store: Store, state: str | None = None) -> list[DeliveryInfo]:
    """Every delivery (or those in ``state``), oldest first."""
    query = select(Delivery).order_by(Delivery.id)
    if state is not None:
        query = query.where(Delivery.state == state)
    with store.session() as s:
        return [
            DeliveryInfo(
                id=d.id,
                job_id=d.job_id,
                sop_instance_uid=d.sop_instance_uid,
                destination=d.destination,
                state=d.state,
                attempts=d.attempts,
                next_attempt_at=d.next_attempt_at,
                last_error=d.last_error,
                sent_at=d.sent_at,
                created_at=d.created_at,
            )
            for d in s.scalars(query)
        ]


def retry_deliveries(store: Store, ids: Sequence[int] = (), all_dead: bool = False) -> list[int]:
    """Queue DEAD deliveries again (PENDING, due now, attempts reset); returns the ids re-queued.

    Only DEAD rows move: a PENDING, SENDING or SENT row named by id is left as it is. last_error
    is kept until the next attempt replaces it, so the operator still sees why it died.
    """
    now = utcnow()
    with store.session() as s:
        query = select(Delivery.id).where(Delivery.state == DeliveryState.DEAD)
        if not all_dead:
            query = query.where(Delivery.id.in_(list(ids)))
        chosen = list(s.scalars(query.order_by(Delivery.id)))
        if chosen:
            s.execute(
                update(Delivery)
                .where(Delivery.id.in_(chosen))
                .values(state=DeliveryState.PENDING, attempts=0, next_attempt_at=now, updated_at=now)
            )
    if chosen:
        log.info("re-queued %d dead deliveries: %s", len(chosen), ", ".join(map(str, chosen)))
    return chosen
