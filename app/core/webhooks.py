"""Webhook notifications: allow-listed targets only, signed per tenant with a timestamp, delivered in the
background by the housekeeping worker (never on a request's path or a compression worker) and retried with
backoff; one attempt gives up after `webhook_timeout_seconds` in all, however slowly the receiver answers.

Each tenant signs with its own secret, derived from the operator's `MIXQ_WEBHOOK_SECRET` (HMAC of the
tenant id), so no tenant can forge another's events; `GET /v1/webhooks/secret` gives a tenant its own.
The header is `X-Mixq-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">`: a receiver
recomputes it and refuses a `t` older than `REPLAY_WINDOW_SECONDS`, so a captured delivery cannot be
replayed later. Every attempt (retries included) is signed afresh.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import re
import time
import uuid
from urllib.parse import urlsplit

import httpx

from . import queue
from .settings import Settings, get_settings

log = logging.getLogger("mixq.webhooks")
SIGNATURE_HEADER = "X-Mixq-Signature"
REPLAY_WINDOW_SECONDS = 300
CONTROL_CHARACTERS = r"\x00-\x1f\x7f"  # a regex class body, shared with the API schema's pattern
_UNSAFE = re.compile(rf"[\s{CONTROL_CHARACTERS}]")
DEFAULT_PORTS = {"http": 80, "https": 443}


def allowed_targets(allowlist: str) -> set[tuple[str, int | None]]:
    """`host`, `host:port`, `[v6]`, `[v6]:port` or a bare IPv6 address -> (host, port or None for any)."""
    targets = set()
    for entry in filter(None, (raw.strip().lower() for raw in allowlist.split(","))):
        if entry.startswith("["):
            host, _, port = entry[1:].partition("]")
            port = port.removeprefix(":")
        elif entry.count(":") == 1:
            host, port = entry.split(":")
        else:  # a name, an IPv4 address or a bare IPv6 address
            host, port = entry, ""
        if port and not port.isdigit():
            log.warning("ignoring malformed webhook allow-list entry %r", entry)
            continue
        targets.add((host, int(port) if port else None))
    return targets


def check_target(url: str, settings: Settings | None = None) -> str:
    """Raise ValueError unless the operator allows webhooks and `url` is on the allow-list."""
    settings = settings or get_settings()
    if _UNSAFE.search(url):
        raise ValueError("webhook_url must not contain whitespace or control characters")
    parts = urlsplit(url)
    try:
        port = parts.port or DEFAULT_PORTS.get(parts.scheme)
    except ValueError:
        raise ValueError("webhook_url has an invalid port") from None
    if parts.scheme not in DEFAULT_PORTS or not parts.hostname:
        raise ValueError("webhook_url must be an http(s) URL")
    if not settings.webhook_secret:
        raise ValueError("webhooks are disabled: the operator has not set MIXQ_WEBHOOK_SECRET")
    allowed = allowed_targets(settings.webhook_allowlist)
    host = parts.hostname.lower()
    if (host, None) not in allowed and (host, port) not in allowed:
        raise ValueError(f"webhook host {parts.netloc!r} is not on the operator's allow-list (MIXQ_WEBHOOK_ALLOWLIST)")
    return url


def tenant_secret(tenant_id: int, settings: Settings | None = None) -> str:
    settings = settings or get_settings()
    return hmac.new(settings.webhook_secret.encode(), f"mixq-webhook-tenant:{tenant_id}".encode(),
                    hashlib.sha256).hexdigest()


def sign(body: bytes, secret: str, timestamp: int) -> str:
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def post(url: str, event: str, payload: dict, delivery_id: str, tenant_id: int,
         settings: Settings | None = None) -> None:
    """One delivery attempt; raises on a network error, a non-2xx answer, or past the overall deadline (a
    receiver trickling its answer a byte at a time would otherwise reset a per-read timeout forever)."""
    settings = settings or get_settings()
    check_target(url, settings)  # the allow-list may have changed since registration
    body = json.dumps({"event": event, "delivery": delivery_id, **payload}, default=str).encode()
    signature = sign(body, tenant_secret(tenant_id, settings), int(time.time()))
    headers = {"Content-Type": "application/json", "X-Mixq-Event": event, "X-Mixq-Delivery": delivery_id,
               SIGNATURE_HEADER: signature}
    deadline = settings.webhook_timeout_seconds

    async def attempt() -> httpx.Response:
        async with httpx.AsyncClient(timeout=deadline) as client:
            return await client.post(url, content=body, headers=headers)

    try:
        response = asyncio.run(asyncio.wait_for(attempt(), deadline))
    except TimeoutError:
        raise httpx.TimeoutException(f"no complete answer within {deadline:g} s") from None
    response.raise_for_status()


def send(url: str | None, event: str, payload: dict, tenant_id: int) -> None:
    """Hand the delivery to the housekeeping worker; a broker that cannot take it is logged, and nothing
    waits on the receiver."""
    if not url:
        return
    try:
        queue.send(queue.DELIVER_WEBHOOK, [url, event, payload, str(uuid.uuid4()), tenant_id])
    except Exception:
        log.warning("could not queue webhook %s to %s", event, url, exc_info=True)
