"""/v1/jobs: submit, list, poll, results, artifact download, cancel. Every query is scoped to the tenant."""

from __future__ import annotations

import base64
import threading
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from datetime import datetime
from pathlib import Path
from typing import Literal

from fastapi import APIRouter, BackgroundTasks, Header, HTTPException, Query, Response
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from fastapi.responses import FileResponse
from sqlalchemy import and_, bindparam, or_, select
from sqlalchemy.orm import defer

from app.api.deps import SessionDep, TenantDep
from app.api.openapi import errors, invalid, links
from app.core import jobs
from app.core.auth import CallerTenant
from app.core.db import get_engine
from app.core.models import STATUSES, SUCCEEDED, Artifact, Job
from app.core.schemas import JobCreate, JobList, JobOut, LayerOut, StepOut
from app.core.settings import get_settings
from worker.engine.errors import InputError
from worker.engine.paths import resolve_under_root
from worker.engine import sizing
from worker.engine.spec import model_config, parse_source

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], responses=errors(400, 401, 408))
JOB_OPERATIONS = ("get_job", "get_report", "get_layers", "get_steps", "get_artifact", "cancel_job")
RETRY_AFTER_SECONDS = 30  # a tenant at its quota: about how long before a job of its finishes or starts


def job_out(job) -> JobOut:
    """A job (an ORM object, or a row of its columns) as the API shows it."""
    base = f"/v1/jobs/{job.id}"
    links = {"self": base, "report": f"{base}/report", "layers": f"{base}/layers", "steps": f"{base}/steps",
             "artifact": f"{base}/artifact", "cancel": f"{base}/cancel"}
    fields = {name: getattr(job, name) for name in JobOut.model_fields if name not in ("links", "finished")}
    return JobOut(**fields, finished=job.status in jobs.FINISHED, links=links)


def job_not_found(job_id: str) -> HTTPException:
    # Another tenant's job is indistinguishable from a missing one.
    return HTTPException(404, f"job {job_id} not found")


def owned_job(job_id: str, session, tenant: CallerTenant) -> Job:
    """The tenant's job, or 404 (the poll reads its columns itself, without the report: `get_job`)."""
    job = session.scalar(select(Job).where(Job.id == job_id, Job.tenant_id == tenant.id))
    if job is None:
        raise job_not_found(job_id)
    return job


def too_many(exc: jobs.QuotaExceeded) -> HTTPException:
    return HTTPException(429, str(exc), headers={"Retry-After": str(RETRY_AFTER_SECONDS)})


def validated_request(request: dict) -> JobCreate:
    """A job request (a registry entry's after a PATCH) validated as POST /v1/jobs validates one: the schema,
    then the paths; any problem is a 422 in the schema's own error shape."""
    try:
        body = JobCreate.model_validate(request)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors(include_url=False, include_context=False)) from None
    check_local_paths(body)
    return body


# Config reads from the Hub run on their own few threads with a total deadline: a slow Hub can hold them, never
# the request threads (every `def` route shares one pool) nor /healthz (on the event loop).
HUB_LOOKUP_THREADS = 4
_hub_lookups = ThreadPoolExecutor(HUB_LOOKUP_THREADS, thread_name_prefix="hub-config")
_hub_slots = threading.BoundedSemaphore(HUB_LOOKUP_THREADS)


def _model_config(model: str) -> dict | None:
    """The model's config.json within `hub_timeout_seconds` in all, or None (read too slowly, or all lookup
    threads busy with a slow Hub: the worker reads and checks it again before it allocates anything)."""
    settings = get_settings()
    spec = parse_source(model)
    if spec.kind != "hf":
        return model_config(spec, settings.model_root, settings.cache_dir, settings.hub_timeout_seconds)
    if not _hub_slots.acquire(blocking=False):
        return None
    future = _hub_lookups.submit(model_config, spec, settings.model_root, settings.cache_dir,
                                 settings.hub_timeout_seconds)
    future.add_done_callback(lambda _: _hub_slots.release())
    try:
        return future.result(timeout=settings.hub_timeout_seconds)
    except FutureTimeout:
        return None


