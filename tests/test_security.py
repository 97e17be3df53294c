"""Service hardening: each audited defect, reproduced against the app, refused with a 4xx and a reason."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from app.core import webhooks
from app.core.auth import create_key, tenant_for_key
from app.core.db import session_scope
from app.core.models import FINISHED, QUEUED, RUNNING, Artifact, Job
from app.core.settings import get_settings
from app.main import create_app
from conftest import SMALL_JOB, Receiver, auth, verified, webhook_secret
from worker import runner

ROOT = Path(__file__).resolve().parents[1]
JOB = {"model": "builtin:digits-resnet", "budget": {"max_drop": 0.01}, **SMALL_JOB}
ENTRY = {**JOB, "schedule": {"interval_seconds": 3600}}


def _detail(response) -> str:
    return json.dumps(response.json()["detail"])


# --- 7. bad input never gets a 500 ---

@pytest.mark.parametrize("field", ["schedule", "regression_threshold", "budget", "ordering", "priority"])
def test_patching_a_required_setting_to_null_is_a_422(client, keys, field):
    entry = client.post("/v1/registry", json=ENTRY, headers=auth(keys["a"])).json()
    response = client.patch(f"/v1/registry/{entry['id']}", json={field: None}, headers=auth(keys["a"]))
    assert response.status_code == 422, response.text


def test_a_cron_expression_that_never_fires_is_a_422(client, keys):
    response = client.post("/v1/registry", json={**ENTRY, "schedule": {"cron": "0 0 30 2 *"}},
                           headers=auth(keys["a"]))
    assert response.status_code == 422 and "never fires" in _detail(response)


@pytest.mark.parametrize("number", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_numbers_are_a_422(client, keys, number):
    for path, body in [("/v1/jobs", '{"model": "builtin:minilm", "budget": {"max_drop": %s}}'),
                       ("/v1/registry", '{"model": "builtin:minilm", "budget": {"max_drop": 0.01}, '
                                        '"schedule": {"interval_seconds": 60}, "regression_threshold": %s}')]:
        response = client.post(path, content=body % number, headers={**auth(keys["a"]),
                                                                    "Content-Type": "application/json"})
        assert response.status_code == 422, (path, response.text)


@pytest.mark.parametrize("body", [
    '{"model": "\\ud800", "budget": {"max_drop": 0.01}}',
    '{"model": "builtin:minilm", "budget": {"max_drop": 0.01}, "data": {"spec": "hf:x\\ud800"}}',
    '{"model": "builtin:minilm", "budget": {"max_drop": 0.01}, "webhook_url": "https://a.example/\\udfff"}',
])
def test_lone_surrogates_are_a_422_that_still_encodes(client, keys, body):
    response = client.post("/v1/jobs", content=body, headers={**auth(keys["a"]), "Content-Type": "application/json"})
    assert response.status_code == 422 and "lone surrogates" in response.text


def test_an_artifact_removed_from_storage_is_gone_not_a_500(client, keys):
    job_id = client.post("/v1/jobs", json=JOB, headers=auth(keys["a"])).json()["id"]
    assert runner.run(job_id, worker="t") == "succeeded"
    with session_scope() as session:
        Path(session.scalar(select(Artifact.path).where(Artifact.job_id == job_id))).unlink()
    response = client.get(f"/v1/jobs/{job_id}/artifact", headers=auth(keys["a"]))
    assert response.status_code == 410 and "no longer stored" in response.json()["detail"]


# --- 8. total work is bounded ---

@pytest.mark.parametrize("overrides, message", [
    ({"model": "builtin:resnet50", "data": {"synthetic": True}, "calibration_samples": 100_000,
      "eval_samples": 100_000}, "GiB of inputs"),
    ({"model": "hf:org/vision-model", "calibration_samples": 30_000, "eval_samples": 30_000}, "GiB of inputs"),
    ({"model": "builtin:bert-base", "seq_len": 8192, "batch_size": 512}, "GiB of inputs"),
    ({"eval_samples": 100_000, "test_samples": 100_000}, "sample forward passes"),
    ({"hutchinson_samples": 1000, "batch_size": 512}, "sample forward passes"),
])
def test_jobs_too_large_in_total_are_refused_at_submission_saying_what_to_lower(client, keys, overrides, message):
    response = client.post("/v1/jobs", json={**JOB, **overrides}, headers=auth(keys["a"]))
    assert response.status_code == 422 and message in _detail(response) and "lower" in _detail(response)


@pytest.mark.parametrize("split", ["train+test", "train[:90%]", "train[10:]"])
def test_split_syntax_is_a_plain_name(client, keys, split):
    response = client.post("/v1/jobs", json={**JOB, "data": {"spec": "hf:org/data", "split": split}},
                           headers=auth(keys["a"]))
    assert response.status_code == 422


def test_registry_entries_are_paginated(client, keys):
    created = [client.post("/v1/registry", json=ENTRY, headers=auth(keys["b"])).json()["id"] for _ in range(3)]
    seen, cursor = [], None
    while True:
        page = client.get("/v1/registry", params={"limit": 2, **({"cursor": cursor} if cursor else {})},
                          headers=auth(keys["b"])).json()
        assert len(page["entries"]) <= 2
        seen += [entry["id"] for entry in page["entries"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert set(created) <= set(seen) and len(seen) == len(set(seen))


def _active_jobs(key: str) -> int:
    with session_scope() as session:
        tenant = tenant_for_key(key)
        return session.scalar(select(func.count()).select_from(Job).where(
            Job.tenant_id == tenant.id, Job.status.in_((QUEUED, RUNNING))))


def test_a_tenant_at_its_active_job_limit_gets_429_with_retry_after(client, keys, monkeypatch):
    limit = _active_jobs(keys["b"]) + 1
    monkeypatch.setattr(get_settings(), "max_active_jobs_per_tenant", limit)
    assert client.post("/v1/jobs", json=JOB, headers=auth(keys["b"])).status_code == 202
    refused = client.post("/v1/jobs", json=JOB, headers=auth(keys["b"]))
    assert refused.status_code == 429 and int(refused.headers["Retry-After"]) > 0
    assert "queued or running jobs" in refused.json()["detail"]
    entry = client.post("/v1/registry", json=ENTRY, headers=auth(keys["b"])).json()
    assert client.post(f"/v1/registry/{entry['id']}/run", headers=auth(keys["b"])).status_code == 429
    with session_scope() as session:
        other = create_key(session, "quota-other")
    assert _active_jobs(other) < limit
    assert client.post("/v1/jobs", json=JOB, headers=auth(other)).status_code == 202  # per tenant


# --- 9. who may call: the Host header ---

@pytest.mark.parametrize("host, status", [("127.0.0.1:8000", 202), ("localhost:8000", 202), ("[::1]:8000", 202),
                                          ("attacker.example", 400), ("attacker.example:8000", 400)])
def test_without_keys_only_loopback_host_names_are_answered(host, status):
    with TestClient(create_app(auth_disabled=True), base_url="http://127.0.0.1:8000") as local:
        response = local.post("/v1/jobs", json=JOB, headers={"Host": host})
        assert response.status_code == status


def test_the_operator_names_the_hosts(monkeypatch):
    monkeypatch.setattr(get_settings(), "allowed_hosts", "mixq.internal")
    with TestClient(create_app(auth_disabled=False), base_url="http://mixq.internal") as keyed:
        assert keyed.get("/healthz").status_code == 200
        assert keyed.get("/healthz", headers={"Host": "attacker.example"}).status_code == 400


# --- 10. webhooks ---

@pytest.mark.parametrize("url", ["http://127.0.0.1:9/a\r\nX-Injected: 1", "http://127.0.0.1:9/a\tb",
                                 "http://127.0.0.1:9/a b", "http://127.0.0.1:9/\x00"])
def test_webhook_urls_with_control_characters_or_spaces_are_refused(client, keys, receiver, url):
    response = client.post("/v1/jobs", json={**JOB, "webhook_url": url}, headers=auth(keys["a"]))
    assert response.status_code == 422


@pytest.mark.parametrize("allowlist, url, allowed", [
    ("hooks.example.com:443", "https://hooks.example.com/x", True),
    ("hooks.example.com:80", "http://hooks.example.com/x", True),
    ("hooks.example.com:443", "http://hooks.example.com/x", False),
    ("hooks.example.com", "https://hooks.example.com:8443/x", True),
    ("[::1]:8080", "http://[::1]:8080/x", True),
    ("[::1]:8080", "http://[::1]:8081/x", False),
    ("::1", "http://[::1]:9000/x", True),
    ("[fd00::5]", "https://[fd00::5]/x", True),
])
def test_allow_list_entries_normalise_ports_and_take_ipv6(monkeypatch, allowlist, url, allowed):
    settings = get_settings()
    monkeypatch.setattr(settings, "webhook_secret", "s3cret")
    monkeypatch.setattr(settings, "webhook_allowlist", allowlist)
    if allowed:
        assert webhooks.check_target(url) == url
    else:
        with pytest.raises(ValueError, match="allow-list"):
            webhooks.check_target(url)


def test_each_tenant_signs_with_its_own_secret_and_a_timestamp(client, keys, receiver):
    secret_a, secret_b = webhook_secret(client, keys["a"]), webhook_secret(client, keys["b"])
    assert secret_a != secret_b and "s3cret" not in (secret_a, secret_b)
    job_id = client.post("/v1/jobs", json={**JOB, "webhook_url": receiver}, headers=auth(keys["a"])).json()["id"]
    client.post(f"/v1/jobs/{job_id}/cancel", headers=auth(keys["a"]))
    headers, body = Receiver.received[-1]
    assert verified(headers, body, secret_a)["job_id"] == job_id
    with pytest.raises(AssertionError, match="signature"):
        verified(headers, body, secret_b)  # tenant b cannot forge (or vouch for) tenant a's events
    with pytest.raises(AssertionError, match="signature"):
        verified(headers, body.replace(b"cancelled", b"succeeded"), secret_a)
    with pytest.raises(AssertionError, match="replay window"):
        verified(headers, body, secret_a, now=time.time() + webhooks.REPLAY_WINDOW_SECONDS + 60)


# --- 11. metrics, keys, broker errors ---

def test_metrics_need_the_metrics_token_when_keys_are_required(client, keys, monkeypatch):
    assert client.get("/metrics").status_code == 401  # no token configured: closed
    assert client.get("/metrics", headers=auth(keys["a"])).status_code == 401  # a tenant key is not enough
    monkeypatch.setattr(get_settings(), "metrics_token", "t0ken")
    assert client.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
    scrape = client.get("/metrics", headers={"Authorization": "Bearer t0ken"})
    assert scrape.status_code == 200 and "mixq_jobs" in scrape.text
    with TestClient(create_app(auth_disabled=True), base_url="http://127.0.0.1:8000") as local:
        assert local.get("/metrics").status_code == 200  # local mode: no tenants to hide from each other


def test_metrics_histogram_is_aggregated_by_the_database(client, keys, monkeypatch):
    from prometheus_client.parser import text_string_to_metric_families

    from app.api.routes.health import DURATION_BUCKETS

    monkeypatch.setattr(get_settings(), "metrics_token", "t0ken")
    scrape = client.get("/metrics", headers={"Authorization": "Bearer t0ken"}).text
    samples = {(s.name, s.labels.get("le")): s.value for family in text_string_to_metric_families(scrape)
               for s in family.samples}
    with session_scope() as session:
        finished = [(job.finished_at - job.started_at).total_seconds() for job in session.scalars(
            select(Job).where(Job.status.in_(FINISHED), Job.started_at.is_not(None), Job.finished_at.is_not(None)))]
    assert samples[("mixq_job_duration_seconds_count", None)] == len(finished) > 0
    assert samples[("mixq_job_duration_seconds_sum", None)] == pytest.approx(sum(finished), rel=1e-3)
    for bound in DURATION_BUCKETS:
        assert samples[("mixq_job_duration_seconds_bucket", str(bound))] == sum(d <= bound for d in finished)


def test_keys_can_be_listed_and_revoked(client, monkeypatch):
    def mixq(*args):  # the same database as this process's app (conftest's MIXQ_DATA_DIR)
        return subprocess.run([sys.executable, "-m", "app.cli", "keys", *args], cwd=ROOT,
                              capture_output=True, text=True, timeout=120)

    monkeypatch.setattr(get_settings(), "key_cache_seconds", 0)  # this process re-reads keys at once
    key = mixq("create", "--tenant", "revocable").stdout.strip()
    assert client.get("/v1/jobs", headers=auth(key)).status_code == 200
    listing = mixq("list", "--tenant", "revocable").stdout
    assert key[:12] in listing and "active" in listing and key not in listing  # never the key itself
    revoked = mixq("revoke", key[:12])
    assert revoked.returncode == 0, revoked.stderr
    assert client.get("/v1/jobs", headers=auth(key)).status_code == 401
    assert "revoked" in mixq("list", "--tenant", "revocable").stdout
    again = mixq("revoke", key[:12])
    assert again.returncode == 2 and "no active key" in again.stderr
