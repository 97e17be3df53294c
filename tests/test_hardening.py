"""Hardening, second round: no request can stall the API, limits hold under concurrency, one tenant cannot stop
the schedules of others. Each test reproduces an audited defect; concurrency runs on real PostgreSQL."""

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
import uvicorn
from sqlalchemy import select, update

from app.core import jobs, queue, registry, webhooks
from app.core.auth import may_use_hub_token
from app.core.db import session_scope
from app.core.models import QUEUED, Job, RegistryEntry, RegistryRun, Tenant, utcnow
from app.core.settings import get_settings
from app.main import create_app, json_depth
from conftest import SMALL_JOB, Receiver, auth, save_tiny_bert
from stack import Stack, free_port, mixq_serve
from worker.engine.errors import InputError

ROOT = Path(__file__).resolve().parents[1]
JOB = {"model": "builtin:digits-resnet", "budget": {"max_drop": 0.01}, **SMALL_JOB}
ENTRY = {**JOB, "schedule": {"interval_seconds": 3600}}


class Server:
    """The app under uvicorn on 127.0.0.1, in a thread of this process (its own event loop)."""

    def __init__(self, **uvicorn_options):
        self.port = free_port()
        config = uvicorn.Config(create_app(auth_disabled=False), host="127.0.0.1", port=self.port, log_level="error",
                                **uvicorn_options)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture
