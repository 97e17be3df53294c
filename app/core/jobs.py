"""A job's life in one place: every status change goes through these functions.

    queued --claim--> running --finish--> succeeded
      |                 |  |--fail----> failed
      |                 |  '--cancel--> cancelled   (at the worker's next step boundary)
      |--cancel-------> cancelled                   (at once: no worker has it)
      '--fail---------> failed                      (it cannot be run, or was tried max_attempts times)
    running --requeue (heartbeat stale)--> queued
    running, heartbeat stale, cancel requested --> cancelled

Exactly once without trusting the broker: `claim` is a conditional UPDATE (only a queued job, or a
running one whose heartbeat is stale, can be taken), and a worker writes progress and results only while
it still holds the claim. The jobs table is also the outbox: a job is stored first and its message
published after (`publish`); the sweeper publishes whatever was not. Every terminal transition notifies
(webhooks, registry regressions) exactly once, through `notify_ended`.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from sqlalchemy import func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from . import notifications, queue
from .db import session_scope
from .models import CANCELLED, FAILED, FINISHED, QUEUED, RUNNING, SUCCEEDED, Artifact, Job, Tenant, utcnow
from .settings import Settings, get_settings

log = logging.getLogger("mixq.jobs")


class IdempotencyConflict(ValueError):
    """The Idempotency-Key was used before with a different request."""


class QuotaExceeded(ValueError):
    """The tenant already has as many queued and running jobs as it may (MIXQ_MAX_ACTIVE_JOBS_PER_TENANT)."""


def check_quota(session: Session, tenant_id: int, settings: Settings | None = None, lock: bool = True) -> None:
    """Refuse a new job for a tenant at its limit. Takes the tenant's row lock first (PostgreSQL; the write
    lock on SQLite) and holds it to the end of the caller's transaction, so concurrent submissions are counted
    one after another: the count and the insert that follows are atomic. `lock=False` only looks (an early
    answer before slow work; the insert must check again with the lock)."""
    settings = settings or get_settings()
    if lock:
        session.execute(update(Tenant).where(Tenant.id == tenant_id).values(name=Tenant.name))
    active = session.scalar(select(func.count()).select_from(Job).where(Job.tenant_id == tenant_id,
                                                                        Job.status.in_((QUEUED, RUNNING))))
    if active >= settings.max_active_jobs_per_tenant:
        raise QuotaExceeded(f"this tenant already has {active} queued or running jobs, the most it may have: "
                            "retry once some have finished, or cancel some")


def new(session: Session, tenant_id: int, request: dict, idempotency_key: str | None = None,
        registry_entry_id: str | None = None, message: str = "queued") -> Job:
    """A queued job in the caller's transaction; the caller commits, then publishes it (`publish`)."""
    # Marked published up front (one write per submission): a failed publish clears the mark, and a process
    # that dies in between leaves a job the sweeper publishes again once it has waited unclaimed too long.
    job = Job(tenant_id=tenant_id, model=request["model"], request=request, idempotency_key=idempotency_key,
              priority=request["priority"], webhook_url=request.get("webhook_url"),
              registry_entry_id=registry_entry_id, status=QUEUED, phases={}, message=message, enqueued_at=utcnow())
    session.add(job)
    return job


def submit(session: Session, tenant_id: int, request: dict, idempotency_key: str | None = None
           ) -> tuple[Job, bool]:
    """Store a queued job (committed), or find the one an earlier request with the same key stored; says
    whether it is new (and so still to be published)."""
    if idempotency_key:
        existing = session.scalar(select(Job).where(Job.tenant_id == tenant_id,
                                                    Job.idempotency_key == idempotency_key))
        if existing is not None:
            if existing.request != request:
                raise IdempotencyConflict("Idempotency-Key was already used with a different request")
            return existing, False
    check_quota(session, tenant_id)
    job = new(session, tenant_id, request, idempotency_key)
    try:
        session.commit()
    except IntegrityError:  # a concurrent request with the same key won the race
        session.rollback()
        return submit(session, tenant_id, request, idempotency_key)
    return job, True


