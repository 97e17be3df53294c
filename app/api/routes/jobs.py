"""/v1/jobs: submit, list, poll, results, artifact download, cancel. Every query is scoped to the tenant."""

from __future__ import annotations

import base64
from datetime import datetime

from fastapi import APIRouter, Depends, Header, HTTPException, Query, Response
from fastapi.responses import FileResponse
from sqlalchemy import and_, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.api.deps import current_tenant
from app.db import get_session
from app.models import CANCELLED, FINISHED, QUEUED, STATUSES, SUCCEEDED, Artifact, Job, Tenant, utcnow
from app.schemas import JobCreate, JobList, JobOut, LayerOut, StepOut
from app.settings import get_settings
from worker.engine.errors import InputError
from worker.engine.paths import resolve_under_root
from worker.engine.sources import parse_source

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


def job_out(job: Job) -> JobOut:
    base = f"/v1/jobs/{job.id}"
    links = {"self": base, "report": f"{base}/report", "layers": f"{base}/layers", "steps": f"{base}/steps",
             "artifact": f"{base}/artifact", "cancel": f"{base}/cancel"}
    fields = {name: getattr(job, name) for name in JobOut.model_fields if name != "links"}
    return JobOut(**fields, links=links)


def owned_job(job_id: str, session: Session, tenant: Tenant) -> Job:
    job = session.scalar(select(Job).where(Job.id == job_id, Job.tenant_id == tenant.id))
    if job is None:  # another tenant's job is indistinguishable from a missing one
        raise HTTPException(404, f"job {job_id} not found")
    return job


def check_local_paths(body: JobCreate) -> None:
    """Refuse, at submission, model or data paths that escape the allowed root (not later in a worker)."""
    root = get_settings().model_root
    try:
        spec = parse_source(body.model)
        if spec.kind == "local":
            resolve_under_root(spec.id, root, what="model")
        if body.data and body.data.spec and not body.data.spec.startswith("hf:"):
            resolve_under_root(body.data.spec, root, what="data")
    except InputError as exc:
        raise HTTPException(422, str(exc)) from None


def _accepted(response: Response, job: Job) -> JobOut:
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return job_out(job)


@router.post("", status_code=202, response_model=JobOut)
def submit_job(body: JobCreate, response: Response, session: Session = Depends(get_session),
               tenant: Tenant = Depends(current_tenant),
               idempotency_key: str | None = Header(None, max_length=200)) -> JobOut:
    check_local_paths(body)
    request = body.model_dump(mode="json")
    if idempotency_key:
        existing = session.scalar(select(Job).where(Job.tenant_id == tenant.id, Job.idempotency_key == idempotency_key))
        if existing is not None:
            if existing.request != request:
                raise HTTPException(409, "Idempotency-Key was already used with a different request")
            return _accepted(response, existing)
    job = Job(tenant_id=tenant.id, model=body.model, request=request, idempotency_key=idempotency_key,
              priority=body.priority, webhook_url=body.webhook_url, status=QUEUED, phases={}, message="queued")
    session.add(job)
    try:
        session.commit()
    except IntegrityError:  # a concurrent request with the same key won the race
        session.rollback()
        return submit_job(body, response, session, tenant, idempotency_key)
    from worker.tasks import enqueue

    try:
        enqueue(job.id, job.priority)
    except Exception as exc:  # the broker is down: say so, and do not leave a job that will never run
        job.status, job.error, job.finished_at = "failed", f"could not enqueue the job: {exc}", utcnow()
        session.commit()
        raise HTTPException(503, f"queue unavailable, job {job.id} marked failed: {exc}") from None
    return _accepted(response, job)


def _encode_cursor(job: Job) -> str:
    return base64.urlsafe_b64encode(f"{job.created_at.isoformat()}|{job.id}".encode()).decode()


def _decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        created, job_id = base64.urlsafe_b64decode(cursor.encode()).decode().split("|", 1)
        return datetime.fromisoformat(created), job_id
    except Exception:
        raise HTTPException(422, "invalid cursor: pass back next_cursor from a previous page") from None


@router.get("", response_model=JobList)
def list_jobs(status: str | None = Query(None, description=f"one of {', '.join(STATUSES)}"),
              model: str | None = Query(None, max_length=300), limit: int = Query(20, ge=1, le=100),
              cursor: str | None = None, session: Session = Depends(get_session),
              tenant: Tenant = Depends(current_tenant)) -> JobList:
    if status is not None and status not in STATUSES:
        raise HTTPException(422, f"unknown status {status!r}; use one of {', '.join(STATUSES)}")
    query = select(Job).where(Job.tenant_id == tenant.id)
    if status:
        query = query.where(Job.status == status)
    if model:
        query = query.where(Job.model == model)
    if cursor:
        created, job_id = _decode_cursor(cursor)
        query = query.where(or_(Job.created_at < created, and_(Job.created_at == created, Job.id < job_id)))
    jobs = list(session.scalars(query.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1)))
    next_cursor = _encode_cursor(jobs[limit - 1]) if len(jobs) > limit else None
    return JobList(jobs=[job_out(j) for j in jobs[:limit]], next_cursor=next_cursor)


@router.get("/{job_id}", response_model=JobOut)
def get_job(job_id: str, session: Session = Depends(get_session), tenant: Tenant = Depends(current_tenant)) -> JobOut:
    return job_out(owned_job(job_id, session, tenant))


def _finished(job: Job, what: str) -> None:
    if job.status != SUCCEEDED:
        raise HTTPException(409, f"{what} not available: job is {job.status}")


@router.get("/{job_id}/report")
def get_report(job_id: str, session: Session = Depends(get_session), tenant: Tenant = Depends(current_tenant)) -> dict:
    job = owned_job(job_id, session, tenant)
    _finished(job, "report")
    return job.report


@router.get("/{job_id}/layers", response_model=list[LayerOut])
def get_layers(job_id: str, session: Session = Depends(get_session), tenant: Tenant = Depends(current_tenant)):
    return owned_job(job_id, session, tenant).layers


@router.get("/{job_id}/steps", response_model=list[StepOut])
def get_steps(job_id: str, session: Session = Depends(get_session), tenant: Tenant = Depends(current_tenant)):
    return owned_job(job_id, session, tenant).search_steps


@router.get("/{job_id}/artifact")
def get_artifact(job_id: str, session: Session = Depends(get_session), tenant: Tenant = Depends(current_tenant)):
    job = owned_job(job_id, session, tenant)
    _finished(job, "artifact")
    bundle = session.scalar(select(Artifact).where(Artifact.job_id == job.id, Artifact.kind == "bundle"))
    if bundle is None:
        raise HTTPException(404, "this job has no artifact")
    return FileResponse(bundle.path, media_type="application/zip", filename=f"mixq-{job.id}.zip",
                        headers={"X-Content-SHA256": bundle.sha256})


@router.post("/{job_id}/cancel", response_model=JobOut)
def cancel_job(job_id: str, session: Session = Depends(get_session), tenant: Tenant = Depends(current_tenant)):
    job = owned_job(job_id, session, tenant)
    if job.status in FINISHED:
        raise HTTPException(409, f"job already {job.status}")
    job.cancel_requested = True
    if job.status == QUEUED:  # no worker has it: cancel now; a late delivery will find it cancelled
        job.status, job.finished_at, job.message = CANCELLED, utcnow(), "cancelled before it started"
    else:
        job.message = "cancellation requested: stops at the next step boundary"
    session.commit()
    return job_out(job)
