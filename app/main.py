"""The FastAPI application: jobs API under /v1, health and metrics, OpenAPI at /docs."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from app.api.routes import health, jobs, models, registry
from app.core.settings import get_settings

STATIC = Path(__file__).parent / "static"


class BodyLimit:
    """Refuses request bodies over the limit with 413, whether or not Content-Length is sent.

    Bodies are small (job requests), so the whole body is read here first, then replayed to the app.
    """

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = JSONResponse({"detail": f"request body too large: the limit is {self.limit} bytes"}, 413)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await too_large(scope, receive, send)
        messages, size = [], 0
        while True:
            message = await receive()
            messages.append(message)
            size += len(message.get("body", b""))
            if size > self.limit:
                return await too_large(scope, receive, send)
            if message["type"] != "http.request" or not message.get("more_body"):
                break

        async def replay():
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)


def create_app(auth_disabled: bool = False) -> FastAPI:
    """The app requires API keys unless told otherwise by `mixq serve`, the one caller that knows the
    address it binds to; the uvicorn factory used in production always gets keys."""
    settings = get_settings()
    app = FastAPI(title="mixq", version="1", description="Fastest mixed-precision model within an accuracy budget")
    app.state.auth_disabled = auth_disabled
    app.include_router(jobs.router)
    app.include_router(models.router)
    app.include_router(registry.router)
    app.include_router(health.router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    def dashboard() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    return app
