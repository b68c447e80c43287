"""Assignment leases: an open assignment holds its set until ``expires_at``, then goes back to the pool.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # NULL: an assignment made before leases existed (it never expires; 'label release' frees it)
    op.add_column("assignments", sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True))
    op.create_index("ix_assignments_status_expiry", "assignments", ["status", "expires_at"])


def downgrade() -> None:
    op.drop_index("ix_assignments_status_expiry", table_name="assignments")
    with op.batch_alter_table("assignments") as batch:
        batch.drop_column("expires_at")
