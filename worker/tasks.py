"""Celery tasks: thin wrappers over worker.runner, idempotent by job id."""

from __future__ import annotations

import httpx
from sqlalchemy.exc import OperationalError

from app import registry, webhooks
from app.settings import get_settings
from worker import runner
from worker.celery_app import app


@app.task(name="mixq.run_job", bind=True, autoretry_for=(OperationalError, ConnectionError), retry_backoff=5,
          max_retries=3)
def run_job(self, job_id: str) -> None:
    runner.run(job_id, worker=f"{self.request.hostname}:{self.request.id}")


@app.task(name="mixq.requeue_stale")
def requeue_stale() -> None:
    for job_id, priority in runner.requeue_stale():
        enqueue(job_id, priority)


def enqueue(job_id: str, priority: int = 5) -> None:
    # API priority: higher runs first. Celery's (on Redis): 0 is served first.
    run_job.apply_async(args=[job_id], queue=get_settings().queue, priority=9 - priority)


@app.task(name="mixq.deliver_webhook", autoretry_for=(httpx.HTTPError,), retry_backoff=5, retry_backoff_max=600,
          retry_jitter=True, max_retries=8)
def deliver_webhook(url: str, event: str, payload: dict, delivery_id: str) -> None:
    webhooks.post(url, event, payload, delivery_id)


@app.task(name="mixq.registry_tick")
def registry_tick() -> None:
    registry.tick()
