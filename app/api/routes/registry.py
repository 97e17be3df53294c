"""/v1/registry: models watched and re-compressed on a schedule. Scoped to the tenant like jobs."""

from __future__ import annotations

from fastapi import APIRouter, BackgroundTasks, HTTPException, Query, Response
from sqlalchemy import and_, or_, select

from app.api.deps import SessionDep, TenantDep
from app.api.openapi import errors, invalid, links
from app.api.routes.jobs import (check_input_size, check_local_paths, decode_cursor, encode_cursor, too_many,
                                 validated_request)
from app.core import jobs, registry
from app.core.auth import CallerTenant, may_use_hub_token
from app.core.history import history, rows
from app.core.models import RegistryEntry, RegistryRun, utcnow
from app.core.schemas import (RegistryCreate, RegistryList, RegistryOut, RegistryPatch, RegistrySettings,
                              RunList, RunOut)

router = APIRouter(prefix="/v1/registry", tags=["registry"], responses=errors(400, 401, 408))
ENTRY_OPERATIONS = ("get_entry", "patch_entry", "delete_entry", "pause", "resume", "run_now", "get_history")


def entry_out(session, entry: RegistryEntry) -> RegistryOut:
    base = f"/v1/registry/{entry.id}"
    latest = select(RegistryRun).where(RegistryRun.entry_id == entry.id).order_by(RegistryRun.id.desc()).limit(1)
    last = session.scalar(latest)
    resolved = session.scalar(latest.where(RegistryRun.revision.is_not(None)))
    return RegistryOut(
        id=entry.id, model=entry.model, request=entry.request, schedule=entry.schedule, paused=entry.paused,
        next_run_at=entry.next_run_at, webhook_url=entry.webhook_url, regression_threshold=entry.regression_threshold,
        last_revision=resolved.revision if resolved else None,
        last_run_at=last.fired_at if last else None, created_at=entry.created_at,
        links={"self": base, "history": f"{base}/history", "run": f"{base}/run", "pause": f"{base}/pause",
               "resume": f"{base}/resume"})


def owned_entry(entry_id: str, session, tenant: CallerTenant, lock: bool = False) -> RegistryEntry:
    """The tenant's entry, or 404. A write takes the entry's row lock first (`lock`), so writes to one entry
    run one after another: a second DELETE finds it gone (404) instead of deadlocking with the first, and a
    PATCH or pause never updates a row a DELETE removed under it."""
    query = select(RegistryEntry).where(RegistryEntry.id == entry_id, RegistryEntry.tenant_id == tenant.id)
    entry = session.scalar(query.with_for_update() if lock else query)
    if entry is None:
        raise HTTPException(404, f"registry entry {entry_id} not found")
    return entry


@router.post("", status_code=201, response_model=RegistryOut, responses={
    201: {"links": links("entry_id", "$response.body#/id", *ENTRY_OPERATIONS)}, **errors(413)})
def register(body: RegistryCreate, response: Response, session: SessionDep, tenant: TenantDep) -> RegistryOut:
    check_local_paths(body)
    check_input_size(body)
    try:
        registry.check_entry_quota(session, tenant.id)
    except registry.EntryQuotaExceeded as exc:
        raise invalid(("body",), str(exc)) from None
    schedule = body.schedule.to_dict()
    entry = RegistryEntry(tenant_id=tenant.id, model=body.model, request=body.job_request(), schedule=schedule,
                          paused=body.paused, next_run_at=registry.next_run(schedule, utcnow()),
                          webhook_url=body.webhook_url, regression_threshold=body.regression_threshold)
    session.add(entry)
    session.commit()
    response.headers["Location"] = f"/v1/registry/{entry.id}"
    return entry_out(session, entry)


@router.get("", response_model=RegistryList)
def list_entries(session: SessionDep, tenant: TenantDep, limit: int = Query(20, ge=1, le=100),
                       cursor: str | None = Query(None, max_length=200)) -> RegistryList:
    """Oldest first, a page at a time: pass `next_cursor` back as `cursor`."""
    query = select(RegistryEntry).where(RegistryEntry.tenant_id == tenant.id)
    if cursor:
        created, entry_id = decode_cursor(cursor)
        query = query.where(or_(RegistryEntry.created_at > created,
                                and_(RegistryEntry.created_at == created, RegistryEntry.id > entry_id)))
    found = list(session.scalars(query.order_by(RegistryEntry.created_at, RegistryEntry.id).limit(limit + 1)))
    next_cursor = encode_cursor(found[limit - 1].created_at, found[limit - 1].id) if len(found) > limit else None
    return RegistryList(entries=[entry_out(session, e) for e in found[:limit]], next_cursor=next_cursor)


