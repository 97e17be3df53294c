"""Webhook notifications: allow-listed targets only, HMAC-SHA256 signed, retried with backoff."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import uuid
from urllib.parse import urlsplit

import httpx

from . import queue
from .settings import Settings, get_settings

log = logging.getLogger("mixq.webhooks")
SIGNATURE_HEADER = "X-Mixq-Signature"


def check_target(url: str, settings: Settings | None = None) -> str:
    """Raise ValueError unless the operator allows webhooks and `url` is on the allow-list."""
    settings = settings or get_settings()
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("webhook_url must be an http(s) URL")
    if not settings.webhook_secret:
        raise ValueError("webhooks are disabled: the operator has not set MIXQ_WEBHOOK_SECRET")
    allowed = {entry.strip().lower() for entry in settings.webhook_allowlist.split(",") if entry.strip()}
    host = parts.hostname.lower()
    if host not in allowed and f"{host}:{parts.port}" not in allowed:
        raise ValueError(f"webhook host {parts.netloc!r} is not on the operator's allow-list (MIXQ_WEBHOOK_ALLOWLIST)")
    return url


def sign(body: bytes, secret: str) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def post(url: str, event: str, payload: dict, delivery_id: str, settings: Settings | None = None) -> None:
    """One delivery attempt; raises on a network error or a non-2xx answer."""
    settings = settings or get_settings()
    check_target(url, settings)  # the allow-list may have changed since registration
    body = json.dumps({"event": event, "delivery": delivery_id, **payload}, default=str).encode()
    response = httpx.post(url, content=body, timeout=10, headers={
        "Content-Type": "application/json", "X-Mixq-Event": event, "X-Mixq-Delivery": delivery_id,
        SIGNATURE_HEADER: sign(body, settings.webhook_secret)})
    response.raise_for_status()


def send(url: str | None, event: str, payload: dict) -> None:
    """Try once now; on failure hand the delivery to the retrying Celery task."""
    if not url:
        return
    delivery_id = str(uuid.uuid4())
    try:
        post(url, event, payload, delivery_id)
    except ValueError as exc:
        log.warning("webhook %s to %s refused: %s", event, url, exc)
    except httpx.HTTPError as exc:
        log.info("webhook %s to %s failed (%s); retrying in the background", event, url, exc)
        queue.send(queue.DELIVER_WEBHOOK, [url, event, payload, delivery_id], countdown=5)
