"""Studies and series: no counters. Instance counts and last-received times are read from the
instances rows (indexed by study, revision and receive time), so recording an instance is one
INSERT; ``studies.resent_at`` keeps the one time no instance row holds, a duplicate's.

The columns are dropped with SQLite's own ``ALTER TABLE ... DROP COLUMN`` (SQLite 3.35 or later),
not batch mode: batch mode copies and drops the table, which other tables' foreign keys refer to.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from plugin.store.models import UTCDateTime

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("studies", sa.Column("resent_at", UTCDateTime(), nullable=True))
    # the counters' time covers duplicates too: a study still receiving keeps its quiet period
    op.execute("UPDATE studies SET resent_at = last_received_at")
    for table in ("studies", "series"):
        op.drop_column(table, "instance_count")
        op.drop_column(table, "last_received_at")
    op.drop_index("ix_instances_study_id", table_name="instances")
    op.create_index("ix_instances_study_revision", "instances", ["study_id", "study_revision", "received_at"])
    op.create_index("ix_receptions_study_revision", "receptions", ["study_id", "study_revision"])


def downgrade() -> None:
    op.drop_index("ix_receptions_study_revision", table_name="receptions")
    op.drop_index("ix_instances_study_revision", table_name="instances")
    op.create_index("ix_instances_study_id", "instances", ["study_id"])
    for table, key in (("studies", "study_id"), ("series", "series_id")):
        op.add_column(table, sa.Column("instance_count", sa.Integer(), nullable=False, server_default="0"))
        op.add_column(table, sa.Column("last_received_at", UTCDateTime(), nullable=True))
        op.execute(
            f"UPDATE {table} SET instance_count = (SELECT count(*) FROM instances "
            f"WHERE instances.{key} = {table}.id), last_received_at = (SELECT max(received_at) "
            f"FROM instances WHERE instances.{key} = {table}.id)"
        )
        op.execute(f"UPDATE {table} SET last_received_at = first_received_at WHERE last_received_at IS NULL")
    op.execute(
        "UPDATE studies SET last_received_at = resent_at "
        "WHERE resent_at IS NOT NULL AND resent_at > last_received_at"
    )
    op.drop_column("studies", "resent_at")
