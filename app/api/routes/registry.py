"""/v1/registry: models watched and re-compressed on a schedule. Scoped to the tenant like jobs."""

from __future__ import annotations

from fastapi import APIRouter, Depends, HTTPException, Query, Response
from sqlalchemy import select
from sqlalchemy.orm import Session

from app import registry
from app.api.deps import current_tenant
from app.api.routes.jobs import check_local_paths
from app.db import get_session
from app.models import RegistryEntry, Tenant, utcnow
from app.schemas import JobCreate, RegistryCreate, RegistryOut, RegistryPatch, RunOut

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


def owned_entry(entry_id: str, session: Session, tenant: Tenant) -> RegistryEntry:
    entry = session.scalar(select(RegistryEntry).where(RegistryEntry.id == entry_id,
                                                       RegistryEntry.tenant_id == tenant.id))
    if entry is None:
        raise HTTPException(404, f"registry entry {entry_id} not found")
    return entry


@router.post("", status_code=201, response_model=RegistryOut)
def register(body: RegistryCreate, response: Response, session: Session = Depends(get_session),
             tenant: Tenant = Depends(current_tenant)) -> RegistryOut:
    check_local_paths(body)
    now = utcnow()
    entry = RegistryEntry(tenant_id=tenant.id, model=body.model, request=body.job_request(),
                          schedule=body.schedule.to_dict(), paused=body.paused,
                          next_run_at=registry.next_run(body.schedule.to_dict(), now), webhook_url=body.webhook_url,
                          regression_threshold=body.regression_threshold)
    session.add(entry)
    session.commit()
    response.headers["Location"] = f"/v1/registry/{entry.id}"
    return entry_out(entry)


@router.get("", response_model=list[RegistryOut])
def list_entries(session: Session = Depends(get_session), tenant: Tenant = Depends(current_tenant)):
    entries = session.scalars(select(RegistryEntry).where(RegistryEntry.tenant_id == tenant.id)
                              .order_by(RegistryEntry.created_at))
    return [entry_out(e) for e in entries]


@router.get("/{entry_id}", response_model=RegistryOut)
def get_entry(entry_id: str, session: Session = Depends(get_session), tenant: Tenant = Depends(current_tenant)):
    return entry_out(owned_entry(entry_id, session, tenant))


@router.patch("/{entry_id}", response_model=RegistryOut)
def patch_entry(entry_id: str, body: RegistryPatch, session: Session = Depends(get_session),
                tenant: Tenant = Depends(current_tenant)) -> RegistryOut:
    entry = owned_entry(entry_id, session, tenant)
    changes = body.model_dump(mode="json", exclude_unset=True)
    if "schedule" in changes:
        entry.schedule = body.schedule.to_dict()
        entry.next_run_at = registry.next_run(entry.schedule, utcnow())
    for name in ("regression_threshold", "webhook_url"):
        if name in changes:
            setattr(entry, name, changes[name])
    options = {k: v for k, v in changes.items() if k not in ("schedule", "regression_threshold", "webhook_url")}
    if options:  # re-validate the whole job request, so a patch can never store an invalid one
        entry.request = JobCreate(**{**entry.request, **options}).model_dump(mode="json", exclude={"webhook_url"})
    session.commit()
    return entry_out(entry)


@router.delete("/{entry_id}", status_code=204)
def delete_entry(entry_id: str, session: Session = Depends(get_session), tenant: Tenant = Depends(current_tenant)):
    session.delete(owned_entry(entry_id, session, tenant))
    session.commit()
    return Response(status_code=204)


def _set_paused(entry_id: str, paused: bool, session: Session, tenant: Tenant) -> RegistryOut:
    entry = owned_entry(entry_id, session, tenant)
    entry.paused = paused
    if not paused:  # resuming does not replay the firings missed while paused
        entry.next_run_at = registry.next_run(entry.schedule, utcnow())
    session.commit()
    return entry_out(entry)


@router.post("/{entry_id}/pause", response_model=RegistryOut)
def pause(entry_id: str, session: Session = Depends(get_session), tenant: Tenant = Depends(current_tenant)):
    return _set_paused(entry_id, True, session, tenant)


@router.post("/{entry_id}/resume", response_model=RegistryOut)
def resume(entry_id: str, session: Session = Depends(get_session), tenant: Tenant = Depends(current_tenant)):
    return _set_paused(entry_id, False, session, tenant)


@router.post("/{entry_id}/run", response_model=RunOut)
def run_now(entry_id: str, force: bool = Query(False, description="enqueue even if nothing changed"),
            session: Session = Depends(get_session), tenant: Tenant = Depends(current_tenant)) -> RunOut:
    from worker.tasks import enqueue

    entry = owned_entry(entry_id, session, tenant)
    run, job = registry.fire(session, entry, utcnow(), "manual", force=force)
    session.commit()
    if job is not None:
        enqueue(job.id, job.priority)
    session.refresh(entry)
    return next(RunOut(**row) for row in registry.history(session, entry) if row["run_id"] == run.id)


@router.get("/{entry_id}/history", response_model=list[RunOut])
def get_history(entry_id: str, session: Session = Depends(get_session), tenant: Tenant = Depends(current_tenant)):
    return [RunOut(**row) for row in registry.history(session, owned_entry(entry_id, session, tenant))]