def publish(job_id: str, priority: int, record: bool = False) -> bool:
    """Send the job's message to the broker (and, with `record`, note when: a new submission was marked
    published up front). A failure is logged (the broker's own words stay in the log), leaves the job to the
    sweeper, and starts its publish deadline if none is running: the deadline counts from the first failure
    since the last successful publish, never from creation."""
    try:
        queue.run_job(job_id, priority)
    except Exception:
        log.warning("could not publish job %s; the sweeper will retry", job_id, exc_info=True)
        with session_scope() as session:
            session.execute(update(Job).where(Job.id == job_id).values(
                enqueued_at=None, publish_failed_at=func.coalesce(Job.publish_failed_at, utcnow())))
        return False
    if record:
        with session_scope() as session:
            session.execute(update(Job).where(Job.id == job_id).values(enqueued_at=utcnow(), publish_failed_at=None))
    return True


def _claimable(stale: datetime):
    return or_(Job.status == QUEUED, (Job.status == RUNNING) & (Job.heartbeat_at < stale))


def claim(job_id: str, worker: str, settings: Settings | None = None) -> Job | None:
    """Take the job if no live worker has it and it has attempts left; a job out of attempts fails."""
    settings = settings or get_settings()
    now = utcnow()
    stale = now - timedelta(seconds=settings.stale_after_seconds)
    with session_scope() as session:
        taken = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.cancel_requested.is_(False), Job.attempts < settings.max_attempts,
                   _claimable(stale))
            .values(status=RUNNING, worker=worker, heartbeat_at=now, attempts=Job.attempts + 1,
                    started_at=now, message="running", error=None)
        ).rowcount
        if taken == 1:
            return session.get(Job, job_id)
        exhausted = session.scalar(select(Job).where(Job.id == job_id, Job.attempts >= settings.max_attempts,
                                                     _claimable(stale)))
        reason = exhausted and gave_up(exhausted, settings)
    if reason:  # a redelivered message of a job that keeps killing its workers
        fail(job_id, reason)
    return None


def gave_up(job: Job, settings: Settings) -> str:
    return (f"gave up after {job.attempts} attempts (MIXQ_MAX_ATTEMPTS): each time its worker stopped without "
            f"reporting (out of memory, the hard time limit of {settings.job_time_limit} s, or a lost machine); "
            f"last seen in phase {job.phase or 'start'!r}")


def update_if_mine(job_id: str, worker: str, **values) -> bool:
    """Progress and heartbeats: written only while `worker` holds the claim."""
    with session_scope() as session:
        return session.execute(
            update(Job).where(Job.id == job_id, Job.worker == worker, Job.status == RUNNING).values(**values)
        ).rowcount == 1


def cancel_requested(job_id: str) -> bool:
    with session_scope() as session:
        return bool(session.scalar(select(Job.cancel_requested).where(Job.id == job_id)))


def finish(job_id: str, worker: str, report: dict, artifacts: dict[str, dict]) -> str | None:
    """Store the results in one transaction, only if `worker` still holds the claim; returns the job's final
    status, or None when the claim was lost. A cancel that arrived after the engine's last step boundary is
    still honoured here: the job ends cancelled and its results are not stored (the caller was told
    "cancellation requested", and a job must not then end succeeded)."""
    with session_scope() as session:
        job = session.scalar(select(Job).where(Job.id == job_id, Job.worker == worker, Job.status == RUNNING)
                             .with_for_update())
        if job is None:
            return None
        if job.cancel_requested:
            job.status, job.finished_at = CANCELLED, utcnow()
            job.message = "cancelled: the cancel arrived as the job finished; its results were discarded"
        else:
            job.artifacts.clear()
            session.flush()
            session.add_all(Artifact(job_id=job_id, kind=kind, **artifact) for kind, artifact in artifacts.items())
            job.status, job.finished_at, job.progress, job.phase = SUCCEEDED, utcnow(), 1.0, "done"
            job.message = report["message"]
            job.report, job.phases, job.result_status = report, report["phases"], report["status"]
            job.baseline_metric, job.final_metric = report["baseline"]["metric"], report["final"]["metric"]
            job.latency_reduction = report["latency_reduction"]
        status = job.status
    notify_ended(job_id)
    return status


def end_running(job_id: str, worker: str, status: str, message: str | None = None, error: str | None = None) -> bool:
    """A worker ends the job it holds as failed or cancelled."""
    if update_if_mine(job_id, worker, status=status, finished_at=utcnow(), message=message or status, error=error):
        notify_ended(job_id)
        return True
    return False


