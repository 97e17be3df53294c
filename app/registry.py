"""Scheduled re-compression of registry models.

A scheduler tick (Celery beat in production, the embedded worker's beat locally) fires each due
entry: it resolves the model's current revision and enqueues a job only when the revision or the
job options changed since the last enqueued run; otherwise it records a skipped run.

Two schedulers never fire the same slot: the firing is a compare-and-set on `next_run_at`. Two
firings of one entry (a tick and a manual run) are serialised by taking the entry's row lock first,
and no job is enqueued while one for the same entry, revision and options is queued or running.
"""

from __future__ import annotations

import hashlib
import json
import logging
from datetime import datetime, timedelta, timezone

from croniter import croniter
from sqlalchemy import select, update

from .db import session_scope
from .models import QUEUED, RUNNING, SUCCEEDED, Job, RegistryEntry, RegistryRun, utcnow
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


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)  # SQLite returns naive UTC


def fire(session, entry: RegistryEntry, now: datetime, trigger: str, force: bool = False) -> tuple[RegistryRun, Job | None]:
    """Decide and record one firing inside the caller's transaction; the caller enqueues the job after commit."""
    from worker.engine.errors import InputError
    from worker.engine.sources import parse_source, resolve_revision

    # Take the entry's row lock (PostgreSQL) / the write lock (SQLite) before reading anything.
    session.execute(update(RegistryEntry).where(RegistryEntry.id == entry.id).values(updated_at=now))
    digest = options_hash(entry.request)
    run = RegistryRun(entry_id=entry.id, fired_at=now, trigger=trigger, options_hash=digest, outcome="skipped")
    session.add(run)
    try:
        run.revision = resolve_revision(parse_source(entry.model), get_settings().model_root)
    except InputError as exc:
        run.outcome, run.reason = "error", str(exc)
        return run, None
    active = session.scalar(select(Job).join(RegistryRun, RegistryRun.job_id == Job.id).where(
        RegistryRun.entry_id == entry.id, RegistryRun.revision == run.revision, RegistryRun.options_hash == digest,
        Job.status.in_((QUEUED, RUNNING))))
    if active is not None:
        run.reason = f"job {active.id} for this revision is already {active.status}"
        return run, None
    last = session.scalar(select(RegistryRun).where(RegistryRun.entry_id == entry.id,
                                                    RegistryRun.outcome == "enqueued").order_by(RegistryRun.id.desc()))
    if not force and last is not None and last.revision == run.revision and last.options_hash == digest:
        run.reason = "revision and options unchanged since the last run"
        return run, None
    job = Job(tenant_id=entry.tenant_id, model=entry.model, request=entry.request, priority=entry.request["priority"],
              registry_entry_id=entry.id, webhook_url=entry.webhook_url, phases={}, message="queued by the registry")
    session.add(job)
    session.flush()
    run.job_id, run.outcome = job.id, "enqueued"
    run.reason = "forced" if force and last and last.revision == run.revision else (
        "first run" if last is None else "new revision" if last.revision != run.revision else "options changed")
    return run, job


def tick(now: datetime | None = None) -> list[int]:
    """Fire every due, unpaused entry once; returns the ids of the runs recorded."""
    from worker.tasks import enqueue

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
            run, job = fire(session, entry, now, "schedule")
            session.flush()
            run_id, job_id, priority = run.id, job and job.id, job and job.priority
        if job_id:
            enqueue(job_id, priority)
        recorded.append(run_id)
        log.info("registry entry %s fired: run %s", entry_id, run_id)
    return recorded


def history(session, entry: RegistryEntry) -> list[dict]:
    """Runs in order, with each successful run's deltas to the previous successful one."""
    rows, previous = [], None
    for run in entry.runs:
        job = run.job
        row = {"run_id": run.id, "fired_at": run.fired_at, "trigger": run.trigger, "revision": run.revision,
               "outcome": run.outcome, "reason": run.reason, "job_id": run.job_id,
               "job_status": job.status if job else None, "final_metric": None, "latency_ms": None,
               "latency_reduction": None, "delta_metric": None, "delta_reduction": None, "regression": False}
        if job is not None and job.status == SUCCEEDED:
            row.update(final_metric=job.final_metric, latency_reduction=job.latency_reduction,
                       latency_ms=job.report["final"]["latency_ms"]["median"])
            if previous is not None:
                row["delta_metric"] = job.final_metric - previous.final_metric
                row["delta_reduction"] = job.latency_reduction - previous.latency_reduction
                drop = -row["delta_metric"] / abs(previous.final_metric) if previous.final_metric else 0.0
                row["regression"] = (row["delta_reduction"] < -entry.regression_threshold
                                     or drop > entry.regression_threshold)
            previous = job
        rows.append(row)
    return rows


def after_job(job_id: str) -> None:
    """Called by the runner when a job ends: notify its webhook, and the entry's on a regression."""
    from . import webhooks

    with session_scope() as session:
        job = session.get(Job, job_id)
        summary = {"job_id": job.id, "model": job.model, "status": job.status, "error": job.error,
                   "revision": job.revision, "final_metric": job.final_metric,
                   "latency_reduction": job.latency_reduction, "registry_entry_id": job.registry_entry_id}
        regression = None
        if job.registry_entry_id and job.status == SUCCEEDED:
            entry = session.get(RegistryEntry, job.registry_entry_id)
            latest = next((row for row in reversed(history(session, entry)) if row["job_id"] == job.id), None)
            if latest and latest["regression"]:
                regression = {**summary, "delta_metric": latest["delta_metric"],
                              "delta_reduction": latest["delta_reduction"],
                              "threshold": entry.regression_threshold}
        url = job.webhook_url
    webhooks.send(url, f"job.{summary['status']}", summary)
    if regression:
        webhooks.send(url, "registry.regression", regression)
