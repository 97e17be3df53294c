"""Database models: tenants and their API keys, jobs and their artifacts, registry entries and their runs.

A job's results live in one place, its report (the engine's `Report`, stored as JSON); the API serves
its layers and search steps from there. Statuses and their transitions belong to `app.core.jobs`.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timezone

from sqlalchemy import JSON, BigInteger, Boolean, DateTime, Float, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

JSONType = JSON().with_variant(JSONB(), "postgresql")

# A job's statuses; the transitions between them are app.core.jobs.
QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "queued", "running", "succeeded", "failed", "cancelled"
STATUSES = (QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED)
FINISHED = (SUCCEEDED, FAILED, CANCELLED)


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    pass


class Tenant(Base):
    __tablename__ = "tenants"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ApiKey(Base):
    __tablename__ = "api_keys"
    id: Mapped[int] = mapped_column(primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    prefix: Mapped[str] = mapped_column(String(16))  # shown in listings; the key itself is never stored
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    tenant: Mapped[Tenant] = relationship()


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (UniqueConstraint("tenant_id", "idempotency_key", name="uq_jobs_tenant_idempotency"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=lambda: str(uuid.uuid4()))
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    model: Mapped[str] = mapped_column(String(300), index=True)
    request: Mapped[dict] = mapped_column(JSONType)  # the validated job request, as submitted
    idempotency_key: Mapped[str | None] = mapped_column(String(200))
    registry_entry_id: Mapped[str | None] = mapped_column(ForeignKey("registry_entries.id", ondelete="SET NULL"),
                                                         index=True)
    webhook_url: Mapped[str | None] = mapped_column(Text)
    revision: Mapped[str | None] = mapped_column(String(200))  # resolved when the job starts
    # Same model revision, data and sensitivity options -> same analysis: the warm-start lookup key.
    sensitivity_key: Mapped[str | None] = mapped_column(String(64), index=True)
    priority: Mapped[int] = mapped_column(Integer, default=5)

    status: Mapped[str] = mapped_column(String(16), index=True, default=QUEUED)
    # When the job's message last went to the broker; null until it has (the sweeper publishes those).
    enqueued_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # The first failed publish since the last successful one: the publish deadline counts from it.
    publish_failed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    phase: Mapped[str | None] = mapped_column(String(32))
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    step: Mapped[int | None] = mapped_column(Integer)
    steps: Mapped[int | None] = mapped_column(Integer)
    message: Mapped[str | None] = mapped_column(Text)
    error: Mapped[str | None] = mapped_column(Text)
    phases: Mapped[dict] = mapped_column(JSONType, default=dict)  # phase -> seconds, as they finish
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)

    attempts: Mapped[int] = mapped_column(Integer, default=0)
    worker: Mapped[str | None] = mapped_column(String(200))
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    report: Mapped[dict | None] = mapped_column(JSONType)
    result_status: Mapped[str | None] = mapped_column(String(32))  # compressed | no_speedup | none_fit | no_saving | float_cast
    baseline_metric: Mapped[float | None] = mapped_column(Float)
    final_metric: Mapped[float | None] = mapped_column(Float)
    latency_reduction: Mapped[float | None] = mapped_column(Float)

    artifacts: Mapped[list["Artifact"]] = relationship(cascade="all, delete-orphan")


class Artifact(Base):
    __tablename__ = "artifacts"
    __table_args__ = (UniqueConstraint("job_id", "kind"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(32))  # bundle (zip of everything), safetensors, onnx or gguf
    path: Mapped[str] = mapped_column(Text)
    size_bytes: Mapped[int] = mapped_column(BigInteger)  # bundles of large models pass 2 GiB
    sha256: Mapped[str] = mapped_column(String(64))


class RegistryEntry(Base):
    """A model watched for new revisions and re-compressed on a schedule."""

    __tablename__ = "registry_entries"
    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=lambda: str(uuid.uuid4()))
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    model: Mapped[str] = mapped_column(String(300))
    request: Mapped[dict] = mapped_column(JSONType)  # the job request each firing submits
    schedule: Mapped[dict] = mapped_column(JSONType)  # {"cron": "0 3 * * *"} or {"interval_seconds": 3600}
    paused: Mapped[bool] = mapped_column(Boolean, default=False)
    next_run_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    webhook_url: Mapped[str | None] = mapped_column(Text)
    regression_threshold: Mapped[float] = mapped_column(Float, default=0.01)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)
    runs: Mapped[list["RegistryRun"]] = relationship(cascade="all, delete-orphan", order_by="RegistryRun.id")


class RegistryRun(Base):
    """One firing of a registry entry: a job enqueued, or a skip with its reason."""

    __tablename__ = "registry_runs"
    id: Mapped[int] = mapped_column(primary_key=True)
    entry_id: Mapped[str] = mapped_column(ForeignKey("registry_entries.id", ondelete="CASCADE"), index=True)
    fired_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    trigger: Mapped[str] = mapped_column(String(16))  # schedule | manual
    revision: Mapped[str | None] = mapped_column(String(200))
    options_hash: Mapped[str] = mapped_column(String(64))
    outcome: Mapped[str] = mapped_column(String(16))  # enqueued | skipped | error
    reason: Mapped[str | None] = mapped_column(Text)
    job_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"))
    job: Mapped[Job | None] = relationship()
