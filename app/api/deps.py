"""Request dependencies: the database session and the calling tenant, as `Annotated` aliases."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, HTTPException, Request
from sqlalchemy.orm import Session

from app.core.auth import LOCAL_TENANT, CallerTenant, local_tenant, tenant_for_key
from app.core.db import get_session

SessionDep = Annotated[Session, Depends(get_session)]


def _key_from(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    if header.lower().startswith("bearer "):
        return header[7:].strip()
    return request.headers.get("x-api-key")


async def current_tenant(request: Request) -> CallerTenant:
    if request.app.state.auth_disabled:
        return local_tenant()
    key = _key_from(request)
    if not key:
        raise HTTPException(401, "missing API key: send 'Authorization: Bearer <key>' (mixq keys create)",
                            headers={"WWW-Authenticate": "Bearer"})
    tenant = tenant_for_key(key)
    if tenant is None:
        raise HTTPException(401, "invalid or revoked API key", headers={"WWW-Authenticate": "Bearer"})
    return tenant


TenantDep = Annotated[CallerTenant, Depends(current_tenant)]

__all__ = ["LOCAL_TENANT", "SessionDep", "TenantDep", "current_tenant"]