@router.get("/{entry_id}", response_model=RegistryOut, responses=errors(404))
async def get_entry(entry_id: str, session: SessionDep, tenant: TenantDep):
    return entry_out(session, owned_entry(entry_id, session, tenant))


@router.patch("/{entry_id}", response_model=RegistryOut, responses=errors(404))
def patch_entry(entry_id: str, body: RegistryPatch, session: SessionDep, tenant: TenantDep) -> RegistryOut:
    entry = owned_entry(entry_id, session, tenant, lock=True)
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
    if options:  # the whole job request, validated exactly as on creation, so a patch never stores an invalid one
        merged = validated_request({**entry.request, **options})
        check_input_size(merged)  # the size a model's own config implies, as POST checks it
        entry.request = merged.model_dump(mode="json", exclude={"webhook_url"})
    session.commit()
    return entry_out(session, entry)


@router.delete("/{entry_id}", status_code=204, responses=errors(404))
def delete_entry(entry_id: str, session: SessionDep, tenant: TenantDep):
    session.delete(owned_entry(entry_id, session, tenant, lock=True))
    session.commit()
    return Response(status_code=204)


def _pause(entry: RegistryEntry, paused: bool) -> None:
    entry.paused = paused
    if not paused:  # resuming does not replay the firings missed while paused
        entry.next_run_at = registry.next_run(entry.schedule, utcnow())


def _set_paused(entry_id: str, paused: bool, session, tenant: CallerTenant) -> RegistryOut:
    entry = owned_entry(entry_id, session, tenant, lock=True)
    _pause(entry, paused)
    session.commit()
    return entry_out(session, entry)


@router.post("/{entry_id}/pause", response_model=RegistryOut, responses=errors(404))
def pause(entry_id: str, session: SessionDep, tenant: TenantDep):
    return _set_paused(entry_id, True, session, tenant)


@router.post("/{entry_id}/resume", response_model=RegistryOut, responses=errors(404))
def resume(entry_id: str, session: SessionDep, tenant: TenantDep):
    return _set_paused(entry_id, False, session, tenant)


@router.post("/{entry_id}/run", response_model=RunOut, responses={
    200: {"links": links("job_id", "$response.body#/job_id", "get_job", "cancel_job")}, **errors(404, 429)})
def run_now(entry_id: str, session: SessionDep, tenant: TenantDep, background: BackgroundTasks,
            force: bool = Query(False, description="enqueue even if nothing changed")) -> RunOut:
    entry = owned_entry(entry_id, session, tenant)
    try:  # an early answer; the firing checks again under the tenant's lock
        jobs.check_quota(session, tenant.id, lock=False)
    except jobs.QuotaExceeded as exc:
        raise too_many(exc) from None
    # Before any lock, and in a worker thread (a plain def): a Hub lookup can take a while.
    revision = registry.current_revision(entry, may_use_hub_token(session, tenant.id))
    try:
        run, job = registry.fire(session, entry, utcnow(), "manual", revision, force=force)
    except registry.EntryGone:
        raise HTTPException(404, f"registry entry {entry_id} not found") from None
    session.commit()
    if job is not None:  # published after the response, as for POST /v1/jobs
        background.add_task(jobs.publish, job.id, job.priority)
    return RunOut(**rows(session, entry, [run])[0])


@router.get("/{entry_id}/history", response_model=RunList, responses=errors(404))
def get_history(entry_id: str, session: SessionDep, tenant: TenantDep, limit: int = Query(50, ge=1, le=500),
                      cursor: int | None = Query(None, ge=0, le=2**31 - 1,
                                                 description="next_cursor of the previous page")) -> RunList:
    """Newest first, each successful run with its deltas to the one before it."""
    found, next_cursor = history(session, owned_entry(entry_id, session, tenant), limit, cursor)
    return RunList(runs=[RunOut(**row) for row in found], next_cursor=next_cursor)
