"""Jobs: what routing decided (series, rule, destinations) and how long each step of a run took.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("series_uid", sa.String(64), nullable=True))
        batch.add_column(sa.Column("rule", sa.String(64), nullable=True))
        batch.add_column(sa.Column("destinations", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("timings", sa.JSON(), nullable=True))
        batch.create_index("ix_jobs_series_uid", ["series_uid"])


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_index("ix_jobs_series_uid")
        batch.drop_column("timings")
        batch.drop_column("destinations")
        batch.drop_column("rule")
        batch.drop_column("series_uid")
