"""Scheduled re-compression of registry models.

A scheduler tick (Celery beat in production, the embedded worker's beat locally) fires each due
entry: it resolves the model's current revision and enqueues a job only when the revision or the
job options changed since the last enqueued run, or that run's job failed; otherwise it records a
skipped run.

Two schedulers never fire the same slot: the firing is a compare-and-set on `next_run_at`. Two
firings of one entry (a tick and a manual run) are serialised by taking the entry's row lock first,
and no job is enqueued while one for the same entry, revision and options is queued or running.
"""

from __future__ import annotations

import hashlib
import json
import logging
from datetime import datetime, timedelta

from croniter import croniter
from sqlalchemy import func, select, update

from worker.engine.errors import InputError
from worker.engine.spec import parse_source, resolve_revision

from . import jobs
from .auth import may_use_hub_token
from .db import session_scope
from .models import FAILED, QUEUED, RUNNING, Job, RegistryEntry, RegistryRun, Tenant, utcnow
from .settings import get_settings

log = logging.getLogger("mixq.registry")


def next_run(schedule: dict, after: datetime) -> datetime:
    if "cron" in schedule:
        return croniter(schedule["cron"], after).get_next(datetime)
    return after + timedelta(seconds=schedule["interval_seconds"])


class EntryGone(LookupError):
    """The entry was deleted between reading it and firing it."""


class EntryQuotaExceeded(ValueError):
    """The tenant already has as many registry entries as it may (MIXQ_MAX_REGISTRY_ENTRIES_PER_TENANT)."""


def check_entry_quota(session, tenant_id: int) -> None:
    """Refuse a new entry for a tenant at its limit; the tenant's row lock makes the count and the insert
    atomic, as for jobs."""
    limit = get_settings().max_registry_entries_per_tenant
    session.execute(update(Tenant).where(Tenant.id == tenant_id).values(name=Tenant.name))
    entries = session.scalar(select(func.count()).select_from(RegistryEntry).where(RegistryEntry.tenant_id == tenant_id))
    if entries >= limit:
        raise EntryQuotaExceeded(f"this tenant already has {entries} registry entries, the most it may have "
                                 "(MIXQ_MAX_REGISTRY_ENTRIES_PER_TENANT): delete some first")


def options_hash(request: dict) -> str:
    """Everything but the model decides whether a re-compression is needed when the revision is unchanged."""
    options = {k: v for k, v in request.items() if k != "model"}
    return hashlib.sha256(json.dumps(options, sort_keys=True).encode()).hexdigest()


def current_revision(entry: RegistryEntry, hub_token: bool = False) -> tuple[str | None, str | None]:
    """The model's revision now, or why it could not be resolved. Resolved before any lock is taken:
    a Hub lookup or hashing a large folder can take a while. `hub_token`: auth.may_use_hub_token."""
    try:
        settings = get_settings()
        return resolve_revision(parse_source(entry.model), settings.model_root, settings.hub_timeout_seconds,
                                hub_token), None
    except InputError as exc:
        return None, str(exc)


