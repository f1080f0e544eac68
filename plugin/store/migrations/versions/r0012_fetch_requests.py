"""Fetch requests: studies to pull from a configured source (`plugin.fetch`), worked by the node.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from plugin.store.models import UTCDateTime

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "fetch_requests",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("source", sa.String(64), nullable=False),
        sa.Column("study_uid", sa.String(64), nullable=True),
        sa.Column("accession", sa.String(16), nullable=True),
        sa.Column("series_uids", sa.JSON(), nullable=True),
        sa.Column("pipeline", sa.String(64), nullable=True),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", UTCDateTime(), nullable=True),
        sa.Column("lease_owner", sa.String(100), nullable=True),
        sa.Column("lease_expires_at", UTCDateTime(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("instances", sa.Integer(), nullable=True),
        sa.Column("jobs", sa.JSON(), nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.Column("retrieved_at", UTCDateTime(), nullable=True),
        sa.Column("finished_at", UTCDateTime(), nullable=True),
    )
    op.create_index("ix_fetch_requests_state_next", "fetch_requests", ["state", "next_attempt_at"])
    op.create_index("ix_fetch_requests_study_uid", "fetch_requests", ["study_uid"])


def downgrade() -> None:
    op.drop_index("ix_fetch_requests_study_uid", table_name="fetch_requests")
    op.drop_index("ix_fetch_requests_state_next", table_name="fetch_requests")
    op.drop_table("fetch_requests")
