"""Browser sessions: a login link is exchanged for a server-side session (see models.BrowserSession).

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "sessions",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("family", sa.String(64), nullable=False),
        sa.Column("labeller_id", sa.Integer, sa.ForeignKey("labellers.id"), nullable=True),
        sa.Column("admin_id", sa.Integer, sa.ForeignKey("admins.id"), nullable=True),
        sa.Column("csrf", sa.String(64), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("expires_at", TS, nullable=False),
    )
    op.create_index("ix_sessions_family", "sessions", ["family"])
    op.create_index("ix_sessions_labeller_id", "sessions", ["labeller_id"])
    op.create_index("ix_sessions_admin_id", "sessions", ["admin_id"])


def downgrade() -> None:
    op.drop_table("sessions")