def fire(session, entry: RegistryEntry, now: datetime, trigger: str, revision: tuple[str | None, str | None],
         force: bool = False) -> tuple[RegistryRun, Job | None]:
    """Decide and record one firing inside the caller's transaction; the caller publishes the job after
    commit. `revision` is `current_revision(entry)`, resolved before the transaction."""
    # Take the entry's row lock (PostgreSQL) / the write lock (SQLite) before reading anything; a DELETE that
    # committed first leaves nothing to lock, and nothing to record a run against.
    locked = session.execute(update(RegistryEntry).where(RegistryEntry.id == entry.id).values(updated_at=now))
    if locked.rowcount != 1:
        raise EntryGone(entry.id)
    digest = options_hash(entry.request)
    run = RegistryRun(entry_id=entry.id, fired_at=now, trigger=trigger, options_hash=digest, outcome="skipped")
    session.add(run)
    run.revision, error = revision
    if error is not None:
        run.outcome, run.reason = "error", error
        return run, None
    try:
        jobs.check_quota(session, entry.tenant_id)
    except jobs.QuotaExceeded as exc:
        run.reason = str(exc)
        return run, None
    active = session.scalar(select(Job).join(RegistryRun, RegistryRun.job_id == Job.id).where(
        RegistryRun.entry_id == entry.id, RegistryRun.revision == run.revision, RegistryRun.options_hash == digest,
        Job.status.in_((QUEUED, RUNNING))))
    if active is not None:
        run.reason = f"job {active.id} for this revision is already {active.status}"
        return run, None
    last = session.scalar(select(RegistryRun).where(RegistryRun.entry_id == entry.id,
                                                    RegistryRun.outcome == "enqueued").order_by(RegistryRun.id.desc()))
    unchanged = last is not None and last.revision == run.revision and last.options_hash == digest
    retry = unchanged and last.job is not None and last.job.status == FAILED
    if unchanged and not (force or retry):
        run.reason = "revision and options unchanged since the last run"
        return run, None
    job = jobs.new(session, entry.tenant_id, {**entry.request, "webhook_url": entry.webhook_url},
                   registry_entry_id=entry.id, message="queued by the registry")
    session.flush()
    run.job_id, run.outcome = job.id, "enqueued"
    run.reason = ("forced" if force and unchanged else "the last job failed: trying again" if retry else
                  "first run" if last is None else "new revision" if last.revision != run.revision else
                  "options changed")
    return run, job


def tick(now: datetime | None = None) -> list[int]:
    """Fire due, unpaused entries once each, the oldest due first and at most `registry_tick_batch` of them (the
    rest fire on the next tick); returns the ids of the runs recorded. One entry's failure is recorded on that
    entry and never stops the others."""
    now = now or utcnow()
    with session_scope() as session:
        due = session.execute(select(RegistryEntry.id, RegistryEntry.next_run_at).where(
            RegistryEntry.paused.is_(False), RegistryEntry.next_run_at <= now).order_by(
            RegistryEntry.next_run_at).limit(get_settings().registry_tick_batch)).all()
    recorded = []
    for entry_id, slot in due:
        try:
            run_id = _fire_due(entry_id, slot, now)
        except Exception as exc:
            log.exception("registry entry %s could not fire", entry_id)
            run_id = _failed(entry_id, now, exc)
        if run_id is not None:
            recorded.append(run_id)
    return recorded


def _fire_due(entry_id: str, slot: datetime, now: datetime) -> int | None:
    with session_scope() as session:
        entry = session.get(RegistryEntry, entry_id)
        if entry is None:  # deleted since the due query
            return None
        claimed = session.execute(update(RegistryEntry).where(
            RegistryEntry.id == entry_id, RegistryEntry.next_run_at == slot).values(
            next_run_at=next_run(entry.schedule, now))).rowcount
        if claimed != 1:  # another scheduler fired this slot
            return None
    # The slot is ours; the revision is resolved with no lock held, then the firing decided under one.
    with session_scope() as session:
        entry = session.get(RegistryEntry, entry_id)
        if entry is None:
            return None
        revision = current_revision(entry, may_use_hub_token(session, entry.tenant_id))
    with session_scope() as session:
        entry = session.get(RegistryEntry, entry_id)
        if entry is None:
            return None
        try:
            run, job = fire(session, entry, now, "schedule", revision)
        except EntryGone:
            return None
        session.flush()
        run_id, job_id, priority = run.id, job and job.id, job and job.priority
    if job_id:
        jobs.publish(job_id, priority)
    log.info("registry entry %s fired: run %s", entry_id, run_id)
    return run_id


def _failed(entry_id: str, now: datetime, exc: Exception) -> int | None:
    """Record why an entry could not fire, and pause it: its schedule would fail again on every tick (a cron
    with no slot left does)."""
    reason = (f"the entry could not fire and is paused until it is fixed: {type(exc).__name__}: {str(exc)[:200]}")
    with session_scope() as session:
        entry = session.get(RegistryEntry, entry_id)
        if entry is None:
            return None
        entry.paused = True
        run = RegistryRun(entry_id=entry_id, fired_at=now, trigger="schedule", options_hash=options_hash(entry.request),
                          outcome="error", reason=reason)
        session.add(run)
        session.flush()
        return run.id
