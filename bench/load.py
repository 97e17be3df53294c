"""Submit and poll throughput and latency of the jobs API, its start time and memory (a benchmark, not a test).

Starts the API as `mixq serve --no-worker` does in production (uvicorn, `--workers` processes, API keys
on), with no job worker, so this measures the API, database and broker path; then drives it with wrk (a C
load generator, so the client takes little of the two cores): POST /v1/jobs from 8 connections, then
GET /v1/jobs/{id} from 16, each for `--seconds`.

    .venv/bin/python bench/load.py                        # embedded default (SQLite + kombu SQLAlchemy)
    .venv/bin/python bench/load.py --postgres-redis       # also PostgreSQL + Redis on this machine
    .venv/bin/python bench/load.py --root ../old --name load-before   # another checkout, same machine

Needs wrk (Debian: apt-get install wrk).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from common import RESULTS, ROOT, SMOKE, git, save

UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss_mb(pid: int) -> float:
    """Resident memory of a process and its children (uvicorn's worker processes)."""
    children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    total = 0
    for p in [str(pid), *children]:
        try:
            status = Path(f"/proc/{p}/status").read_text()
        except FileNotFoundError:
            continue
        total += int(re.search(r"VmRSS:\s+(\d+)", status).group(1))
    return total / 1024


def _start(root: Path, env: dict, workers: int) -> tuple[subprocess.Popen, str, str, float]:
    def cli(*args):
        return subprocess.run([sys.executable, "-m", "app.cli", *args], env=env, cwd=root, check=True,
                              capture_output=True, text=True).stdout.strip()

    cli("db", "upgrade")
    key = cli("keys", "create", "--tenant", "load")
    port = _port()
    started = time.perf_counter()
    # One process: the production factory under uvicorn (any checkout has it); more: `mixq serve --workers`.
    command = (["-m", "uvicorn", "--factory", "app.main:create_app", "--log-level", "warning"] if workers == 1 else
               ["-m", "app.cli", "serve", "--no-worker", "--workers", str(workers)])
    api = subprocess.Popen([sys.executable, *command, "--host", "127.0.0.1", "--port", str(port)],
                           env={**env, "MIXQ_AUTH_DISABLED": "false"}, cwd=root, start_new_session=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    while time.perf_counter() - started < 120:
        try:
            if httpx.get(f"{url}/healthz").status_code == 200:
                return api, url, key, time.perf_counter() - started
        except httpx.HTTPError:
            time.sleep(0.05)
    raise RuntimeError("API did not start")


def _wrk(url: str, connections: int, seconds: int, script: Path | None = None, headers: dict | None = None) -> dict:
    command = ["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "--latency"]
    for name, value in (headers or {}).items():
        command += ["-H", f"{name}: {value}"]
    if script:
        command += ["-s", str(script)]
    out = subprocess.run([*command, url], capture_output=True, text=True, check=True).stdout
    percentile = {q: float(v) * UNITS[u] for q, v, u in re.findall(r"\s(50|99)%\s+([\d.]+)(us|ms|s)", out)}
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {"throughput_rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
            "p50_ms": percentile["50"], "p99_ms": percentile["99"], "non_2xx": int(errors.group(1)) if errors else 0}


ROUNDS = 2  # poll and /healthz, alternating


def _mean(runs: list[dict]) -> dict:
    return {name: sum(run[name] for run in runs) / len(runs) for name in runs[0]}


def measure(label: str, root: Path, env: dict, workers: int, seconds: int) -> dict:
    api, url, key, start_seconds = _start(root, env, workers)
    try:
        time.sleep(1)
        idle_rss = _rss_mb(api.pid)
        with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
            script.write('wrk.method = "POST"\n'
                         """wrk.body = '{"model": "builtin:digits-resnet", "budget": {"max_drop": 0.01}}'\n"""
                         'wrk.headers["Content-Type"] = "application/json"\n'
                         f'wrk.headers["Authorization"] = "Bearer {key}"\n')
        submit = _wrk(f"{url}/v1/jobs", 8, seconds, Path(script.name))
        job = httpx.post(f"{url}/v1/jobs", json={"model": "builtin:digits-resnet", "budget": {"max_drop": 0.01}},
                         headers={"Authorization": f"Bearer {key}"}).json()["id"]
        # The poll against /healthz on the same process, same connections, alternating (drift hits both): what
        # the read path and the middleware cost per request beyond the bare server.
        polls, healths = [], []
        for _ in range(ROUNDS):
            polls.append(_wrk(f"{url}/v1/jobs/{job}", 16, seconds, headers={"Authorization": f"Bearer {key}"}))
            healths.append(_wrk(f"{url}/healthz", 16, seconds))
        poll, health = _mean(polls), _mean(healths)
        # `--root` may name another checkout than the one this script runs from: record which was measured.
        return {"backend": label, "checkout": git("rev-parse", "--short", "HEAD", root=root) or "unknown",
                "workers": workers,
                "start_seconds": round(start_seconds, 2),
                "idle_rss_mb": round(idle_rss), "submit": submit, "poll": poll, "healthz": health,
                "poll_over_healthz": [p["throughput_rps"] / h["throughput_rps"] for p, h in zip(polls, healths)]}
    finally:
        os.killpg(api.pid, signal.SIGTERM)
        api.wait(timeout=30)


def markdown(runs: list[dict], seconds: int) -> str:
    checkouts = ", ".join(dict.fromkeys(run.get("checkout", "unknown") for run in runs))
    lines = [f"Checkout measured: {checkouts}. wrk, 2 threads; submit from 8 connections for {seconds} s, then poll "
             f"(GET /v1/jobs/{{id}}) and /healthz from 16, alternating, {ROUNDS} x {seconds} s each; no job worker; "
             "2 cores shared with wrk",
             "", "| backend | API processes | start s | idle RSS MB | submit req/s | submit p50 / p99 ms "
             "| poll req/s | poll p50 / p99 ms | /healthz req/s | poll / healthz (per round) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for run in runs:
        s, p, h = run["submit"], run["poll"], run["healthz"]
        ratios = ", ".join(f"{r:.2f}" for r in run["poll_over_healthz"])
        lines.append(f"| {run['backend']} | {run['workers']} | {run['start_seconds']} | {run['idle_rss_mb']} "
                     f"| {s['throughput_rps']:.0f} | {s['p50_ms']:.1f} / {s['p99_ms']:.1f} "
                     f"| {p['throughput_rps']:.0f} | {p['p50_ms']:.1f} / {p['p99_ms']:.1f} "
                     f"| {h['throughput_rps']:.0f} | {p['throughput_rps'] / h['throughput_rps']:.2f} ({ratios}) |")
    return "\n".join(lines) + "\n"


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--workers", type=int, default=2, help="API processes on PostgreSQL (one per core)")
    parser.add_argument("--postgres-redis", action="store_true")
    parser.add_argument("--root", type=Path, default=ROOT, help="the checkout to measure")
    parser.add_argument("--name", default="load")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--smoke", action="store_true", help="1-second runs: checks the script runs at HEAD")
    args = parser.parse_args()
    if SMOKE:
        args.seconds = 1
    if not shutil.which("wrk"):
        raise SystemExit("bench/load.py needs wrk (apt-get install wrk)")
    # The submit path is what is measured: the per-tenant cap on active jobs would turn it into 429s after 20.
    base = {**{k: v for k, v in os.environ.items() if not k.startswith("MIXQ_")},
            "MIXQ_MAX_ACTIVE_JOBS_PER_TENANT": str(10 ** 9)}
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        # The embedded default is one API process (`mixq serve`): SQLite takes one writer at a time.
        runs.append(measure("embedded (SQLite + kombu SQLAlchemy)", args.root, {**base, "MIXQ_DATA_DIR": tmp},
                            1, args.seconds))
        if args.postgres_redis:
            import redis

            from app.core.migrate import reset

            pg = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
            reset(pg)
            redis.Redis.from_url("redis://127.0.0.1:6379/14").flushdb()
            runs.append(measure("PostgreSQL + Redis", args.root, {
                **base, "MIXQ_DATA_DIR": tmp, "MIXQ_DATABASE_URL": pg, "MIXQ_BROKER_URL": "redis://127.0.0.1:6379/14",
                "MIXQ_QUEUE": "load-bench"}, args.workers, args.seconds))
    save(args.out, args.name, runs, markdown(runs, args.seconds))


if __name__ == "__main__":
    main()
