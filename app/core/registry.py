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
from sqlalchemy import select, update

from worker.engine.errors import InputError
from worker.engine.spec import parse_source, resolve_revision

from . import jobs
from .db import session_scope
from .models import FAILED, QUEUED, RUNNING, Job, RegistryEntry, RegistryRun, utcnow
from .settings import get_settings

log = logging.getLogger("mixq.registry")


def next_run(schedule: dict, after: datetime) -> datetime:
    if "cron" in schedule:
        return croniter(schedule["cron"], after).get_next(datetime)
    return after + timedelta(seconds=schedule["interval_seconds"])


def options_hash(request: dict) -> str:
    """Everything but the model decides whether a re-compression is needed when the revision is unchanged."""
    options = {k: v for k, v in request.items() if k != "model"}
    return hashlib.sha256(json.dumps(options, sort_keys=True).encode()).hexdigest()


def current_revision(entry: RegistryEntry) -> tuple[str | None, str | None]:
    """The model's revision now, or why it could not be resolved. Resolved before any lock is taken:
    a Hub lookup or hashing a large folder can take a while."""
    try:
        settings = get_settings()
        return resolve_revision(parse_source(entry.model), settings.model_root, settings.hub_timeout_seconds), None
    except InputError as exc:
        return None, str(exc)


def fire(session, entry: RegistryEntry, now: datetime, trigger: str, revision: tuple[str | None, str | None],
         force: bool = False) -> tuple[RegistryRun, Job | None]:
    """Decide and record one firing inside the caller's transaction; the caller publishes the job after
    commit. `revision` is `current_revision(entry)`, resolved before the transaction."""
    # Take the entry's row lock (PostgreSQL) / the write lock (SQLite) before reading anything.
    session.execute(update(RegistryEntry).where(RegistryEntry.id == entry.id).values(updated_at=now))
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
    """Fire every due, unpaused entry once; returns the ids of the runs recorded."""
    now = now or utcnow()
    with session_scope() as session:
        due = session.execute(select(RegistryEntry.id, RegistryEntry.next_run_at).where(
            RegistryEntry.paused.is_(False), RegistryEntry.next_run_at <= now)).all()
    recorded = []
    for entry_id, slot in due:
        with session_scope() as session:
            entry = session.get(RegistryEntry, entry_id)
            claimed = session.execute(update(RegistryEntry).where(
                RegistryEntry.id == entry_id, RegistryEntry.next_run_at == slot).values(
                next_run_at=next_run(entry.schedule, now))).rowcount
            if claimed != 1:  # another scheduler fired this slot
                continue
        # The slot is ours; the revision is resolved with no lock held, then the firing decided under one.
        with session_scope() as session:
            entry = session.get(RegistryEntry, entry_id)
            revision = current_revision(entry)
        with session_scope() as session:
            run, job = fire(session, session.get(RegistryEntry, entry_id), now, "schedule", revision)
            session.flush()
            run_id, job_id, priority = run.id, job and job.id, job and job.priority
        if job_id:
            jobs.publish(job_id, priority)
        recorded.append(run_id)
        log.info("registry entry %s fired: run %s", entry_id, run_id)
    return recorded
