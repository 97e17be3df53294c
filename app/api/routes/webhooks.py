"""/v1/webhooks: what a tenant needs to verify the deliveries it receives."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException

from app.api.deps import TenantDep
from app.api.openapi import ErrorOut, errors
from app.core import webhooks
from app.core.schemas import WebhookSecretOut
from app.core.settings import get_settings

router = APIRouter(prefix="/v1/webhooks", tags=["webhooks"], responses=errors(401))


@router.get("/secret", response_model=WebhookSecretOut, responses={
    404: {"description": "webhooks are disabled on this server", "model": ErrorOut}})
async def get_secret(tenant: TenantDep) -> WebhookSecretOut:
    """This tenant's signing secret: recompute `v1` over `<t>.<body>` and refuse stale `t`."""
    if not get_settings().webhook_secret:
        raise HTTPException(404, "webhooks are disabled: the operator has not set MIXQ_WEBHOOK_SECRET")
    return WebhookSecretOut(secret=webhooks.tenant_secret(tenant.id), header=webhooks.SIGNATURE_HEADER,
                            scheme='t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>" with this secret>',
                            replay_window_seconds=webhooks.REPLAY_WINDOW_SECONDS)
