"""`mixq submit|status|wait`: talking to a running service (MIXQ_API_URL, MIXQ_API_KEY)."""

from __future__ import annotations

import json
import sys
import time

import httpx

from app.core.models import FINISHED
from app.core.settings import get_settings

from .arguments import add_job_arguments, job_request
from .progress import ProgressPrinter


def add_commands(commands) -> None:
    sub = commands.add_parser("submit", help="submit a job to a running server")
    add_job_arguments(sub)
    sub.add_argument("--wait", action="store_true", help="show progress until the job ends")
    sub.set_defaults(handler=submit)
    for name, handler in (("status", status), ("wait", wait)):
        p = commands.add_parser(name, help=f"{name} of a job on a running server")
        p.add_argument("job_id")
        p.set_defaults(handler=handler)


def _client():
    settings = get_settings()
    headers = {"Authorization": f"Bearer {settings.api_key}"} if settings.api_key else {}
    return httpx.Client(base_url=settings.api_url, headers=headers, timeout=30)


def _call(method: str, path: str, **kwargs) -> dict | None:
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
    job = _call("POST", "/v1/jobs", json={k: v for k, v in job_request(args).items() if v is not None})
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
    printer = ProgressPrinter()
    while True:
        job = _call("GET", f"/v1/jobs/{job_id}")
        if job is None:
            return 2
        if job["phase"]:
            printer.show(job["phase"], job["progress"], job["message"] or "", job["step"])
        if job["status"] in FINISHED:
            printer.finish()
            outcome = job["error"] or job["message"]
            print(f"{job['status']}: {outcome}" + (f" (latency reduction {job['latency_reduction']:.1%})"
                                                   if job["latency_reduction"] is not None else ""))
            return 0 if job["status"] == "succeeded" else 1
        time.sleep(1)


def wait(args) -> int:
    return _wait_for(args.job_id)
