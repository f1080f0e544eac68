"""Indexes on the times work finished (studies completed, jobs finished, deliveries sent), so that
``/metrics`` reads only what finished since its last scrape (plugin/web/metrics.py).

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-06
"""

from __future__ import annotations

from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

_INDEXES = (
    ("ix_studies_completed_at", "studies", "completed_at"),
    ("ix_jobs_finished_at", "jobs", "finished_at"),
    ("ix_deliveries_sent_at", "deliveries", "sent_at"),
)


def upgrade() -> None:
    for name, table, column in _INDEXES:
        op.create_index(name, table, [column])


def downgrade() -> None:
    for name, table, _column in _INDEXES:
        op.drop_index(name, table_name=table)
