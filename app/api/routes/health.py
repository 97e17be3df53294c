"""Liveness, readiness (database and broker reachable) and Prometheus metrics."""

from __future__ import annotations

import hmac

from fastapi import APIRouter, Header, HTTPException, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from sqlalchemy import case, func, select, text

from app.api.openapi import ErrorOut
from app.core.db import session_scope
from app.core.models import FINISHED, QUEUED, STATUSES, Job
from app.core.settings import get_settings

router = APIRouter(tags=["health"])

DURATION_BUCKETS = (10, 30, 60, 120, 300, 600, 1800, 3600, 3 * 3600)


@router.get("/healthz")
async def healthz() -> dict:  # on the event loop: it never waits for a thread that a slow Hub or database holds
    return {"status": "ok"}


def _check_broker(url: str) -> None:
    from kombu import Connection

    with Connection(url, connect_timeout=2) as connection:
        connection.ensure_connection(max_retries=1)


@router.get("/readyz", responses={503: {"description": "the database or the broker is unreachable"}})
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


def _run_seconds(dialect: str):
    if dialect == "postgresql":
        return func.extract("epoch", Job.finished_at - Job.started_at)
    return (func.julianday(Job.finished_at) - func.julianday(Job.started_at)) * 86400.0


class JobsCollector:
    """Reads job state from the database at scrape time, so every API replica reports the same numbers;
    the database aggregates (two small queries), however many jobs there are."""

    def collect(self):
        with session_scope() as session:
            counts = dict(session.execute(select(Job.status, func.count()).group_by(Job.status)).all())
            seconds = _run_seconds(session.get_bind().dialect.name)
            finished = session.execute(
                select(func.count(), func.coalesce(func.sum(seconds), 0.0),
                       *[func.coalesce(func.sum(case((seconds <= bound, 1), else_=0)), 0) for bound in DURATION_BUCKETS])
                .where(Job.status.in_(FINISHED), Job.started_at.is_not(None), Job.finished_at.is_not(None))).one()
        by_status = GaugeMetricFamily("mixq_jobs", "Jobs by status", labels=["status"])
        for status in STATUSES:
            by_status.add_metric([status], counts.get(status, 0))
        yield by_status
        yield GaugeMetricFamily("mixq_queue_depth", "Jobs waiting for a worker", value=counts.get(QUEUED, 0))
        total, sum_seconds, *within = finished
        buckets = [(str(bound), count) for bound, count in zip(DURATION_BUCKETS, within)] + [("+Inf", total)]
        yield HistogramMetricFamily("mixq_job_duration_seconds", "Run time of finished jobs", buckets=buckets,
                                    sum_value=float(sum_seconds))


@router.get("/metrics", responses={200: {"content": {"text/plain": {}}, "description": "Prometheus exposition"},
                                   401: {"description": "MIXQ_METRICS_TOKEN is required", "model": ErrorOut}})
def metrics(request: Request, authorization: str | None = Header(None)) -> Response:
    """Every tenant's job counts: open without keys (local mode), else only with MIXQ_METRICS_TOKEN."""
    if not request.app.state.auth_disabled:
        token = get_settings().metrics_token
        if not token:
            raise HTTPException(401, "metrics are closed: the operator has not set MIXQ_METRICS_TOKEN")
        if not hmac.compare_digest((authorization or "").encode(), f"Bearer {token}".encode()):
            raise HTTPException(401, "send 'Authorization: Bearer <MIXQ_METRICS_TOKEN>'",
                                headers={"WWW-Authenticate": "Bearer"})
    registry = CollectorRegistry()
    registry.register(JobsCollector())
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
