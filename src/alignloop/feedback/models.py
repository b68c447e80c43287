"""The labelling store's tables (SQLAlchemy 2). Alembic migrations in ``migrations/`` create them.

One project holds completion sets; each set has K completions; a labeller works in one
project; an assignment reserves one set for one labeller (at most ``per_set`` per set) until its
lease expires; a label is one submitted ranking (or thumbs), unique per assignment and per
client-made submission id, so a retried or double-clicked submission is stored once.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    pass


class Project(Base):
    __tablename__ = "projects"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    criterion: Mapped[str] = mapped_column(String(200))
    instructions: Mapped[str] = mapped_column(Text)
    mode: Mapped[str] = mapped_column(String(10))  # "rank" | "thumbs"
    per_set: Mapped[int] = mapped_column(Integer)  # k: labellers each set needs
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class CompletionSetRow(Base):
    __tablename__ = "sets"
    __table_args__ = (
        UniqueConstraint("project_id", "set_id", name="uq_sets_project_set"),
        Index("ix_sets_project_load", "project_id", "n_assigned", "id"),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id"))
    set_id: Mapped[str] = mapped_column(String(300))  # the record's prompt_id
    prompt: Mapped[str] = mapped_column(Text)
    model: Mapped[str] = mapped_column(String(300), default="")
    extra: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)  # sampling and other fields
    n_assigned: Mapped[int] = mapped_column(Integer, default=0)  # open + done assignments (<= per_set)
    n_done: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class CompletionRow(Base):
    __tablename__ = "completions"
    __table_args__ = (UniqueConstraint("set_pk", "cid", name="uq_completions_set_cid"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    set_pk: Mapped[int] = mapped_column(ForeignKey("sets.id"), index=True)
    cid: Mapped[str] = mapped_column(String(300))
    position: Mapped[int] = mapped_column(Integer)
    text: Mapped[str] = mapped_column(Text)


class Labeller(Base):
    __tablename__ = "labellers"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id"))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)  # sha256 hex of the secret token
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)
    acknowledged_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Admin(Base):
    __tablename__ = "admins"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Assignment(Base):
    __tablename__ = "assignments"
    __table_args__ = (
        UniqueConstraint("set_pk", "labeller_id", name="uq_assignments_set_labeller"),
        Index("ix_assignments_labeller_status", "labeller_id", "status"),
        Index("ix_assignments_status_expiry", "status", "expires_at"),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    set_pk: Mapped[int] = mapped_column(ForeignKey("sets.id"))
    labeller_id: Mapped[int] = mapped_column(ForeignKey("labellers.id"))
    # "open" | "done" | "skipped" | "released" (the lease expired, the labeller was revoked, or an
    # admin released it: the slot went back to the pool; a late submission is still taken if the
    # set has room)
    status: Mapped[str] = mapped_column(String(10))
    skip_reason: Mapped[str | None] = mapped_column(Text, nullable=True)  # why skipped or released
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    closed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)  # the lease


class Label(Base):
    __tablename__ = "labels"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    submission_id: Mapped[str] = mapped_column(String(100), unique=True)  # made by the client
    assignment_id: Mapped[int] = mapped_column(ForeignKey("assignments.id"), unique=True)
    set_pk: Mapped[int] = mapped_column(ForeignKey("sets.id"), index=True)
    labeller_id: Mapped[int] = mapped_column(ForeignKey("labellers.id"), index=True)
    ranks: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)  # {cid: int | "F"}
    thumbs: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)  # {cid: "up" | "down"}
    has_tie: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class BrowserSession(Base):
    """A browser's login: made when a login link is exchanged (by POST), never the link itself.

    The cookie holds a random secret; only its sha256 is stored. A session belongs to one
    labeller or one admin, expires at ``expires_at``, and is replaced by a fresh one (same
    ``family``) as it is used; logout ends the family, revoking a login ends all of its
    sessions. ``csrf`` is the family's CSRF token (it survives rotation, so open pages keep working).
    """

    __tablename__ = "sessions"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    family: Mapped[str] = mapped_column(String(64), index=True)
    labeller_id: Mapped[int | None] = mapped_column(ForeignKey("labellers.id"), nullable=True, index=True)
    admin_id: Mapped[int | None] = mapped_column(ForeignKey("admins.id"), nullable=True, index=True)
    csrf: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
