"""The FastAPI application: jobs API under /v1, health and metrics, OpenAPI at /docs."""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path
from urllib.parse import unquote

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.routing import Match, Route

from app.api.routes import health, jobs, models, registry, webhooks
from app.core.http import InFlightLimit
from app.core.settings import Settings, get_settings

LOOPBACK_HOSTS = ["127.0.0.1", "localhost", "[::1]"]

STATIC = Path(__file__).parent / "static"


class BodyLimit:
    """What a request may carry before any route sees it, answered with a 4xx instead of a 500 or a stall:

    - a body over `limit` bytes (413), whether or not Content-Length is sent;
    - a body that has not fully arrived after `timeout` seconds (408): a client trickling its body a byte at
      a time holds a connection no longer than that;
    - a NUL byte in the path or query (400): no id, filter or cursor contains one, and PostgreSQL would refuse
      it in a query;
    - JSON nested deeper than `MAX_JSON_DEPTH` (422, in the validation errors' shape): no request needs more
      than a few levels, and deeper input exhausts the recursion of JSON encoders.

    Bodies are small (job requests), so the whole body is read here first, then replayed to the app.
    """

    def __init__(self, app, limit: int, timeout: float):
        self.app, self.limit, self.timeout = app, limit, timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if "\x00" in unquote(scope.get("raw_path", b"").decode("latin-1")) or b"%00" in scope.get("query_string", b""):
            return await JSONResponse({"detail": "NUL bytes are not allowed in a URL"}, 400)(scope, receive, send)
        too_large = JSONResponse({"detail": f"request body too large: the limit is {self.limit} bytes"}, 413)
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await too_large(scope, receive, send)
        if declared in (None, b"0") and b"transfer-encoding" not in headers:
            # No body (a poll, a GET): nothing to wait for, so no deadline task on the hot path. Timing one
            # cost the job poll a third of its throughput against /healthz (bench/load.py).
            return await self.app(scope, receive, send)
        messages, size = [], 0
        deadline = asyncio.get_running_loop().time() + self.timeout
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - asyncio.get_running_loop().time()))
            except TimeoutError:
                slow = JSONResponse({"detail": f"the request body did not arrive within {self.timeout:g} s"}, 408,
                                    headers={"Connection": "close"})
                return await slow(scope, receive, send)
            messages.append(message)
            size += len(message.get("body", b""))
            if size > self.limit:
                return await too_large(scope, receive, send)
            if message["type"] != "http.request" or not message.get("more_body"):
                break
        body = b"".join(m.get("body", b"") for m in messages)
        problem = (f"JSON nested deeper than {MAX_JSON_DEPTH} levels" if json_depth(body) > MAX_JSON_DEPTH
                   else unreadable_json(body) if _is_json(scope) else None)
        if problem:
            error = [{"type": "value_error", "loc": ["body"], "msg": problem}]
            return await JSONResponse({"detail": error}, 422)(scope, receive, send)

        async def replay():
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)


MAX_JSON_DEPTH = 32


def _is_json(scope) -> bool:
    content_type = dict(scope["headers"]).get(b"content-type", b"").split(b";")[0].strip().lower()
    return content_type == b"application/json" or content_type.endswith(b"+json")


def unreadable_json(body: bytes) -> str | None:
    """Why a JSON body cannot be read, or None. FastAPI answers 400 (not the documented 422) for the two cases
    its decoder raises something other than a JSON syntax error on: bytes that are not UTF-8, and an integer
    longer than Python converts (4,300 digits)."""
    if not body:
        return None
    try:
        json.loads(body.decode("utf-8"))
    except UnicodeDecodeError:
        return "the body is not valid UTF-8"
    except json.JSONDecodeError:
        return None  # FastAPI's own 422 says where
    except ValueError as exc:
        return f"unreadable JSON: {exc}"
    return None
_OPENERS, _CLOSERS = frozenset(b"[{"), frozenset(b"]}")


def json_depth(body: bytes) -> int:
    """How deeply brackets nest in a JSON text (outside strings), without parsing it."""
    depth = deepest = 0
    in_string = escaped = False
    for byte in body:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in _OPENERS:
            depth += 1
            deepest = max(deepest, depth)
        elif byte in _CLOSERS:
            depth -= 1
    return deepest


class EscapedJSONResponse(JSONResponse):
    """ASCII-only JSON: a 422 that echoes input holding a lone surrogate still encodes (as \\ud800)."""

    def render(self, content) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode()


def _finite(value):
    """JSON has no NaN or Infinity: an echoed non-finite input is shown as its name."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_finite(item) for item in value]
    return value


async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return EscapedJSONResponse({"detail": _finite(jsonable_encoder(exc.errors()))}, status_code=422)


async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Starlette's 405 lists only the methods of the first route on the path; list every route's."""
    if exc.status_code == 405:
        methods = {method for route in request.app.router.routes if isinstance(route, Route)
                   and route.matches(request.scope)[0] is not Match.NONE for method in route.methods or ()}
        exc.headers = {**(exc.headers or {}), "Allow": ", ".join(sorted(methods))}
    return await http_exception_handler(request, exc)


def allowed_hosts(settings: Settings, auth_disabled: bool) -> list[str]:
    """Without keys, the bind address is not enough: a page the browser loaded from attacker.example can
    rebind that name to 127.0.0.1, and only the Host header it sends still says attacker.example."""
    if settings.allowed_hosts:
        return [host.strip() for host in settings.allowed_hosts.split(",") if host.strip()]
    return LOOPBACK_HOSTS if auth_disabled else ["*"]


def create_app(auth_disabled: bool = False) -> FastAPI:
    """The app requires API keys unless told otherwise by `mixq serve`, the one caller that knows the
    address it binds to; the uvicorn factory used in production always gets keys."""
    settings = get_settings()
    # Operation ids are the route functions' names: the OpenAPI links (app.api.openapi) refer to them.
    app = FastAPI(title="mixq", version="1", description="Fastest mixed-precision model within an accuracy budget",
                  generate_unique_id_function=lambda route: route.name)
    app.state.auth_disabled = auth_disabled
    app.include_router(jobs.router)
    app.include_router(models.router)
    app.include_router(registry.router)
    app.include_router(webhooks.router)
    app.include_router(health.router)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    def dashboard() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    app.add_middleware(BodyLimit, limit=settings.max_body_bytes, timeout=settings.body_timeout_seconds)
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts(settings, auth_disabled))
    app.add_middleware(InFlightLimit, limit=settings.max_connections)
    return app
