"""Celery tasks of the compression workers: thin wrappers, idempotent by job id; job state lives in the
database (app.core.jobs). Housekeeping has its own worker (worker/housekeeping.py)."""

from __future__ import annotations

from sqlalchemy.exc import OperationalError

from app.core import queue
from worker import runner
from worker.celery_app import app


@app.task(name=queue.RUN_JOB, bind=True, autoretry_for=(OperationalError, ConnectionError), retry_backoff=5,
          max_retries=3)
def run_job(self, job_id: str) -> None:
    runner.run(job_id, worker=f"{self.request.hostname}:{self.request.id}")
