"""The production shape: API and Celery worker processes on real PostgreSQL and Redis (tests/stack.py)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
from sqlalchemy import text

ROOT = Path(__file__).resolve().parents[1]


# A conv net with real weights (13 layers): its job takes seconds on any CPU.
CONV_NET_JOB = {"model": "builtin:digits-resnet", "budget": {"max_drop": 0.01}, "calibration_samples": 32,
                "eval_samples": 64, "hutchinson_samples": 2}


def _client(stack) -> httpx.Client:
    return httpx.Client(base_url=stack.url, headers={"Authorization": f"Bearer {stack.key}"}, timeout=30)


def _wait(client, job_id: str, until, timeout: float = 300) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if until(job):
            return job
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} stuck: {job}")


def _rows(engine, job_id: str) -> dict:
    with engine.connect() as connection:
        count = lambda table: connection.execute(  # noqa: E731
            text(f"SELECT count(*) FROM {table} WHERE job_id = :id"), {"id": job_id}).scalar()
        in_report = lambda path: connection.execute(  # noqa: E731
            text(f"SELECT jsonb_array_length(report{path}) FROM jobs WHERE id = :id"), {"id": job_id}).scalar()
        return {"layers": in_report("->'layers'"), "steps": in_report("->'search'->'steps'"),
                "artifacts": count("artifacts"),
                "attempts": connection.execute(text("SELECT attempts FROM jobs WHERE id = :id"), {"id": job_id}).scalar(),
                "report_type": connection.execute(text("SELECT jsonb_typeof(report) FROM jobs WHERE id = :id"),
                                                  {"id": job_id}).scalar()}


def test_job_over_http_runs_on_a_worker_and_lands_in_postgres(stack, servers):
    worker = stack.start_worker("worker-1")
    with _client(stack) as client:
        response = client.post("/v1/jobs", json=CONV_NET_JOB)
        assert response.status_code == 202
        job = _wait(client, response.json()["id"], lambda j: j["status"] in ("succeeded", "failed"))
        assert job["status"] == "succeeded", job["error"]
        report = client.get(f"/v1/jobs/{job['id']}/report").json()
    assert report["final"]["drop"] <= 0.01 and report["baseline"]["latency_ms"]["median"] > 0
    rows = _rows(servers, job["id"])
    formats = 3 if report["exports"]["onnx"].get("file") else 2  # bundle, safetensors and, when compressed, onnx
    assert rows == {"layers": 13, "steps": len(report["search"]["steps"]), "artifacts": formats, "attempts": 1,
                    "report_type": "object"}
    # Postgres aggregates the run-time histogram (its own interval arithmetic, not SQLite's julianday).
    scrape = httpx.get(f"{stack.url}/metrics", headers={"Authorization": "Bearer it-metrics"}).text
    count = next(line for line in scrape.splitlines() if line.startswith("mixq_job_duration_seconds_count"))
    assert float(count.split()[-1]) >= 1
    assert httpx.get(f"{stack.url}/metrics", headers={"Authorization": f"Bearer {stack.key}"}).status_code == 401
    os.killpg(worker.pid, signal.SIGKILL)
    worker.wait()


def test_postgres_schema_from_migrations_matches_the_models(stack, servers):
    """Migrations and models agree (types included), and an artifact over 2 GiB fits its size column."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from app.core.models import Base

    with servers.connect() as connection:
        differences = compare_metadata(MigrationContext.configure(connection, opts={"compare_type": True}),
                                       Base.metadata)
        assert differences == []
        job = connection.execute(text("SELECT id FROM jobs LIMIT 1")).scalar()
        connection.execute(text("INSERT INTO artifacts (job_id, kind, path, size_bytes, sha256) "
                                "VALUES (:job, 'huge', '/x', :size, 'x')"), {"job": job, "size": 3 * 2**30})
        connection.rollback()


def test_worker_killed_mid_job_finishes_exactly_once(stack, servers):
    worker = stack.start_worker("worker-doomed")
    with _client(stack) as client:
        job_id = client.post("/v1/jobs", json=CONV_NET_JOB).json()["id"]
        running = _wait(client, job_id, lambda j: j["status"] == "running", timeout=120)  # killed while it works
        assert running["attempts"] == 1
        os.killpg(worker.pid, signal.SIGKILL)  # the whole worker (parent and pool child) dies at once
        worker.wait()
        time.sleep(6)  # past MIXQ_STALE_AFTER_SECONDS: its heartbeat is now stale
        assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "running"
        stack.start_worker("worker-rescuer")  # requeues stale jobs when it starts
        job = _wait(client, job_id, lambda j: j["status"] in ("succeeded", "failed"), timeout=400)
        assert job["status"] == "succeeded", job["error"]
        report = client.get(f"/v1/jobs/{job_id}/report").json()
        layers = client.get(f"/v1/jobs/{job_id}/layers").json()
    rows = _rows(servers, job_id)
    assert rows["attempts"] == 2
    assert rows["layers"] == len(layers) == 13 and len({l["name"] for l in layers}) == 13
    assert rows["steps"] == len(report["search"]["steps"]) and rows["artifacts"] == (3 if report["exports"]["onnx"].get("file") else 2)


def test_cli_client_submits_and_waits(stack):
    """`mixq submit --wait` against the running service (the rescuer worker from the fault test serves it)."""
    result = subprocess.run([sys.executable, "-m", "app.cli", "submit", "builtin:digits-resnet", "--budget", "0.01",
                             "--wait"], env={**stack.env, "MIXQ_API_URL": stack.url, "MIXQ_API_KEY": stack.key},
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    job_id, outcome = result.stdout.strip().splitlines()[0], result.stdout.strip().splitlines()[-1]
    assert outcome.startswith("succeeded:") and "latency reduction" in outcome
    status = subprocess.run([sys.executable, "-m", "app.cli", "status", job_id],
                            env={**stack.env, "MIXQ_API_URL": stack.url, "MIXQ_API_KEY": stack.key},
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert status.returncode == 0 and '"status": "succeeded"' in status.stdout
    denied = subprocess.run([sys.executable, "-m", "app.cli", "status", job_id],
                            env={**stack.env, "MIXQ_API_URL": stack.url, "MIXQ_API_KEY": "mixq_wrong"},
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert denied.returncode == 2 and "HTTP 401" in denied.stderr and "Traceback" not in denied.stderr