def fail(job_id: str, error: str) -> bool:
    """End a job that no live worker holds (it cannot be run) as failed."""
    return _end_unheld(job_id, FAILED, FAILED, error)


def _end_unheld(job_id: str, status: str, message: str, error: str | None = None) -> bool:
    with session_scope() as session:
        ended = session.execute(update(Job).where(Job.id == job_id, Job.status.not_in(FINISHED)).values(
            status=status, finished_at=utcnow(), message=message, error=error, worker=None)).rowcount == 1
    if ended:
        notify_ended(job_id)
    return ended


def cancel(session: Session, job: Job) -> bool:
    """A queued job is cancelled at once (a late delivery finds nothing to claim); a running one is asked
    to stop at its next step boundary. Returns whether the job ended here: then the caller notifies
    (`notify_ended`) once its answer is on its way, so no request waits on a notification."""
    if job.status in FINISHED:
        raise ValueError(f"job already {job.status}")
    queued = session.execute(update(Job).where(Job.id == job.id, Job.status == QUEUED).values(
        cancel_requested=True, status=CANCELLED, finished_at=utcnow(),
        message="cancelled before it started")).rowcount == 1
    if not queued:
        session.execute(update(Job).where(Job.id == job.id).values(
            cancel_requested=True, message="cancellation requested: stops at the next step boundary"))
    session.commit()
    session.refresh(job)
    return queued


def sweep(settings: Settings | None = None) -> dict[str, int]:
    """The scheduler's periodic repair. A running job whose worker went silent is cancelled if that was
    asked for, failed if out of attempts, and otherwise goes back to the queue; queued jobs that were never
    published, or not claimed long after, are published (again)."""
    settings = settings or get_settings()
    now = utcnow()
    stale = now - timedelta(seconds=settings.stale_after_seconds)
    with session_scope() as session:
        silent = list(session.scalars(select(Job).where(Job.status == RUNNING, Job.heartbeat_at < stale)
                                      .with_for_update(skip_locked=True)))
        cancelled = [job.id for job in silent if job.cancel_requested]
        exhausted = {job.id: gave_up(job, settings) for job in silent
                     if not job.cancel_requested and job.attempts >= settings.max_attempts}
        requeued = [job for job in silent if job.id not in exhausted and job.id not in cancelled]
        for job in requeued:
            job.status, job.worker, job.message = QUEUED, None, "requeued: its worker stopped responding"
        session.flush()
        requeued = [(job.id, job.priority) for job in requeued]
        unpublished = now - timedelta(seconds=settings.publish_grace_seconds)
        unclaimed = now - timedelta(seconds=settings.unclaimed_after_seconds)
        deadline = now - timedelta(seconds=settings.publish_deadline_seconds)
        overdue = dict(session.execute(select(Job.id, Job.priority).where(
            Job.status == QUEUED, Job.enqueued_at.is_(None),
            func.coalesce(Job.publish_failed_at, Job.created_at) < deadline)).all())
        waiting = session.execute(select(Job.id, Job.priority).where(Job.status == QUEUED, or_(
            Job.enqueued_at.is_(None) & (Job.created_at < unpublished), Job.enqueued_at < unclaimed)).order_by(
            Job.created_at)).all()
    for job_id in cancelled:
        _end_unheld(job_id, CANCELLED, "cancelled: its worker stopped before it could stop the job itself")
    for job_id, reason in exhausted.items():
        fail(job_id, reason)
    # Past its deadline a job gets one more try before it fails: the broker may be back since the last attempt.
    abandoned = [job_id for job_id, priority in overdue.items() if not publish(job_id, priority, record=True)]
    for job_id in abandoned:
        fail(job_id, f"the job could not be queued for {settings.publish_deadline_seconds:.0f} s: the broker is "
                     "unreachable")
    again = dict(requeued) | {job_id: priority for job_id, priority in waiting if job_id not in overdue}
    published = sum(publish(job_id, priority, record=True) for job_id, priority in again.items())
    published += len(overdue) - len(abandoned)
    return {"requeued": len(requeued), "published": published, "cancelled": len(cancelled),
            "failed": len(exhausted) + len(abandoned)}


def notify_ended(job_id: str) -> None:
    """The ended job's notifications: queued for the housekeeping worker, never delivered here."""
    try:
        notifications.job_ended(job_id)
    except Exception:  # a notification problem never changes the job's outcome
        log.exception("notifications for job %s failed", job_id)

