"""Celery tasks: thin wrappers, idempotent by job id; job state lives in the database (app.core.jobs)."""

from __future__ import annotations

import httpx
from sqlalchemy.exc import OperationalError

from app.core import jobs, queue, registry, webhooks
from worker import runner
from worker.celery_app import app


@app.task(name=queue.RUN_JOB, bind=True, autoretry_for=(OperationalError, ConnectionError), retry_backoff=5,
          max_retries=3)
def run_job(self, job_id: str) -> None:
    runner.run(job_id, worker=f"{self.request.hostname}:{self.request.id}")


@app.task(name=queue.SWEEP)
def sweep() -> None:
    jobs.sweep()


@app.task(name=queue.DELIVER_WEBHOOK, autoretry_for=(httpx.HTTPError,), retry_backoff=5, retry_backoff_max=600,
          retry_jitter=True, max_retries=8)
def deliver_webhook(url: str, event: str, payload: dict, delivery_id: str, tenant_id: int) -> None:
    webhooks.post(url, event, payload, delivery_id, tenant_id)


@app.task(name=queue.REGISTRY_TICK)
def registry_tick() -> None:
    registry.tick()
