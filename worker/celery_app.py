"""The Celery application. Tasks are thin; job state lives in the database, not in a result backend."""

from __future__ import annotations

from celery import Celery
from celery.signals import worker_ready

from app.logs import quiet_library_noise
from app.settings import get_settings

quiet_library_noise()


def make_celery() -> Celery:
    settings = get_settings()
    app = Celery("mixq", broker=settings.broker_url, include=["worker.tasks"])
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
        worker_hijack_root_logger=False,
        # Static entries only drive database-backed work: registry schedules live in registry_entries.
        beat_schedule={"requeue-stale-jobs": {"task": "mixq.requeue_stale", "schedule": 30.0},
                       "registry-tick": {"task": "mixq.registry_tick", "schedule": settings.scheduler_tick_seconds}},
    )
    return app


app = make_celery()


@worker_ready.connect
def _requeue_on_start(sender=None, **_):
    """A worker that starts after a crash picks up the jobs the dead worker held."""
    from worker.tasks import requeue_stale

    requeue_stale.delay()