def silent_receiver(monkeypatch):
    """A webhook target that accepts connections and never answers, allow-listed."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    held = []
    stop = threading.Event()

    def accept():
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except OSError:
                pass

    threading.Thread(target=accept, daemon=True).start()
    settings = get_settings()
    port = listener.getsockname()[1]
    monkeypatch.setattr(settings, "webhook_secret", "s3cret")
    monkeypatch.setattr(settings, "webhook_allowlist", f"127.0.0.1:{port}")
    yield f"http://127.0.0.1:{port}/hook"
    stop.set()
    for connection in held:
        connection.close()
    listener.close()


# --- 1. no request waits on a webhook ---

def test_a_hung_webhook_receiver_delays_neither_the_cancel_nor_any_other_request(keys, silent_receiver, monkeypatch):
    """A delivery inline would hold the cancel, or /healthz, for the receiver's whole timeout (30 s here): the
    bounds below are far under it, so only that failure fails them, not a slow machine."""
    queued = []
    monkeypatch.setattr(get_settings(), "webhook_timeout_seconds", 30.0)
    monkeypatch.setattr(queue, "run_job", lambda job_id, priority: None)  # no worker: the job stays queued
    monkeypatch.setattr(queue, "send", lambda name, args, **_: queued.append((name, args)))
    server = Server()
    try:
        headers = auth(keys["a"])
        job_id = httpx.post(f"{server.url}/v1/jobs", json={**JOB, "webhook_url": silent_receiver},
                            headers=headers).json()["id"]
        slowest = []
        done = threading.Event()

        def poll_health():
            while not done.is_set():
                started = time.perf_counter()
                assert httpx.get(f"{server.url}/healthz", timeout=10).status_code == 200
                slowest.append(time.perf_counter() - started)
                time.sleep(0.02)

        poller = threading.Thread(target=poll_health)
        poller.start()
        started = time.perf_counter()
        cancelled = httpx.post(f"{server.url}/v1/jobs/{job_id}/cancel", headers=headers, timeout=30)
        cancel_seconds = time.perf_counter() - started
        time.sleep(1.0)  # the notification runs after the answer: nothing may stall meanwhile either
        done.set()
        poller.join()
    finally:
        server.stop()
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    assert cancel_seconds < 10
    assert len(slowest) > 10 and max(slowest) < 5, max(slowest)
    # The delivery went to the housekeeping worker's queue, not to the receiver from the API.
    assert [name for name, _ in queued] == [queue.DELIVER_WEBHOOK]


def test_one_delivery_attempt_ends_at_its_deadline_however_slowly_the_receiver_trickles(monkeypatch):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)

    def trickle():
        connection, _ = listener.accept()
        connection.recv(65536)
        try:
            for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok":
                connection.sendall(bytes([byte]))
                time.sleep(0.3)
        except OSError:
            pass
        connection.close()

    threading.Thread(target=trickle, daemon=True).start()
    settings = get_settings()
    monkeypatch.setattr(settings, "webhook_secret", "s3cret")
    monkeypatch.setattr(settings, "webhook_allowlist", f"127.0.0.1:{listener.getsockname()[1]}")
    monkeypatch.setattr(settings, "webhook_timeout_seconds", 1.0)
    started = time.perf_counter()
    with pytest.raises(httpx.TimeoutException):
        webhooks.post(f"http://127.0.0.1:{listener.getsockname()[1]}/hook", "job.succeeded", {}, "d", 1)
    assert time.perf_counter() - started < 8  # the trickle would take 12 s; the deadline is 1 s
    listener.close()


# --- 2. the active-job limit holds under concurrency, on PostgreSQL ---

@pytest.fixture(scope="module")
def limited(servers, tmp_path_factory):
    """A PostgreSQL + Redis API allowing 3 active jobs per tenant, with no worker: jobs stay queued."""
    stack = Stack(tmp_path_factory.mktemp("limited"), MIXQ_MAX_ACTIVE_JOBS_PER_TENANT="3",
                  MIXQ_MAX_REGISTRY_ENTRIES_PER_TENANT="2", MIXQ_BODY_TIMEOUT_SECONDS="1")
    stack.mixq("db", "upgrade")
    stack.key = stack.mixq("keys", "create", "--tenant", "limited")
    stack.start_api()
    yield stack
    stack.stop()


def test_sixty_simultaneous_submissions_get_exactly_the_limit_on_postgres(limited):
    with httpx.Client(base_url=limited.url, headers=auth(limited.key), timeout=60) as client, \
            ThreadPoolExecutor(max_workers=30) as pool:
        answers = list(pool.map(lambda _: client.post("/v1/jobs", json=JOB).status_code, range(60)))
        active = [j for j in client.get("/v1/jobs", params={"status": "queued", "limit": 100}).json()["jobs"]]
    assert answers.count(202) == 3 and answers.count(429) == 57, answers
    assert len(active) == 3


def test_the_registry_entry_limit_holds_too(limited):
    with httpx.Client(base_url=limited.url, headers=auth(limited.key), timeout=60) as client, \
            ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(lambda _: client.post("/v1/registry", json=ENTRY), range(8)))
    assert [a.status_code for a in answers].count(201) == 2
    refused = next(a for a in answers if a.status_code == 422)
    assert "registry entries, the most it may have" in json.dumps(refused.json()["detail"])


# --- 8. no 5xx: NUL bytes, huge cursors, invalid patches, deep nesting (PostgreSQL) ---

@pytest.mark.parametrize("method, path, params", [
    ("GET", "/v1/jobs/%00", None),
    ("GET", "/v1/jobs", {"model": "\x00"}),
    ("GET", "/v1/jobs", {"cursor": "\x00"}),
    ("GET", "/v1/registry/%00", None),
    ("GET", "/v1/registry/%00/history", None),
    ("POST", "/v1/jobs/%00/cancel", None),
    ("DELETE", "/v1/registry/a%00b", None),
])
def test_nul_bytes_in_urls_are_a_400_on_postgres(limited, method, path, params):
    response = httpx.request(method, limited.url + path, params=params, headers=auth(limited.key))
    assert response.status_code == 400 and "NUL" in response.json()["detail"]


def test_a_cursor_that_decodes_to_a_nul_is_a_422_on_postgres(limited):
    import base64

    cursor = base64.urlsafe_b64encode(b"2026-01-01T00:00:00|\x00").decode()
    response = httpx.get(f"{limited.url}/v1/jobs", params={"cursor": cursor}, headers=auth(limited.key))
    assert response.status_code == 422


def test_nul_characters_inside_json_are_a_422_on_postgres(limited):
    body = {**JOB, "data": {"spec": None, "text_column": "a\x00b", "synthetic": True}}
    response = httpx.post(f"{limited.url}/v1/jobs", json=body, headers=auth(limited.key))
    assert response.status_code == 422 and "NUL" in response.text


def test_history_cursors_past_the_column_are_a_422(limited):
    entry = httpx.get(f"{limited.url}/v1/registry", headers=auth(limited.key)).json()["entries"][0]
    response = httpx.get(f"{limited.url}/v1/registry/{entry['id']}/history", params={"cursor": 2**31},
                         headers=auth(limited.key))
    assert response.status_code == 422


def test_a_patch_whose_merged_request_is_too_large_is_a_422(limited):
    entry = httpx.get(f"{limited.url}/v1/registry", headers=auth(limited.key)).json()["entries"][0]
    response = httpx.patch(f"{limited.url}/v1/registry/{entry['id']}", headers=auth(limited.key),
                           json={"hutchinson_samples": 1000, "batch_size": 512})
    assert response.status_code == 422 and "sample forward passes" in response.text


@pytest.mark.parametrize("depth", [40, 500, 950])
def test_json_nested_deeply_is_a_422_in_the_validation_shape(limited, depth):
    body = '{"model": "builtin:minilm", "budget": {"max_drop": 0.01}, "data": ' + "[" * depth + "]" * depth + "}"
    response = httpx.post(f"{limited.url}/v1/jobs", content=body, headers={**auth(limited.key),
                                                                          "Content-Type": "application/json"})
    assert response.status_code == 422 and isinstance(response.json()["detail"], list)


def test_json_depth_counts_brackets_outside_strings_only():
    assert json_depth(b'{"a": [1, {"b": "[[[["}]}') == 3 and json_depth(b'"\\"[[["') == 0


# --- 10. a body trickled a byte at a time is cut off ---

def test_a_slow_body_gets_408_at_the_deadline(limited):
    body = json.dumps(JOB).encode()
    with socket.create_connection(("127.0.0.1", limited.port)) as connection:
        connection.sendall(b"POST /v1/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                           + f"Authorization: Bearer {limited.key}\r\nContent-Length: {len(body)}\r\n\r\n".encode())
        started = time.perf_counter()
        connection.settimeout(0.5)
        answer = b""
        for byte in body:
            try:
                connection.sendall(bytes([byte]))
            except OSError:
                break
            try:
                answer += connection.recv(65536)
            except socket.timeout:
                pass
            if answer:
                break
    # The deadline is 1 s; trickling the whole body would take over a minute.
    assert answer.startswith(b"HTTP/1.1 408") and time.perf_counter() - started < 30


def test_the_server_caps_its_requests_in_flight(keys, monkeypatch):
    """Past MIXQ_MAX_CONNECTIONS requests being served, the app answers 503 at once instead of queueing yet
    another."""
    from app.cli.service import connection_limits

    monkeypatch.setattr(get_settings(), "max_connections", 2)
    server = Server(**connection_limits(get_settings()))
    held = []
    try:
        for _ in range(2):  # two requests whose bodies are still to come
            connection = socket.create_connection(("127.0.0.1", server.port))
            connection.sendall(b"POST /v1/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100\r\n\r\n{")
            held.append(connection)
        time.sleep(0.3)
        busy = httpx.get(f"{server.url}/healthz", timeout=10)
        assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
    finally:
        for connection in held:
            connection.close()
        server.stop()


# --- 3. one tenant's schedule cannot stop the others' ---

@pytest.mark.parametrize("cron", ["0 0 1 1 * 0 2027", "0 0 1 1 * 0"])
def test_cron_expressions_are_five_fields_on_create_and_patch(client, keys, cron):
    created = client.post("/v1/registry", json={**ENTRY, "schedule": {"cron": cron}}, headers=auth(keys["a"]))
    assert created.status_code == 422 and "exactly 5 fields" in created.text
    entry = client.post("/v1/registry", json=ENTRY, headers=auth(keys["a"])).json()
    patched = client.patch(f"/v1/registry/{entry['id']}", json={"schedule": {"cron": cron}}, headers=auth(keys["a"]))
    assert patched.status_code == 422 and "exactly 5 fields" in patched.text


def test_a_broken_entry_is_paused_with_its_reason_and_the_others_still_fire(client, keys, monkeypatch):
    monkeypatch.setattr(queue, "run_job", lambda job_id, priority: None)
    monkeypatch.setattr(get_settings(), "registry_tick_batch", 10**6)
    monkeypatch.setattr(get_settings(), "max_active_jobs_per_tenant", 10**6)
    good = client.post("/v1/registry", json=ENTRY, headers=auth(keys["a"])).json()
    bad = client.post("/v1/registry", json=ENTRY, headers=auth(keys["b"])).json()
    doomed = client.post("/v1/registry", json=ENTRY, headers=auth(keys["b"])).json()
    now = utcnow() + timedelta(hours=2)
    with session_scope() as session:  # an entry stored before the grammar was enforced: its last slot is past
        session.execute(update(RegistryEntry).where(RegistryEntry.id == bad["id"]).values(
            schedule={"cron": "0 0 1 1 * 0 2020"}))
    resolve = registry.current_revision

    def delete_doomed_first(entry, hub_token=False):  # deleted between the due query and its turn
        with session_scope() as session:
            gone = session.get(RegistryEntry, doomed["id"])
            if gone is not None:
                session.delete(gone)
        return resolve(entry, hub_token)

    monkeypatch.setattr(registry, "current_revision", delete_doomed_first)
    recorded = registry.tick(now)
    with session_scope() as session:
        runs = {run.entry_id: run for run in session.scalars(select(RegistryRun).where(RegistryRun.id.in_(recorded)))}
        assert runs[good["id"]].outcome == "enqueued"
        assert runs[bad["id"]].outcome == "error" and "paused" in runs[bad["id"]].reason
        assert doomed["id"] not in runs and session.get(RegistryEntry, bad["id"]).paused


def test_a_tick_fires_a_bounded_batch_oldest_due_first(client, keys, monkeypatch):
    monkeypatch.setattr(queue, "run_job", lambda job_id, priority: None)
    monkeypatch.setattr(get_settings(), "registry_tick_batch", 2)
    monkeypatch.setattr(get_settings(), "max_active_jobs_per_tenant", 10**6)
    ids = [client.post("/v1/registry", json={**ENTRY, "calibration_samples": 30 + i}, headers=auth(keys["b"]))
           .json()["id"] for i in range(3)]
    far = utcnow() + timedelta(days=400)
    with session_scope() as session:  # only these three are due at `far`, in this order
        session.execute(update(RegistryEntry).where(RegistryEntry.id.not_in(ids)).values(paused=True))
        for offset, entry_id in enumerate(ids):
            session.execute(update(RegistryEntry).where(RegistryEntry.id == entry_id).values(
                next_run_at=far - timedelta(hours=3 - offset)))
    with session_scope() as session:
        fired = [session.get(RegistryRun, run).entry_id for run in registry.tick(far)]
    assert fired == ids[:2]


@pytest.mark.parametrize("schedule", [{"interval_seconds": 60}, {"interval_seconds": 299}])
def test_intervals_below_the_operators_floor_are_refused(client, keys, schedule):
    response = client.post("/v1/registry", json={**ENTRY, "schedule": schedule}, headers=auth(keys["a"]))
    assert response.status_code == 422 and "MIXQ_MIN_INTERVAL_SECONDS" in response.text


# --- 4. a broker outage fails no healthy job ---

def test_the_publish_deadline_counts_from_the_first_failure_not_from_creation(client, keys, monkeypatch):
    def down(job_id, priority):
        raise ConnectionError("broker down")

    monkeypatch.setattr(queue, "run_job", lambda job_id, priority: None)
    job_id = client.post("/v1/jobs", json=JOB, headers=auth(keys["a"])).json()["id"]
    now = utcnow()
    with session_scope() as session:  # created 15 minutes ago, published 6 minutes ago, never claimed
        session.execute(update(Job).where(Job.id == job_id).values(created_at=now - timedelta(minutes=15),
                                                                     enqueued_at=now - timedelta(minutes=6)))
    monkeypatch.setattr(queue, "run_job", down)
    jobs.sweep()  # the re-publish fails: the deadline starts now
    with session_scope() as session:
        job = session.get(Job, job_id)
        assert job.status == QUEUED and job.enqueued_at is None and job.publish_failed_at is not None
        session.execute(update(Job).where(Job.id == job_id).values(publish_failed_at=now - timedelta(minutes=11)))
    jobs.sweep()  # down for 11 minutes since its first failure: now it fails, with a plain reason
    with session_scope() as session:
        job = session.get(Job, job_id)
        assert job.status == "failed" and "could not be queued" in job.error


# --- 5. housekeeping has its own queue and worker ---

def test_housekeeping_goes_to_its_own_queue_and_a_backlog_expires():
    from celery import Celery

    settings = get_settings()
    app = queue.make_celery()
    for name in queue.HOUSEKEEPING:
        assert app.amqp.router.route({}, name)["queue"].name == settings.housekeeping_queue
    assert app.amqp.router.route({}, queue.DELIVER_WEBHOOK)["queue"].name == settings.webhook_queue
    assert app.amqp.router.route({}, queue.RUN_JOB)["queue"].name == settings.queue
    schedule = app.conf.beat_schedule
    assert schedule["sweep"]["options"]["expires"] == settings.sweep_seconds
    assert schedule["registry-tick"]["options"]["expires"] == settings.scheduler_tick_seconds
    assert isinstance(app, Celery)


def test_the_housekeeping_worker_is_torch_free():
    probe = "import sys, worker.housekeeping; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "False", result.stderr


def test_mixq_serve_delivers_a_finished_jobs_webhook_from_its_webhook_worker(tmp_path):
    """`mixq serve` runs a compression worker, a housekeeping worker and a webhook worker: the job ends on the
    first, its webhook is queued and delivered by the third."""
    from http.server import HTTPServer

    receiver = HTTPServer(("127.0.0.1", 0), Receiver)
    Receiver.received = []
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIXQ_") or k == "MIXQ_CACHE_DIR"}
    env.update(MIXQ_DATA_DIR=str(tmp_path), MIXQ_WEBHOOK_SECRET="s3cret",
               MIXQ_WEBHOOK_ALLOWLIST=f"127.0.0.1:{receiver.server_port}", MIXQ_PROFILE_SECONDS_PER_LAYER="0.05")
    try:
        with mixq_serve(env, tmp_path / "serve.log") as url:
            job = httpx.post(f"{url}/v1/jobs", json={
                **JOB, "webhook_url": f"http://127.0.0.1:{receiver.server_port}/h", "exports": []}).json()
            deadline = time.time() + 300
            while time.time() < deadline and not Receiver.received:
                time.sleep(0.5)
            assert Receiver.received, httpx.get(f"{url}/v1/jobs/{job['id']}").json()
            headers, body = Receiver.received[-1]
            assert headers["X-Mixq-Event"] == "job.succeeded" and json.loads(body)["job_id"] == job["id"]
    finally:
        receiver.shutdown()


# --- 6. the size check reads an image model's own input size ---

@pytest.fixture(scope="module")
def huge_vit(hub, tmp_path_factory):
    from transformers import ViTConfig, ViTForImageClassification

    folder = tmp_path_factory.mktemp("vit")
    config = ViTConfig(image_size=2048, patch_size=256, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=16, num_labels=2)
    model = ViTForImageClassification(config)
    model.config.architectures = ["ViTForImageClassification"]
    model.save_pretrained(folder)
    hub.push("mixq-test/huge-vit", folder)
    return "hf:mixq-test/huge-vit"


def test_an_image_models_own_input_size_is_checked_before_the_job_is_accepted(client, keys, huge_vit):
    body = {**JOB, "model": huge_vit, "data": {"synthetic": True}, "calibration_samples": 9000,
            "eval_samples": 9000, "test_samples": 9000}
    response = client.post("/v1/jobs", json=body, headers=auth(keys["a"]))
    assert response.status_code == 422 and "GiB of inputs" in response.text  # 27,000 x 3 x 2048², not x 224²
    small = client.post("/v1/jobs", json={**body, "calibration_samples": 4, "eval_samples": 4, "test_samples": 4},
                        headers=auth(keys["a"]))
    assert small.status_code == 202


def test_the_worker_checks_the_input_size_again_before_allocating(huge_vit, cache_dir):
    from worker.engine.data import DataOptions
    from worker.engine.sources import load_model
    from worker.engine.spec import parse_source

    options = DataOptions(synthetic=True, calibration_samples=9000, eval_samples=9000, test_samples=9000,
                          max_input_bytes=16 * 2**30)
    with pytest.raises(InputError, match="GiB of inputs"):
        load_model(parse_source(huge_vit), options, None, cache_dir)


# --- 9. PATCH checks local paths as POST does ---

def test_patch_refuses_a_data_path_outside_the_root(client, keys):
    entry = client.post("/v1/registry", json=ENTRY, headers=auth(keys["a"])).json()
    response = client.patch(f"/v1/registry/{entry['id']}", json={"data": {"spec": "/etc/passwd"}},
                            headers=auth(keys["a"]))
    assert response.status_code == 422 and "local data paths are disabled" in response.text


# --- the operator's HF_TOKEN ---

def test_only_tenants_the_operator_names_may_use_the_workers_hub_token(hub, tmp_path, monkeypatch):
    from worker.engine.spec import parse_source, resolve_revision

    save_tiny_bert(tmp_path / "private")
    hub.push("operator/private-model", tmp_path / "private", token="hf_operator")
    monkeypatch.setenv("HF_TOKEN", "hf_operator")
    spec = parse_source("hf:operator/private-model")
    with pytest.raises(InputError, match="not found on the Hub"):
        resolve_revision(spec, None, hub_token=False)  # anonymous: the private repository does not exist
    assert len(resolve_revision(spec, None, hub_token=True)) == 40
    monkeypatch.setattr(get_settings(), "hf_token_tenants", "trusted")
    with session_scope() as session:
        trusted = Tenant(name="trusted")
        session.add(trusted)
        session.flush()
        stranger = session.scalar(select(Tenant.id).where(Tenant.name != "trusted"))
        assert may_use_hub_token(session, trusted.id) and not may_use_hub_token(session, stranger)
