"""Rules and destinations an operator paused in the web console (migration 0008).

A paused rule is skipped with the reason "paused" when a study is routed
(`plugin.jobs.queue.rules_in_force`); a paused destination's deliveries wait, PENDING and
unclaimed, until it is resumed (`plugin.dispatch.outbox`). Resuming deletes the row.
"""

from __future__ import annotations

import enum
from datetime import datetime

from sqlalchemy import String, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Mapped, Session, mapped_column

from plugin.store.db import Base, Store, UTCDateTime, utcnow


class PauseKind(enum.StrEnum):
    RULE = "rule"
    DESTINATION = "destination"


class Paused(Base):
    """A routing rule or a destination an operator paused, since when and by whom."""

    __tablename__ = "paused"

    kind: Mapped[str] = mapped_column(String(16), primary_key=True)
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    paused_at: Mapped[datetime] = mapped_column(UTCDateTime())
    paused_by: Mapped[str | None] = mapped_column(String(100))


def paused_names(session: Session, kind: PauseKind) -> frozenset[str]:
    """The names of the rules (or destinations) paused now."""
    return frozenset(session.scalars(select(Paused.name).where(Paused.kind == kind)))


def set_paused(store: Store, kind: PauseKind, name: str, paused: bool, actor: str | None = None) -> bool:
    """Pause (or resume) a rule or destination; whether that changed anything (False: it already was)."""
    try:
        with store.session() as s:
            row = s.get(Paused, (str(kind), name), with_for_update=True)
            if paused == (row is not None):
                return False
            if row is None:
                s.add(Paused(kind=str(kind), name=name, paused_at=utcnow(), paused_by=actor))
            else:
                s.delete(row)
    except IntegrityError:  # another operator paused it at the same moment
        return False
    return True
