"""/v1/registry: models watched and re-compressed on a schedule. Scoped to the tenant like jobs."""

from __future__ import annotations

from fastapi import APIRouter, BackgroundTasks, HTTPException, Query, Response
from sqlalchemy import select

from app.api.deps import SessionDep, TenantDep
from app.api.routes.jobs import check_local_paths
from app.core import jobs, registry
from app.core.auth import CallerTenant
from app.core.history import history
from app.core.models import RegistryEntry, utcnow
from app.core.schemas import JobCreate, RegistryCreate, RegistryOut, RegistryPatch, RegistrySettings, RunOut

router = APIRouter(prefix="/v1/registry", tags=["registry"])


def entry_out(entry: RegistryEntry) -> RegistryOut:
    base = f"/v1/registry/{entry.id}"
    last = entry.runs[-1] if entry.runs else None
    return RegistryOut(
        id=entry.id, model=entry.model, request=entry.request, schedule=entry.schedule, paused=entry.paused,
        next_run_at=entry.next_run_at, webhook_url=entry.webhook_url, regression_threshold=entry.regression_threshold,
        last_revision=next((r.revision for r in reversed(entry.runs) if r.revision), None),
        last_run_at=last.fired_at if last else None, created_at=entry.created_at,
        links={"self": base, "history": f"{base}/history", "run": f"{base}/run", "pause": f"{base}/pause",
               "resume": f"{base}/resume"})


def owned_entry(entry_id: str, session, tenant: CallerTenant) -> RegistryEntry:
    entry = session.scalar(select(RegistryEntry).where(RegistryEntry.id == entry_id,
                                                       RegistryEntry.tenant_id == tenant.id))
    if entry is None:
        raise HTTPException(404, f"registry entry {entry_id} not found")
    return entry


@router.post("", status_code=201, response_model=RegistryOut)
async def register(body: RegistryCreate, response: Response, session: SessionDep,
                   tenant: TenantDep) -> RegistryOut:
    check_local_paths(body)
    schedule = body.schedule.to_dict()
    entry = RegistryEntry(tenant_id=tenant.id, model=body.model, request=body.job_request(), schedule=schedule,
                          paused=body.paused, next_run_at=registry.next_run(schedule, utcnow()),
                          webhook_url=body.webhook_url, regression_threshold=body.regression_threshold)
    session.add(entry)
    session.commit()
    response.headers["Location"] = f"/v1/registry/{entry.id}"
    return entry_out(entry)


@router.get("", response_model=list[RegistryOut])
async def list_entries(session: SessionDep, tenant: TenantDep):
    entries = session.scalars(select(RegistryEntry).where(RegistryEntry.tenant_id == tenant.id)
                              .order_by(RegistryEntry.created_at))
    return [entry_out(e) for e in entries]


@router.get("/{entry_id}", response_model=RegistryOut)
async def get_entry(entry_id: str, session: SessionDep, tenant: TenantDep):
    return entry_out(owned_entry(entry_id, session, tenant))


@router.patch("/{entry_id}", response_model=RegistryOut)
async def patch_entry(entry_id: str, body: RegistryPatch, session: SessionDep,
                      tenant: TenantDep) -> RegistryOut:
    entry = owned_entry(entry_id, session, tenant)
    changes = body.model_dump(mode="json", exclude_unset=True)
    if "schedule" in changes:
        entry.schedule = body.schedule.to_dict()
        entry.next_run_at = registry.next_run(entry.schedule, utcnow())
    for name in ("regression_threshold", "webhook_url"):
        if name in changes:
            setattr(entry, name, changes[name])
    if "paused" in changes and changes["paused"] != entry.paused:
        _pause(entry, changes["paused"])
    options = {k: v for k, v in changes.items() if k not in set(RegistrySettings.model_fields) | {"webhook_url"}}
    if options:  # re-validate the whole job request, so a patch can never store an invalid one
        entry.request = JobCreate(**{**entry.request, **options}).model_dump(mode="json", exclude={"webhook_url"})
    session.commit()
    return entry_out(entry)


@router.delete("/{entry_id}", status_code=204)
async def delete_entry(entry_id: str, session: SessionDep, tenant: TenantDep):
    session.delete(owned_entry(entry_id, session, tenant))
    session.commit()
    return Response(status_code=204)


def _pause(entry: RegistryEntry, paused: bool) -> None:
    entry.paused = paused
    if not paused:  # resuming does not replay the firings missed while paused
        entry.next_run_at = registry.next_run(entry.schedule, utcnow())


def _set_paused(entry_id: str, paused: bool, session, tenant: CallerTenant) -> RegistryOut:
    entry = owned_entry(entry_id, session, tenant)
    _pause(entry, paused)
    session.commit()
    return entry_out(entry)


@router.post("/{entry_id}/pause", response_model=RegistryOut)
async def pause(entry_id: str, session: SessionDep, tenant: TenantDep):
    return _set_paused(entry_id, True, session, tenant)


@router.post("/{entry_id}/resume", response_model=RegistryOut)
async def resume(entry_id: str, session: SessionDep, tenant: TenantDep):
    return _set_paused(entry_id, False, session, tenant)


@router.post("/{entry_id}/run", response_model=RunOut)
def run_now(entry_id: str, session: SessionDep, tenant: TenantDep, background: BackgroundTasks,
            force: bool = Query(False, description="enqueue even if nothing changed")) -> RunOut:
    entry = owned_entry(entry_id, session, tenant)
    # Before any lock, and in a worker thread (a plain def): a Hub lookup can take a while.
    revision = registry.current_revision(entry)
    run, job = registry.fire(session, entry, utcnow(), "manual", revision, force=force)
    session.commit()
    if job is not None:  # published after the response, as for POST /v1/jobs
        background.add_task(jobs.publish, job.id, job.priority)
    session.refresh(entry)
    return next(RunOut(**row) for row in history(session, entry) if row["run_id"] == run.id)


@router.get("/{entry_id}/history", response_model=list[RunOut])
async def get_history(entry_id: str, session: SessionDep, tenant: TenantDep):
    return [RunOut(**row) for row in history(session, owned_entry(entry_id, session, tenant))]
