"""The web console: paused rules and destinations, and the study attributes its search looks at.

``paused`` holds one row per rule or destination an operator paused; resuming deletes it. The
studies get the Patient ID, Patient's Name and Study Date of their first instance (studies
received before this migration keep NULL there: the console shows them without).

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from plugin.store.db import UTCDateTime

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "paused",
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("paused_at", UTCDateTime(), nullable=False),
        sa.Column("paused_by", sa.String(100), nullable=True),
        sa.PrimaryKeyConstraint("kind", "name"),
    )
    op.add_column("studies", sa.Column("patient_id", sa.String(64), nullable=True))
    op.add_column("studies", sa.Column("patient_name", sa.String(324), nullable=True))
    op.add_column("studies", sa.Column("study_date", sa.String(8), nullable=True))
    op.create_index("ix_studies_patient_id", "studies", ["patient_id"])
    op.create_index("ix_studies_study_date", "studies", ["study_date"])
    op.create_index("ix_studies_accession_number", "studies", ["accession_number"])


def downgrade() -> None:
    op.drop_index("ix_studies_accession_number", table_name="studies")
    op.drop_index("ix_studies_study_date", table_name="studies")
    op.drop_index("ix_studies_patient_id", table_name="studies")
    for column in ("study_date", "patient_name", "patient_id"):
        op.drop_column("studies", column)
    op.drop_table("paused")
