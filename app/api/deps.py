"""Request dependencies: the database session and the calling tenant."""

from __future__ import annotations

from fastapi import Depends, HTTPException, Request
from sqlalchemy.orm import Session

from app.auth import LOCAL_TENANT, get_or_create_tenant, tenant_for_key
from app.db import get_session
from app.models import Tenant


def _key_from(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    if header.lower().startswith("bearer "):
        return header[7:].strip()
    return request.headers.get("x-api-key")


def current_tenant(request: Request, session: Session = Depends(get_session)) -> Tenant:
    if request.app.state.auth_disabled:
        tenant = get_or_create_tenant(session, LOCAL_TENANT)
        session.commit()
        return tenant
    key = _key_from(request)
    if not key:
        raise HTTPException(401, "missing API key: send 'Authorization: Bearer <key>' (mixq keys create)",
                            headers={"WWW-Authenticate": "Bearer"})
    tenant = tenant_for_key(session, key)
    if tenant is None:
        raise HTTPException(401, "invalid or revoked API key", headers={"WWW-Authenticate": "Bearer"})
    return tenant
