"""The production shape for tests: API and Celery worker processes on real PostgreSQL and Redis (the `servers`
and `stack` fixtures are in conftest.py).

Needs PostgreSQL at 127.0.0.1:5432 (database `test`) and Redis at 127.0.0.1:6379. Without them the tests
that use `servers` skip on a developer machine and fail in CI (CI=true), where the servers must be there.
"""

import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
PG_URL = os.environ.get("MIXQ_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("MIXQ_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


def reachable(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=2).close()
        return True
    except OSError:
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def mixq_serve(env: dict, log: Path):
    """`mixq serve` (API, job worker, housekeeping and webhook workers) as a user starts it, on the embedded
    defaults that `env` names; yields its URL once /healthz answers, and leaves no process of it behind."""
    port = free_port()
    with open(log, "ab") as output:
        process = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--port", str(port)], env=env, cwd=ROOT,
                                   stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                if httpx.get(f"{url}/healthz").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        else:
            raise AssertionError("mixq serve did not start: " + log.read_text()[-2000:])
        yield url
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=40)
        except subprocess.TimeoutExpired:
            pass
        try:  # its workers share the group; a warm shutdown would finish their tasks first: no strays
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class Stack:
    """API and workers as separate processes, as deployed."""

    def __init__(self, tmp: Path, **settings: str):
        """`settings`: extra MIXQ_ environment variables for every process of this stack."""
        name = f"it-{os.getpid()}-{tmp.name}"  # each stack its own queues on the shared Redis
        self.env = {**os.environ, "MIXQ_DATABASE_URL": PG_URL, "MIXQ_BROKER_URL": REDIS_URL,
                    "MIXQ_DATA_DIR": str(tmp), "MIXQ_QUEUE": name, "MIXQ_HOUSEKEEPING_QUEUE": f"{name}-housekeeping",
                    "MIXQ_WEBHOOK_QUEUE": f"{name}-webhooks",
                    "MIXQ_HEARTBEAT_SECONDS": "0.5", "MIXQ_STALE_AFTER_SECONDS": "5", "MIXQ_AUTH_DISABLED": "false",
                    "MIXQ_METRICS_TOKEN": "it-metrics", **settings}
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.logs = tmp
        self.processes: list[subprocess.Popen] = []

    def mixq(self, *args: str) -> str:
        result = subprocess.run([sys.executable, "-m", "app.cli", *args], env=self.env, cwd=ROOT,
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        return result.stdout.strip()

    def spawn(self, name: str, command: list[str]) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "ab")
        process = subprocess.Popen(command, env=self.env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        self.processes.append(process)
        return process

    def start_api(self) -> None:
        self.spawn("api", [sys.executable, "-m", "uvicorn", "--factory", "app.main:create_app", "--host",
                           "127.0.0.1", "--port", str(self.port)])
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if httpx.get(f"{self.url}/readyz").status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise AssertionError("API did not become ready:\n" + (self.logs / "api.log").read_text()[-3000:])

    def start_worker(self, name: str) -> subprocess.Popen:
        return self.spawn(name, [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "-Q",
                                 self.env["MIXQ_QUEUE"], "-c", "1", "--loglevel", "INFO", "-n", f"{name}@%h"])

    def start_housekeeping(self) -> subprocess.Popen:
        """Sweeps and registry ticks (no beat: tests drive the sweeps they need)."""
        return self.spawn("housekeeping", [sys.executable, "-m", "celery", "-A", "worker.housekeeping", "worker",
                                           "-Q", self.env["MIXQ_HOUSEKEEPING_QUEUE"], "-P", "threads", "-c", "2",
                                           "--loglevel", "INFO", "-n", "housekeeping@%h"])

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
