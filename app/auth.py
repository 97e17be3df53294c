"""API keys: random tokens shown once; only their SHA-256 is stored (they are high-entropy, so no KDF)."""

from __future__ import annotations

import hashlib
import secrets

from sqlalchemy import select
from sqlalchemy.orm import Session

from .models import ApiKey, Tenant

LOCAL_TENANT = "local"  # owner of every job when auth is disabled (embedded default on localhost)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def get_or_create_tenant(session: Session, name: str) -> Tenant:
    tenant = session.scalar(select(Tenant).where(Tenant.name == name))
    if tenant is None:
        tenant = Tenant(name=name)
        session.add(tenant)
        session.flush()
    return tenant


def create_key(session: Session, tenant_name: str) -> str:
    key = "mixq_" + secrets.token_urlsafe(32)
    tenant = get_or_create_tenant(session, tenant_name)
    session.add(ApiKey(tenant_id=tenant.id, prefix=key[:12], key_hash=hash_key(key)))
    return key


def tenant_for_key(session: Session, key: str) -> Tenant | None:
    api_key = session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(key), ApiKey.revoked_at.is_(None)))
    return api_key.tenant if api_key else None
