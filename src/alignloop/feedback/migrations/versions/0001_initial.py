"""The labelling store: projects, sets, completions, labellers, admins, assignments, labels.

Revision ID: 0001
Revises:
Create Date: 2025-01-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "projects",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(200), nullable=False, unique=True),
        sa.Column("criterion", sa.String(200), nullable=False),
        sa.Column("instructions", sa.Text, nullable=False),
        sa.Column("mode", sa.String(10), nullable=False),
        sa.Column("per_set", sa.Integer, nullable=False),
        sa.Column("created_at", TS, nullable=False),
    )
    op.create_table(
        "sets",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("project_id", sa.Integer, sa.ForeignKey("projects.id"), nullable=False),
        sa.Column("set_id", sa.String(300), nullable=False),
        sa.Column("prompt", sa.Text, nullable=False),
        sa.Column("model", sa.String(300), nullable=False),
        sa.Column("extra", sa.JSON, nullable=False),
        sa.Column("n_assigned", sa.Integer, nullable=False),
        sa.Column("n_done", sa.Integer, nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.UniqueConstraint("project_id", "set_id", name="uq_sets_project_set"),
    )
    op.create_index("ix_sets_project_load", "sets", ["project_id", "n_assigned", "id"])
    op.create_table(
        "completions",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("set_pk", sa.Integer, sa.ForeignKey("sets.id"), nullable=False),
        sa.Column("cid", sa.String(300), nullable=False),
        sa.Column("position", sa.Integer, nullable=False),
        sa.Column("text", sa.Text, nullable=False),
        sa.UniqueConstraint("set_pk", "cid", name="uq_completions_set_cid"),
    )
    op.create_index("ix_completions_set_pk", "completions", ["set_pk"])
    op.create_table(
        "labellers",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(200), nullable=False, unique=True),
        sa.Column("project_id", sa.Integer, sa.ForeignKey("projects.id"), nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("revoked", sa.Boolean, nullable=False),
        sa.Column("acknowledged_at", TS, nullable=True),
        sa.Column("created_at", TS, nullable=False),
    )
    op.create_table(
        "admins",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(200), nullable=False, unique=True),
        sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("revoked", sa.Boolean, nullable=False),
        sa.Column("created_at", TS, nullable=False),
    )
    op.create_table(
        "assignments",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("set_pk", sa.Integer, sa.ForeignKey("sets.id"), nullable=False),
        sa.Column("labeller_id", sa.Integer, sa.ForeignKey("labellers.id"), nullable=False),
        sa.Column("status", sa.String(10), nullable=False),
        sa.Column("skip_reason", sa.Text, nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("closed_at", TS, nullable=True),
        sa.UniqueConstraint("set_pk", "labeller_id", name="uq_assignments_set_labeller"),
    )
    op.create_index("ix_assignments_labeller_status", "assignments", ["labeller_id", "status"])
    op.create_table(
        "labels",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("submission_id", sa.String(100), nullable=False, unique=True),
        sa.Column("assignment_id", sa.Integer, sa.ForeignKey("assignments.id"), nullable=False, unique=True),
        sa.Column("set_pk", sa.Integer, sa.ForeignKey("sets.id"), nullable=False),
        sa.Column("labeller_id", sa.Integer, sa.ForeignKey("labellers.id"), nullable=False),
        sa.Column("ranks", sa.JSON, nullable=False),
        sa.Column("thumbs", sa.JSON, nullable=False),
        sa.Column("has_tie", sa.Boolean, nullable=False),
        sa.Column("created_at", TS, nullable=False),
    )
    op.create_index("ix_labels_set_pk", "labels", ["set_pk"])
    op.create_index("ix_labels_labeller_id", "labels", ["labeller_id"])


def downgrade() -> None:
    for name in ("labels", "assignments", "admins", "labellers", "completions", "sets", "projects"):
        op.drop_table(name)