def check_input_size(body) -> None:
    """An image model's inputs at the size its own config says (a ViT may take 2048 px, not 224), and a language
    model's logits at its vocabulary, read before the job is accepted, from the Hub or the model root as the
    worker will read it; a config that cannot be read here in time is left to the worker, which checks again
    before it allocates anything. A config whose fields are not what transformers writes is a 422 naming them."""
    settings = get_settings()
    try:
        config = _model_config(body.model)
    except InputError:
        return
    try:
        shape = sizing.image_shape(config) if config is not None else None
        vocab = sizing.vocabulary(config) if config is not None else None
        if shape or vocab:
            sizing.check(body.model_dump(), settings.max_job_memory_bytes, settings.max_job_sample_passes, shape,
                         vocab)
    except InputError as exc:
        raise invalid(("body",), str(exc)) from None


def check_local_paths(body: JobCreate) -> None:
    """Refuse, at submission, model or data paths that escape the allowed root (not later in a worker)."""
    root = get_settings().model_root
    spec = parse_source(body.model)  # already valid: the schema parsed it
    paths = [(("body", "model"), spec.id, "model")] if spec.kind == "local" else []
    if body.data and body.data.spec and not body.data.spec.startswith("hf:"):
        paths.append((("body", "data", "spec"), body.data.spec, "data"))
    for location, path, what in paths:
        try:
            resolve_under_root(path, root, what=what)
        except InputError as exc:
            raise invalid(location, str(exc)) from None


@router.post("", status_code=202, response_model=JobOut, responses={
    202: {"links": links("job_id", "$response.body#/id", *JOB_OPERATIONS)}, **errors(409, 413, 429)})
def submit_job(body: JobCreate, response: Response, session: SessionDep, tenant: TenantDep,
               background: BackgroundTasks, idempotency_key: str | None = Header(None, max_length=200)) -> JobOut:
    check_local_paths(body)
    check_input_size(body)
    try:
        job, created = jobs.submit(session, tenant.id, body.model_dump(mode="json"), idempotency_key)
    except jobs.IdempotencyConflict as exc:
        raise HTTPException(409, str(exc)) from None
    except jobs.QuotaExceeded as exc:
        raise too_many(exc) from None
    if created:  # published after the response: the broker is off the request path
        background.add_task(jobs.publish, job.id, job.priority)
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return job_out(job)


def encode_cursor(created_at: datetime, row_id: str) -> str:
    """A page boundary in (created_at, id) order: opaque to clients."""
    return base64.urlsafe_b64encode(f"{created_at.isoformat()}|{row_id}".encode()).decode()


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        created, row_id = base64.urlsafe_b64decode(cursor.encode()).decode().split("|", 1)
        if "\x00" in row_id:
            raise ValueError("NUL in a cursor")
        return datetime.fromisoformat(created), row_id
    except Exception:
        raise invalid(("query", "cursor"), "invalid cursor: pass back next_cursor from a previous page") from None


@router.get("", response_model=JobList)
async def list_jobs(session: SessionDep, tenant: TenantDep,
              status: Literal[STATUSES] | None = Query(None),
              model: str | None = Query(None, max_length=300), limit: int = Query(20, ge=1, le=100),
              cursor: str | None = Query(None, max_length=200)) -> JobList:
    query = select(Job).where(Job.tenant_id == tenant.id).options(defer(Job.report))  # a page never reads reports
    if status:
        query = query.where(Job.status == status)
    if model:
        query = query.where(Job.model == model)
    if cursor:
        created, job_id = decode_cursor(cursor)
        query = query.where(or_(Job.created_at < created, and_(Job.created_at == created, Job.id < job_id)))
    found = list(session.scalars(query.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1)))
    next_cursor = encode_cursor(found[limit - 1].created_at, found[limit - 1].id) if len(found) > limit else None
    return JobList(jobs=[job_out(j) for j in found[:limit]], next_cursor=next_cursor)


# The poll, the hottest route: one statement built once, the columns JobOut shows (never the report), read as a
# plain row rather than an ORM object (building the query and loading the entity were 40% of a poll's time).
_POLLED = select(*(Job.__table__.c[name] for name in JobOut.model_fields if name not in ("links", "finished"))).where(
    Job.id == bindparam("job_id"), Job.tenant_id == bindparam("tenant_id"))


