"""The broker, torch-free: the Celery configuration every process shares, and sending tasks by name, so
that the API and the scheduler never import the workers' code."""

from __future__ import annotations

from functools import lru_cache

from celery import Celery

from .settings import get_settings

RUN_JOB = "mixq.run_job"
SWEEP = "mixq.sweep"
REGISTRY_TICK = "mixq.registry_tick"
DELIVER_WEBHOOK = "mixq.deliver_webhook"
# Short tasks the housekeeping worker runs, on their own queue: none waits behind a compression job. Webhook
# deliveries, which wait on receivers outside our control, have a queue (and worker threads) of their own: 16
# receivers that never answered once held every housekeeping thread, and sweeps and ticks expired unrun.
HOUSEKEEPING = (SWEEP, REGISTRY_TICK)
WEBHOOKS = (DELIVER_WEBHOOK,)


def queue_for(name: str) -> str:
    settings = get_settings()
    return (settings.housekeeping_queue if name in HOUSEKEEPING else settings.webhook_queue if name in WEBHOOKS
            else settings.queue)


def make_celery(include: tuple[str, ...] = ()) -> Celery:
    settings = get_settings()
    app = Celery("mixq", broker=settings.broker_url, include=list(include))
    transport = {}
    if settings.broker_url.startswith(("redis://", "rediss://")):
        # An unacknowledged job is redelivered only after this long: it must outlast the longest job.
        transport = {"visibility_timeout": settings.job_time_limit + 600, "queue_order_strategy": "priority",
                     "priority_steps": list(range(10))}
    app.conf.update(
        task_acks_late=True,  # a job whose worker dies is redelivered, not lost
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,  # one job at a time per worker process: jobs are long
        task_ignore_result=True,
        task_default_queue=settings.queue,
        task_soft_time_limit=settings.job_soft_time_limit,
        task_time_limit=settings.job_time_limit,
        broker_transport_options=transport,
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=settings.broker_timeout_seconds,
        worker_hijack_root_logger=False,
        task_routes={name: {"queue": queue_for(name)} for name in HOUSEKEEPING + WEBHOOKS},
        # Static entries only drive database-backed work: job state and registry schedules live in the database.
        # Each expires after its own interval: a backlog (a worker that was down) is dropped, never replayed.
        beat_schedule={"sweep": {"task": SWEEP, "schedule": settings.sweep_seconds,
                                 "options": {"expires": settings.sweep_seconds}},
                       "registry-tick": {"task": REGISTRY_TICK, "schedule": settings.scheduler_tick_seconds,
                                         "options": {"expires": settings.scheduler_tick_seconds}}},
    )
    return app


@lru_cache
def client() -> Celery:
    """A Celery app that only sends: no task code is imported."""
    return make_celery()


def send(name: str, args: list, priority: int | None = None, countdown: float | None = None) -> None:
    """Publish a task by name: housekeeping and webhook tasks to their own queues, jobs to the compression queue."""
    client().send_task(name, args=args, queue=queue_for(name), priority=priority, countdown=countdown, retry=False)


def run_job(job_id: str, priority: int) -> None:
    # API priority: higher runs first. Celery's (on Redis): 0 is served first.
    send(RUN_JOB, [job_id], priority=9 - priority)
