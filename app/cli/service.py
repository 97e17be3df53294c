"""`mixq serve|worker|beat|db|keys`: running the service."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from app.core.auth import create_key, list_keys, revoke_key
from app.core.db import session_scope
from app.core.migrate import upgrade
from app.core.settings import get_settings

from .arguments import positive_int


def runs_engine(args) -> bool:
    """Whether this command runs the engine here or in its children (and so needs the allocator setting)."""
    return (args.command == "worker" and args.kind == JOBS) or (args.command == "serve" and not args.no_worker)


def add_commands(commands) -> None:
    s = commands.add_parser("serve", help="API + dashboard + one worker in one command (embedded default)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=positive_int, default=8000)
    s.add_argument("--no-worker", action="store_true", help="API only (workers run elsewhere)")
    s.add_argument("--workers", type=positive_int, default=1,
                   help="API processes (one per core in production; the API loads no torch, so they are light)")
    s.set_defaults(handler=serve)

    w = commands.add_parser("worker", help="a Celery worker for compression jobs (or, --housekeeping, for sweeps "
                                           "and registry ticks; --webhooks, for webhook deliveries)")
    w.add_argument("--concurrency", type=positive_int, default=None,
                   help=f"jobs at once (default 1), or threads (housekeeping {THREADS[HOUSEKEEPING]}, webhooks "
                        f"{THREADS[WEBHOOKS]})")
    kind = w.add_mutually_exclusive_group()
    kind.add_argument("--housekeeping", action="store_const", dest="kind", const=HOUSEKEEPING, default=JOBS,
                      help="the housekeeping worker, on its own queue, with the beat scheduler")
    kind.add_argument("--webhooks", action="store_const", dest="kind", const=WEBHOOKS,
                      help="the webhook worker, on its own queue: receivers that never answer hold only its threads")
    w.set_defaults(handler=worker)
    commands.add_parser("beat", help="the Celery beat scheduler (sweeps and registry ticks)").set_defaults(handler=beat)

    d = commands.add_parser("db", help="database migrations")
    d.add_argument("action", choices=["upgrade"])
    d.set_defaults(handler=db)

    k = commands.add_parser("keys", help="API keys: create, list or revoke")
    k.add_argument("action", choices=["create", "list", "revoke"])
    k.add_argument("key", nargs="?", help="revoke: the key's prefix as `keys list` shows it, or the whole key")
    k.add_argument("--tenant", help="create: the tenant the key acts for (created if new); list: only its keys")
    k.set_defaults(handler=keys)


LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def _celery(*args: str) -> list[str]:
    return [sys.executable, "-m", "celery", *args]


JOBS, HOUSEKEEPING, WEBHOOKS = "jobs", "housekeeping", "webhooks"
WORKER_KINDS = (JOBS, HOUSEKEEPING, WEBHOOKS)
# Threads of the torch-free workers: a sweep and a tick at once with room to spare; deliveries that each wait
# up to MIXQ_WEBHOOK_TIMEOUT_SECONDS on a receiver.
THREADS = {HOUSEKEEPING: 4, WEBHOOKS: 8}


def worker_process(concurrency: int | None = None, kind: str = JOBS) -> tuple[list[str], dict[str, str], Path]:
    """A worker's command, environment and working directory: its own folder under the data directory, with
    every path in the environment absolute, so nothing a job names can resolve against the operator's
    current directory. The housekeeping worker (torch-free threads, with beat) and the webhook worker
    (torch-free threads) each consume their own queue."""
    settings = get_settings()
    if kind == JOBS:
        name = settings.queue
        command = _celery("-A", "worker.celery_app", "worker", "-Q", name, "-c", str(concurrency or 1))
    else:
        name = settings.housekeeping_queue if kind == HOUSEKEEPING else settings.webhook_queue
        command = _celery("-A", "worker.housekeeping", "worker", "-Q", name, "-P", "threads",
                          "-c", str(concurrency or THREADS[kind]))
        if kind == HOUSEKEEPING:
            command += ["-B", "-s", str(settings.data_dir / "beat-schedule")]
    command += ["--loglevel", "INFO", "-n", f"mixq-{name}-{os.getpid()}@%h"]
    work = settings.data_dir / "work"
    work.mkdir(parents=True, exist_ok=True)
    return command, {**os.environ, **settings.environment()}, work


def db(args) -> int:

    upgrade()
    print(f"database at head: {get_settings().database_url.split('@')[-1]}")
    return 0


def keys(args) -> int:
    if args.action == "list":
        with session_scope() as session:
            for key in list_keys(session, args.tenant):
                state = f"revoked {key['revoked_at']:%Y-%m-%d %H:%M}" if key["revoked_at"] else "active"
                print(f"{key['prefix']}  {key['name']:<24} created {key['created_at']:%Y-%m-%d %H:%M}  {state}")
        return 0
    if args.action == "revoke":
        if not args.key:
            return _usage("keys revoke needs the key's prefix (see `mixq keys list`) or the key")
        try:
            with session_scope() as session:
                tenant = revoke_key(session, args.key)
        except LookupError as exc:
            return _usage(str(exc))
        print(f"revoked; tenant {tenant!r}'s requests with it are refused within "
              f"{get_settings().key_cache_seconds:g} s", file=sys.stderr)
        return 0
    if not args.tenant:
        return _usage("keys create needs --tenant")
    with session_scope() as session:
        key = create_key(session, args.tenant)
    print(key)
    print(f"(API key for tenant {args.tenant!r}; it is shown once and only its hash is stored)", file=sys.stderr)
    return 0


def _usage(message: str) -> int:
    print(f"mixq: error: {message}", file=sys.stderr)
    return 2


def worker(args) -> int:
    command, environment, work = worker_process(args.concurrency, args.kind)
    os.chdir(work)
    os.execve(sys.executable, command, environment)


def beat(args) -> int:
    settings = get_settings()
    os.execv(sys.executable, _celery("-A", "worker.housekeeping", "beat", "-s", str(settings.data_dir / "beat-schedule"),
                                     "--loglevel", "INFO"))


def serve(args) -> int:
    import uvicorn

    from app.main import create_app

    settings = get_settings()
    loopback = args.host in LOOPBACK
    embedded = settings.embedded_broker and settings.database_url.startswith("sqlite")
    if settings.auth_disabled and not loopback:
        print(f"mixq: error: MIXQ_AUTH_DISABLED is only allowed on a loopback address, not {args.host}",
              file=sys.stderr)
        return 2
    auth_disabled = loopback and (embedded if settings.auth_disabled is None else settings.auth_disabled)
    if auth_disabled and args.workers > 1:
        print("mixq: error: --workers above 1 serves with API keys: bind to another address, or set "
              "MIXQ_AUTH_DISABLED=false", file=sys.stderr)
        return 2
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade()
    if auth_disabled:
        print(f"mixq: AUTH DISABLED - embedded mode on {args.host}: every request acts as tenant 'local'. "
              "Bind to another address or use Postgres/Redis to require API keys.", file=sys.stderr)
    print(f"mixq: database {settings.database_url.split('@')[-1]}, broker {settings.broker_url.split('@')[-1]}",
          file=sys.stderr)
    children = []
    if not args.no_worker:  # a compression worker, the housekeeping worker with beat, and the webhook worker
        for kind in WORKER_KINDS:
            command, environment, work = worker_process(kind=kind)
            children.append(subprocess.Popen(command, env=environment, cwd=work, preexec_fn=_die_with_parent))
    try:
        if args.workers > 1:  # one process per core; each builds the production app (keys required)
            _serve_processes(args.host, args.port, args.workers)
        else:
            uvicorn.run(create_app(auth_disabled=auth_disabled), host=args.host, port=args.port, log_level="info",
                        **connection_limits(settings))
    finally:
        for child in children:
            child.terminate()
        for child in children:
            try:
                child.wait(timeout=30)
            except subprocess.TimeoutExpired:
                child.kill()
    return 0


def connection_limits(settings) -> dict:
    """What one API process holds open: a connection has `header_timeout_seconds` to send each request head
    (app.core.http), idle keep-alive connections close after `keep_alive_seconds`. The cap on requests in
    flight (503 beyond) and a body's own deadline (408) are the app's (app/main.py)."""
    from app.core.http import GuardedH11Protocol

    return {"http": GuardedH11Protocol, "timeout_keep_alive": settings.keep_alive_seconds}


def _serve_processes(host: str, port: int, workers: int) -> None:
    """uvicorn's multi-process server, on a listening socket made with its protocol (IPPROTO_TCP). Made
    without it, as uvicorn does, asyncio never sets TCP_NODELAY on the accepted connections, and each
    keep-alive response then waits about 40 ms for the client's delayed ACK."""
    import socket

    from uvicorn import Config
    from uvicorn.supervisors import Multiprocess

    config = Config("app.main:create_app", factory=True, host=host, port=port, workers=workers, log_level="info",
                    **connection_limits(get_settings()))
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    Multiprocess(config, sockets=[sock]).run()


def _die_with_parent() -> None:
    """The embedded worker gets SIGTERM when `mixq serve` dies, however it dies (uvicorn re-raises
    SIGTERM after its own shutdown, so serve's cleanup does not always run)."""
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
