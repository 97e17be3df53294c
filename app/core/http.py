"""What one API process keeps open, so that connections that send nothing cannot take it down.

uvicorn's h11 protocol arms no timer before a connection's first request, and its `limit_concurrency` counts
every open connection: 200 sockets that never send a request line made every other client get 503 for as
long as they stayed open. Here a connection has `header_timeout` seconds to deliver a complete request head
(first request or the next one on a kept-alive connection; the body has its own deadline, app/main.py) or it
is closed, and the cap counts requests being served, not connections: an idle socket costs a file descriptor
until its timer fires, never another client's turn.
"""

from __future__ import annotations

import asyncio

import h11
from starlette.responses import JSONResponse
from uvicorn.protocols.http.h11_impl import H11Protocol

from .settings import get_settings


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline on each request head (MIXQ_HEADER_TIMEOUT_SECONDS). A plain
    module-level class: `mixq serve --workers N` pickles its server config into each process."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.header_timeout = get_settings().header_timeout_seconds
        self.head_timer: asyncio.TimerHandle | None = None
        self._arm_head_timer()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        # A head arrived in full once h11 has left IDLE for this request: the app (and its body deadline) has it.
        if self.conn.their_state is not h11.IDLE:
            self._disarm_head_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():  # kept alive: the next request's head has its own deadline
            self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_timer()
        super().connection_lost(exc)

    def _arm_head_timer(self) -> None:
        self._disarm_head_timer()
        self.head_timer = self.loop.call_later(self.header_timeout, self._head_timed_out)

    def _disarm_head_timer(self) -> None:
        if getattr(self, "head_timer", None) is not None:
            self.head_timer.cancel()
            self.head_timer = None

    def _head_timed_out(self) -> None:
        self.head_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()


class InFlightLimit:
    """At most `limit` requests served at once by this process (503 beyond, at once): the cap that
    uvicorn's `limit_concurrency` meant, counting requests instead of open connections."""

    def __init__(self, app, limit: int):
        self.app, self.limit, self.active = app, limit, 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.active >= self.limit:
            busy = JSONResponse({"detail": "the server is at its limit of requests in flight; retry shortly"}, 503,
                                headers={"Retry-After": "1"})
            return await busy(scope, receive, send)
        self.active += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.active -= 1
