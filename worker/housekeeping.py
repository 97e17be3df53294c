"""The housekeeping tasks: sweeps and registry ticks, on their own queue, consumed by their own small worker
(`mixq worker --housekeeping`, which also runs beat), so none of them waits behind a compression job; and
webhook deliveries, on a queue of their own consumed by `mixq worker --webhooks`, so no sweep or tick ever
waits on a receiver, and no compression worker either. Torch-free: it imports only the core."""

from __future__ import annotations

import httpx

from app.core import jobs, queue, registry, webhooks
from app.core.logs import quiet_library_noise

quiet_library_noise()

app = queue.make_celery()


@app.task(name=queue.SWEEP)
def sweep() -> None:
    jobs.sweep()


@app.task(name=queue.REGISTRY_TICK)
def registry_tick() -> None:
    registry.tick()


@app.task(name=queue.DELIVER_WEBHOOK, autoretry_for=(httpx.HTTPError,), retry_backoff=5, retry_backoff_max=600,
          retry_jitter=True, max_retries=8)
def deliver_webhook(url: str, event: str, payload: dict, delivery_id: str, tenant_id: int) -> None:
    webhooks.post(url, event, payload, delivery_id, tenant_id)
