"""API keys: random tokens shown once; only their SHA-256 is stored (they are high-entropy, so no KDF).

A key's tenant is looked up once and remembered by the process for `key_cache_seconds` (default 5):
a poll costs no key query, and a revoked key stops working everywhere within that time.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
import time
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from .db import session_scope
from .models import ApiKey, Tenant, utcnow
from .settings import get_settings

LOCAL_TENANT = "local"  # owner of every job when auth is disabled (embedded default on localhost)


@dataclass(frozen=True)
class CallerTenant:
    """Who is calling: plain data, safe to remember across requests (an ORM object is not)."""

    id: int
    name: str


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


def list_keys(session: Session, tenant_name: str | None = None) -> list[dict]:
    query = select(ApiKey.prefix, Tenant.name, ApiKey.created_at, ApiKey.revoked_at).join(Tenant)
    if tenant_name:
        query = query.where(Tenant.name == tenant_name)
    return [row._asdict() for row in session.execute(query.order_by(ApiKey.created_at))]


def revoke_key(session: Session, key_or_prefix: str) -> str:
    """Revoke one key, named by the prefix `keys list` shows or by the key itself; returns its tenant's name.
    Processes that remember it stop accepting it within `key_cache_seconds`."""
    match = (ApiKey.key_hash == hash_key(key_or_prefix)) if len(key_or_prefix) > 16 else (
        ApiKey.prefix == key_or_prefix)
    found = session.execute(select(ApiKey, Tenant.name).join(Tenant).where(match, ApiKey.revoked_at.is_(None))).all()
    if len(found) != 1:
        raise LookupError(f"no active key with prefix {key_or_prefix!r}" if not found else
                          f"{len(found)} active keys share the prefix {key_or_prefix!r}: give the whole key")
    key, tenant_name = found[0]
    key.revoked_at = utcnow()
    return tenant_name


class _Remembered:
    """A small time-limited memo of lookups, shared by the request threads of one process."""

    def __init__(self):
        self.entries: dict[str, tuple[float, CallerTenant | None]] = {}
        self.lock = threading.Lock()

    def get(self, key: str, lookup) -> CallerTenant | None:
        now = time.monotonic()
        with self.lock:
            found = self.entries.get(key)
        if found is not None and found[0] > now:
            return found[1]
        value = lookup()
        with self.lock:
            if len(self.entries) > 10_000:  # bounded: drop everything rather than grow on junk keys
                self.entries.clear()
            self.entries[key] = (now + get_settings().key_cache_seconds, value)
        return value


_remembered = _Remembered()


def tenant_for_key(key: str) -> CallerTenant | None:
    """The key's tenant; a database session only when the process does not remember the key, so a request that
    needs no other query (the poll) opens none for its caller."""
    def lookup():
        with session_scope() as session:
            row = session.execute(select(Tenant.id, Tenant.name).join(ApiKey, ApiKey.tenant_id == Tenant.id).where(
                ApiKey.key_hash == digest, ApiKey.revoked_at.is_(None))).first()
        return CallerTenant(*row) if row else None

    digest = hash_key(key)
    return _remembered.get(digest, lookup)


def local_tenant() -> CallerTenant:
    def lookup():
        with session_scope() as session:
            tenant = get_or_create_tenant(session, LOCAL_TENANT)
            session.flush()
            return CallerTenant(tenant.id, tenant.name)

    return _remembered.get(f"tenant:{LOCAL_TENANT}", lookup)


def may_use_hub_token(session: Session, tenant_id: int) -> bool:
    """Whether the operator lets this tenant's jobs use the workers' HF_TOKEN (MIXQ_HF_TOKEN_TENANTS)."""
    allowed = {name.strip() for name in get_settings().hf_token_tenants.split(",") if name.strip()}
    return bool(allowed) and session.scalar(select(Tenant.name).where(Tenant.id == tenant_id)) in allowed
