"""Engine and sessions. One engine per process, created lazily from the settings."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from functools import lru_cache

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from .settings import get_settings


# Enough connections for a process's concurrent requests, so none is opened and closed per request.
POOL = {"pool_size": 10, "max_overflow": 20}


@lru_cache
def get_engine(url: str | None = None) -> Engine:
    url = url or get_settings().database_url
    if url.startswith("sqlite"):
        from pathlib import Path

        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30}, **POOL)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(connection, _record):  # API and worker processes share the file
            cursor = connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")  # WAL-safe: a crash loses nothing committed, no fsync per commit
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        return engine
    return create_engine(url, pool_pre_ping=True, **POOL)


@lru_cache
def _sessionmaker(url: str | None = None) -> sessionmaker:
    return sessionmaker(bind=get_engine(url), expire_on_commit=False)


@contextmanager
def session_scope() -> Iterator[Session]:
    """A short transaction: commit on success, roll back on error."""
    session = _sessionmaker()()
    try:
        yield session
        session.commit()
    except Exception:
        session.rollback()
        raise
    finally:
        session.close()


async def get_session() -> AsyncIterator[Session]:
    """FastAPI dependency. A plain (synchronous) session, used from `async def` endpoints: their queries
    take a fraction of a millisecond, far less than handing each request to a thread and back."""
    session = _sessionmaker()()
    try:
        yield session
    finally:
        session.close()
