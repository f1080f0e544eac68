"""Pseudonyms: the replacement values of de-identified exports (patients, UIDs), per pseudonym domain.

Originals are stored as keyed hashes only (see `plugin.dispatch.pseudonyms`).

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from plugin.store.models import UTCDateTime

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "pseudonyms",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("domain", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("original_hash", sa.String(64), nullable=False),
        sa.Column("pseudonym", sa.String(64), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.UniqueConstraint("domain", "kind", "original_hash"),
    )


def downgrade() -> None:
    op.drop_table("pseudonyms")
