"""/v1/jobs: submit, list, poll, results, artifact download, cancel. Every query is scoped to the tenant."""

from __future__ import annotations

import base64
from datetime import datetime

from fastapi import APIRouter, BackgroundTasks, Header, HTTPException, Query, Response
from fastapi.responses import FileResponse
from sqlalchemy import and_, or_, select

from app.api.deps import SessionDep, TenantDep
from app.core import jobs
from app.core.auth import CallerTenant
from app.core.models import STATUSES, SUCCEEDED, Artifact, Job
from app.core.schemas import JobCreate, JobList, JobOut, LayerOut, StepOut
from app.core.settings import get_settings
from worker.engine.errors import InputError
from worker.engine.paths import resolve_under_root
from worker.engine.spec import parse_source

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


def job_out(job: Job) -> JobOut:
    base = f"/v1/jobs/{job.id}"
    links = {"self": base, "report": f"{base}/report", "layers": f"{base}/layers", "steps": f"{base}/steps",
             "artifact": f"{base}/artifact", "cancel": f"{base}/cancel"}
    fields = {name: getattr(job, name) for name in JobOut.model_fields if name not in ("links", "finished")}
    return JobOut(**fields, finished=job.status in jobs.FINISHED, links=links)


def owned_job(job_id: str, session, tenant: CallerTenant) -> Job:
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


@router.post("", status_code=202, response_model=JobOut)
def submit_job(body: JobCreate, response: Response, session: SessionDep, tenant: TenantDep,
               background: BackgroundTasks, idempotency_key: str | None = Header(None, max_length=200)) -> JobOut:
    check_local_paths(body)
    try:
        job, created = jobs.submit(session, tenant.id, body.model_dump(mode="json"), idempotency_key)
    except jobs.IdempotencyConflict as exc:
        raise HTTPException(409, str(exc)) from None
    if created:  # published after the response: the broker is off the request path
        background.add_task(jobs.publish, job.id, job.priority)
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return job_out(job)


def _encode_cursor(job: Job) -> str:
    return base64.urlsafe_b64encode(f"{job.created_at.isoformat()}|{job.id}".encode()).decode()


def _decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        created, job_id = base64.urlsafe_b64decode(cursor.encode()).decode().split("|", 1)
        return datetime.fromisoformat(created), job_id
    except Exception:
        raise HTTPException(422, "invalid cursor: pass back next_cursor from a previous page") from None


@router.get("", response_model=JobList)
async def list_jobs(session: SessionDep, tenant: TenantDep,
              status: str | None = Query(None, description=f"one of {', '.join(STATUSES)}"),
              model: str | None = Query(None, max_length=300), limit: int = Query(20, ge=1, le=100),
              cursor: str | None = None) -> JobList:
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
    found = list(session.scalars(query.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1)))
    next_cursor = _encode_cursor(found[limit - 1]) if len(found) > limit else None
    return JobList(jobs=[job_out(j) for j in found[:limit]], next_cursor=next_cursor)


@router.get("/{job_id}", response_model=JobOut)
async def get_job(job_id: str, session: SessionDep, tenant: TenantDep) -> JobOut:
    return job_out(owned_job(job_id, session, tenant))


def _succeeded(job: Job, what: str) -> None:
    if job.status != SUCCEEDED:
        raise HTTPException(409, f"{what} not available: job is {job.status}")


@router.get("/{job_id}/report")
async def get_report(job_id: str, session: SessionDep, tenant: TenantDep) -> dict:
    job = owned_job(job_id, session, tenant)
    _succeeded(job, "report")
    return job.report


@router.get("/{job_id}/layers", response_model=list[LayerOut])
async def get_layers(job_id: str, session: SessionDep, tenant: TenantDep):
    report = owned_job(job_id, session, tenant).report or {}
    return [{**layer, "position": i} for i, layer in enumerate(report.get("layers", []))]


@router.get("/{job_id}/steps", response_model=list[StepOut])
async def get_steps(job_id: str, session: SessionDep, tenant: TenantDep):
    report = owned_job(job_id, session, tenant).report or {}
    return [{**step, "position": i} for i, step in enumerate(report.get("search", {}).get("steps", []))]


@router.get("/{job_id}/artifact")
async def get_artifact(job_id: str, session: SessionDep, tenant: TenantDep):
    job = owned_job(job_id, session, tenant)
    _succeeded(job, "artifact")
    bundle = session.scalar(select(Artifact).where(Artifact.job_id == job.id, Artifact.kind == "bundle"))
    if bundle is None:
        raise HTTPException(404, "this job has no artifact")
    return FileResponse(bundle.path, media_type="application/zip", filename=f"mixq-{job.id}.zip",
                        headers={"X-Content-SHA256": bundle.sha256})


@router.post("/{job_id}/cancel", response_model=JobOut)
async def cancel_job(job_id: str, session: SessionDep, tenant: TenantDep) -> JobOut:
    try:
        return job_out(jobs.cancel(session, owned_job(job_id, session, tenant)))
    except ValueError as exc:
        raise HTTPException(409, str(exc)) from None