@router.get("/{job_id}", response_model=JobOut, responses=errors(404))
async def get_job(job_id: str, tenant: TenantDep) -> Response:
    # A connection, not an ORM session: the poll reads a row and needs nothing the session adds (a third of its time).
    with get_engine().connect() as connection:
        row = connection.execute(_POLLED, {"job_id": job_id, "tenant_id": tenant.id}).first()
    if row is None:
        raise job_not_found(job_id)
    # Serialised once, here, instead of validated again against the response model (which still documents it).
    return Response(job_out(row).model_dump_json(), media_type="application/json")


def _succeeded(job: Job, what: str) -> None:
    if job.status != SUCCEEDED:
        raise HTTPException(409, f"{what} not available: job is {job.status}")


@router.get("/{job_id}/report", responses=errors(404, 409))
async def get_report(job_id: str, session: SessionDep, tenant: TenantDep) -> dict:
    job = owned_job(job_id, session, tenant)
    _succeeded(job, "report")
    return job.report


@router.get("/{job_id}/layers", response_model=list[LayerOut], responses=errors(404))
async def get_layers(job_id: str, session: SessionDep, tenant: TenantDep):
    report = owned_job(job_id, session, tenant).report or {}
    return [{**layer, "position": i} for i, layer in enumerate(report.get("layers", []))]


@router.get("/{job_id}/steps", response_model=list[StepOut], responses=errors(404))
async def get_steps(job_id: str, session: SessionDep, tenant: TenantDep):
    report = owned_job(job_id, session, tenant).report or {}
    return [{**step, "position": i} for i, step in enumerate(report.get("search", {}).get("steps", []))]


ARTIFACT_FORMATS = {  # format -> media type, file name, what it holds
    "bundle": ("application/zip", "mixq-{id}.zip", "report, plan, torch weights and ONNX files"),
    "onnx": ("application/octet-stream", "mixq-{id}.onnx", "the quantized ONNX model (onnxruntime)"),
    "gguf": ("application/octet-stream", "mixq-{id}.gguf", "the GGUF model, a GGML type per tensor (llama.cpp)"),
    "safetensors": ("application/octet-stream", "mixq-{id}.safetensors", "the torch weights (with plan.json)"),
}


@router.get("/{job_id}/artifact", responses={
    200: {"content": {media: {} for media, _, _ in ARTIFACT_FORMATS.values()},
          "description": "; ".join(f"{name}: {what}" for name, (_, _, what) in ARTIFACT_FORMATS.items())},
    **errors(404, 409, 410)})
async def get_artifact(job_id: str, session: SessionDep, tenant: TenantDep,
                       format: Literal["bundle", "onnx", "safetensors", "gguf"] = "bundle"):
    job = owned_job(job_id, session, tenant)
    _succeeded(job, "artifact")
    artifact = session.scalar(select(Artifact).where(Artifact.job_id == job.id, Artifact.kind == format))
    if artifact is None:
        onnx = (job.report or {}).get("exports", {}).get("onnx") or {}
        why = (onnx.get("error") or onnx.get("skipped")) if format == "onnx" else None
        raise HTTPException(404, f"this job has no {format} artifact" + (f": {why}" if why else ""))
    if not Path(artifact.path).is_file():  # removed from storage (retention, a lost volume) after the job ended
        raise HTTPException(410, "this job's artifact is no longer stored on the server; run the job again")
    media, name, _ = ARTIFACT_FORMATS[format]
    return FileResponse(artifact.path, media_type=media, filename=name.format(id=job.id),
                        headers={"X-Content-SHA256": artifact.sha256})


@router.post("/{job_id}/cancel", response_model=JobOut, responses=errors(404, 409))
def cancel_job(job_id: str, session: SessionDep, tenant: TenantDep, background: BackgroundTasks) -> JobOut:
    """A plain def: its write may wait for a lock, which must never hold up the event loop; the ended job's
    webhook is queued after the answer is sent, for the housekeeping worker to deliver."""
    job = owned_job(job_id, session, tenant)
    try:
        ended = jobs.cancel(session, job)
    except ValueError as exc:
        raise HTTPException(409, str(exc)) from None
    if ended:
        background.add_task(jobs.notify_ended, job.id)
    return job_out(job)
