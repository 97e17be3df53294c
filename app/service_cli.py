"""`mixq serve|worker|beat|db|keys|submit|status|wait`: running the service and talking to it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from .settings import get_settings

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def _celery(*args: str) -> list[str]:
    return [sys.executable, "-m", "celery", "-A", "worker.celery_app", *args]


def worker_command(concurrency: int = 1, beat: bool = False) -> list[str]:
    settings = get_settings()
    command = _celery("worker", "-Q", settings.queue, "-c", str(concurrency), "--loglevel", "INFO",
                      "-n", f"mixq-{settings.queue}-{os.getpid()}@%h")
    if beat:
        command += ["-B", "-s", str(settings.data_dir / "beat-schedule")]
    return command


def db(args) -> int:
    from .migrate import upgrade

    upgrade()
    print(f"database at head: {get_settings().database_url.split('@')[-1]}")
    return 0


def keys(args) -> int:
    from .auth import create_key
    from .db import session_scope

    with session_scope() as session:
        key = create_key(session, args.tenant)
    print(key)
    print(f"(API key for tenant {args.tenant!r}; it is shown once and only its hash is stored)", file=sys.stderr)
    return 0


def worker(args) -> int:
    os.execv(sys.executable, worker_command(args.concurrency, args.beat))


def beat(args) -> int:
    settings = get_settings()
    os.execv(sys.executable, _celery("beat", "-s", str(settings.data_dir / "beat-schedule"), "--loglevel", "INFO"))


def serve(args) -> int:
    import uvicorn

    from .main import create_app
    from .migrate import upgrade

    settings = get_settings()
    loopback = args.host in LOOPBACK
    embedded = settings.embedded_broker and settings.database_url.startswith("sqlite")
    if settings.auth_disabled and not loopback:
        print(f"mixq: error: MIXQ_AUTH_DISABLED is only allowed on a loopback address, not {args.host}",
              file=sys.stderr)
        return 2
    auth_disabled = loopback and (embedded if settings.auth_disabled is None else settings.auth_disabled)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade()
    if auth_disabled:
        print(f"mixq: AUTH DISABLED - embedded mode on {args.host}: every request acts as tenant 'local'. "
              "Bind to another address or use Postgres/Redis to require API keys.", file=sys.stderr)
    print(f"mixq: database {settings.database_url.split('@')[-1]}, broker {settings.broker_url.split('@')[-1]}",
          file=sys.stderr)
    worker_process = None
    if not args.no_worker:
        worker_process = subprocess.Popen(worker_command(beat=True), preexec_fn=_die_with_parent)
    try:
        uvicorn.run(create_app(auth_disabled=auth_disabled), host=args.host, port=args.port, log_level="info")
    finally:
        if worker_process is not None:
            worker_process.terminate()
            try:
                worker_process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                worker_process.kill()
    return 0


def _die_with_parent() -> None:
    """The embedded worker gets SIGTERM when `mixq serve` dies, however it dies (uvicorn re-raises
    SIGTERM after its own shutdown, so serve's cleanup does not always run)."""
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _client():
    import httpx

    settings = get_settings()
    headers = {"Authorization": f"Bearer {settings.api_key}"} if settings.api_key else {}
    return httpx.Client(base_url=settings.api_url, headers=headers, timeout=30)


def _call(method: str, path: str, **kwargs) -> dict | None:
    import httpx

    try:
        with _client() as client:
            response = client.request(method, path, **kwargs)
    except httpx.HTTPError as exc:
        print(f"mixq: error: cannot reach {get_settings().api_url}: {exc}", file=sys.stderr)
        return None
    if response.status_code >= 400:
        try:
            detail = response.json()["detail"]
        except (ValueError, KeyError):  # not the API's JSON error body (a proxy, a crash page)
            detail = response.text
        message = detail if isinstance(detail, str) else json.dumps(detail)
        print(f"mixq: error: HTTP {response.status_code}: {message}", file=sys.stderr)
        return None
    return response.json()


def submit(args) -> int:
    body = {"model": args.source, "ordering": args.ordering,
            "budget": {"max_drop": args.budget, "min_drop": args.min_drop,
                       "mode": "absolute" if args.absolute else "relative"}}
    job = _call("POST", "/v1/jobs", json=body)
    if job is None:
        return 2
    print(job["id"])
    return _wait_for(job["id"]) if args.wait else 0


def status(args) -> int:
    job = _call("GET", f"/v1/jobs/{args.job_id}")
    if job is None:
        return 2
    print(json.dumps(job, indent=2, default=str))
    return 0


def _wait_for(job_id: str) -> int:
    from .cli import ProgressPrinter

    printer = ProgressPrinter()
    while True:
        job = _call("GET", f"/v1/jobs/{job_id}")
        if job is None:
            return 2
        if job["phase"]:
            from worker.engine import Progress

            printer(Progress(job["phase"], job["progress"], job["message"] or "", job["step"], job["steps"]))
        if job["status"] in ("succeeded", "failed", "cancelled"):
            printer.finish()
            outcome = job["error"] or job["message"]
            print(f"{job['status']}: {outcome}" + (f" (latency reduction {job['latency_reduction']:.1%})"
                                                   if job["latency_reduction"] is not None else ""))
            return 0 if job["status"] == "succeeded" else 1
        time.sleep(1)


def wait(args) -> int:
    return _wait_for(args.job_id)
