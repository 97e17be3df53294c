"""Liveness, readiness (database and broker reachable) and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from sqlalchemy import func, select, text

from app.core.db import session_scope
from app.core.models import FINISHED, QUEUED, STATUSES, Job
from app.core.settings import get_settings

router = APIRouter(tags=["health"])

DURATION_BUCKETS = (10, 30, 60, 120, 300, 600, 1800, 3600, 3 * 3600)


@router.get("/healthz")
def healthz() -> dict:
    return {"status": "ok"}


def _check_broker(url: str) -> None:
    from kombu import Connection

    with Connection(url, connect_timeout=2) as connection:
        connection.ensure_connection(max_retries=1)


@router.get("/readyz")
def readyz():
    checks = {}
    try:
        with session_scope() as session:
            session.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as exc:
        checks["database"] = f"unreachable: {exc.__class__.__name__}"
    try:
        _check_broker(get_settings().broker_url)
        checks["broker"] = "ok"
    except Exception as exc:
        checks["broker"] = f"unreachable: {exc.__class__.__name__}"
    ready = all(v == "ok" for v in checks.values())
    return JSONResponse({"ready": ready, "checks": checks}, status_code=200 if ready else 503)


class JobsCollector:
    """Reads job state from the database at scrape time, so every API replica reports the same numbers."""

    def collect(self):
        with session_scope() as session:
            counts = dict(session.execute(select(Job.status, func.count()).group_by(Job.status)).all())
            durations = [
                (finished - started).total_seconds()
                for started, finished in session.execute(
                    select(Job.started_at, Job.finished_at).where(Job.status.in_(FINISHED),
                                                                  Job.started_at.is_not(None)))
            ]
        by_status = GaugeMetricFamily("mixq_jobs", "Jobs by status", labels=["status"])
        for status in STATUSES:
            by_status.add_metric([status], counts.get(status, 0))
        yield by_status
        yield GaugeMetricFamily("mixq_queue_depth", "Jobs waiting for a worker", value=counts.get(QUEUED, 0))
        buckets = [(str(b), sum(d <= b for d in durations)) for b in DURATION_BUCKETS]
        buckets.append(("+Inf", len(durations)))
        yield HistogramMetricFamily("mixq_job_duration_seconds", "Run time of finished jobs", buckets=buckets,
                                    sum_value=sum(durations))


@router.get("/metrics")
def metrics() -> Response:
    registry = CollectorRegistry()
    registry.register(JobsCollector())
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
