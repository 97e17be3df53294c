"""Submit and poll throughput and latency of the jobs API (a benchmark, not a test).

Starts the API as its own process on 127.0.0.1 (no worker: jobs stay queued, so this measures the API,
database and broker path), then sends a bounded number of submits and polls from a few client threads.

    .venv/bin/python bench/load.py                      # embedded default (SQLite + kombu SQLAlchemy)
    .venv/bin/python bench/load.py --postgres-redis     # also PostgreSQL + Redis on this machine
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(env: dict) -> tuple[subprocess.Popen, str, str]:
    subprocess.run([sys.executable, "-m", "app.cli", "db", "upgrade"], env=env, cwd=ROOT, check=True,
                   capture_output=True)
    key = subprocess.run([sys.executable, "-m", "app.cli", "keys", "create", "--tenant", "load"], env=env, cwd=ROOT,
                         check=True, capture_output=True, text=True).stdout.strip()
    port = _port()
    api = subprocess.Popen([sys.executable, "-m", "uvicorn", "--factory", "app.main:create_app", "--host",
                            "127.0.0.1", "--port", str(port), "--log-level", "warning"], env=env, cwd=ROOT,
                           start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            if httpx.get(f"{url}/healthz").status_code == 200:
                return api, url, key
        except httpx.HTTPError:
            time.sleep(0.1)
    raise RuntimeError("API did not start")


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _run(url: str, key: str, requests: int, concurrency: int) -> dict:
    headers = {"Authorization": f"Bearer {key}"}
    body = {"model": "builtin:digits-resnet", "budget": {"max_drop": 0.01}}
    results = {}
    with httpx.Client(base_url=url, headers=headers, timeout=30) as client:
        def timed(call):
            started = time.perf_counter()
            response = call()
            response.raise_for_status()
            return (time.perf_counter() - started) * 1000, response

        ids = []
        for name, call in (("submit", lambda: client.post("/v1/jobs", json=body)),
                           ("poll", lambda: client.get(f"/v1/jobs/{ids[len(ids) // 2]}"))):
            started = time.perf_counter()
            with ThreadPoolExecutor(concurrency) as pool:
                outcomes = list(pool.map(lambda _: timed(call), range(requests)))
            wall = time.perf_counter() - started
            latencies = [ms for ms, _ in outcomes]
            if name == "submit":
                ids = [response.json()["id"] for _, response in outcomes]
            results[name] = {"requests": requests, "throughput_rps": requests / wall,
                             "p50_ms": statistics.median(latencies), "p99_ms": _percentile(latencies, 0.99)}
    return results


def measure(label: str, env: dict, requests: int, concurrency: int) -> dict:
    api, url, key = _start(env)
    try:
        return {"backend": label, **_run(url, key, requests, concurrency)}
    finally:
        os.killpg(api.pid, signal.SIGTERM)
        api.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--postgres-redis", action="store_true")
    args = parser.parse_args()
    base = {k: v for k, v in os.environ.items() if not k.startswith("MIXQ_")}
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        runs.append(measure("embedded (SQLite + kombu SQLAlchemy)", {**base, "MIXQ_DATA_DIR": tmp},
                            args.requests, args.concurrency))
        if args.postgres_redis:
            import redis

            sys.path.insert(0, str(ROOT))
            from app.migrate import reset

            pg = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
            reset(pg)
            redis.Redis.from_url("redis://127.0.0.1:6379/14").flushdb()
            runs.append(measure("PostgreSQL + Redis", {**base, "MIXQ_DATA_DIR": tmp, "MIXQ_DATABASE_URL": pg,
                                                       "MIXQ_BROKER_URL": "redis://127.0.0.1:6379/14",
                                                       "MIXQ_QUEUE": "load-bench"},
                                args.requests, args.concurrency))
    lines = [f"{args.requests} requests each, {args.concurrency} client threads, one uvicorn process, 2 cores", "",
             "| backend | submit req/s | submit p50 / p99 ms | poll req/s | poll p50 / p99 ms |",
             "|---|---|---|---|---|"]
    for run in runs:
        s, p = run["submit"], run["poll"]
        lines.append(f"| {run['backend']} | {s['throughput_rps']:.0f} | {s['p50_ms']:.1f} / {s['p99_ms']:.1f} "
                     f"| {p['throughput_rps']:.0f} | {p['p50_ms']:.1f} / {p['p99_ms']:.1f} |")
    table = "\n".join(lines) + "\n"
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "load.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
