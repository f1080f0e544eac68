"""Instances: no content hash. Hashing every received instance cost a third of a millisecond on the
path to the acknowledgement; a duplicate SOP Instance UID is now compared byte for byte instead.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("instances") as batch:
        batch.drop_column("sha256")


def downgrade() -> None:
    with op.batch_alter_table("instances") as batch:
        batch.add_column(sa.Column("sha256", sa.String(64), nullable=False, server_default="0" * 64))
