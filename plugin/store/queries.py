"""Read-side queries of the job store: what the completion monitor, the CLI and the reports read.

Counts and last-received times are derived from the instances rows here, when read, never kept as
counters on the recording path.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from plugin.store.models import Instance, Series, Study


@dataclass(frozen=True)
class StudySummary:
    study_uid: str
    accession_number: str | None
    revision: int
    state: str
    instance_count: int
    series_count: int
    first_received_at: datetime
    last_received_at: datetime
    completed_at: datetime | None


def instance_counts(session: Session, study_ids: Sequence[int]) -> dict[int, int]:
    """How many instances each study has (every revision); studies without any are left out."""
    rows = session.execute(
        select(Instance.study_id, func.count())
        .where(Instance.study_id.in_(study_ids))
        .group_by(Instance.study_id)
    )
    return {study_id: int(n) for study_id, n in rows}


def last_instance_of_revision() -> Any:
    """A scalar subquery, correlated to ``Study``: when the latest instance of the study's current
    revision was received (NULL if it has none)."""
    return (
        select(func.max(Instance.received_at))
        .where(Instance.study_id == Study.id, Instance.study_revision == Study.revision)
        .correlate(Study)
        .scalar_subquery()
    )


def latest(*times: datetime | None) -> datetime:
    """The latest of the times given that are not None (at least one must be)."""
    return max(t for t in times if t is not None)


def recorded_paths(session: Session, study_uid: str) -> set[str]:
    """The spool paths (relative to the spool directory) of every recorded instance of the study."""
    rows = session.scalars(
        select(Instance.spool_path)
        .join(Study, Study.id == Instance.study_id)
        .where(Study.study_uid == study_uid)
    )
    return set(rows)


def study_summaries(session: Session) -> list[StudySummary]:
    """Every study, the one received from last (instance or duplicate) last."""
    instances = (
        select(
            Instance.study_id,
            func.count(Instance.id).label("n"),
            func.max(Instance.received_at).label("last"),
        )
        .group_by(Instance.study_id)
        .subquery()
    )
    series_count = (
        select(Series.study_id, func.count(Series.id).label("n")).group_by(Series.study_id).subquery()
    )
    rows = session.execute(
        select(Study, func.coalesce(instances.c.n, 0), instances.c.last, func.coalesce(series_count.c.n, 0))
        .outerjoin(instances, instances.c.study_id == Study.id)
        .outerjoin(series_count, series_count.c.study_id == Study.id)
    ).all()
    summaries = [
        StudySummary(
            study_uid=st.study_uid,
            accession_number=st.accession_number,
            revision=st.revision,
            state=st.state,
            instance_count=int(n),
            series_count=int(n_series),
            first_received_at=st.first_received_at,
            last_received_at=latest(st.revision_started_at, last, st.resent_at),
            completed_at=st.completed_at,
        )
        for st, n, last, n_series in rows
    ]
    return sorted(summaries, key=lambda summary: summary.last_received_at)
