"""The job state machine (app.core.jobs): every terminal transition notifies, the outbox publishes what
the request did not, and the sweeper repairs what a dead worker or broker left."""

import errno
import os
import time
from datetime import timedelta

import pytest
from sqlalchemy import update

from app.core import jobs, queue
from app.core.db import session_scope
from app.core.models import Job, utcnow
from app.core.settings import get_settings
from conftest import SMALL_JOB, Receiver, auth, verified, webhook_secret


class Broker:
    """Stands in for the broker's publish call: records, or fails like an unreachable one."""

    def __init__(self):
        self.sent, self.down = [], False

    def __call__(self, job_id, priority):
        if self.down:
            raise ConnectionError("OperationalError: (sqlite3) INSERT INTO kombu_message SECRET-BROKER-DETAIL")
        self.sent.append(job_id)


@pytest.fixture
def broker(monkeypatch):
    fake = Broker()
    monkeypatch.setattr(queue, "run_job", fake)
    return fake


def _submit(client, key, **overrides):
    body = {"model": "builtin:digits-resnet", "budget": {"max_drop": 0.01}, **SMALL_JOB, **overrides}
    response = client.post("/v1/jobs", json=body, headers=auth(key))
    assert response.status_code == 202, response.text
    return response.json()["id"]


def _job(job_id: str) -> Job:
    with session_scope() as session:
        return session.get(Job, job_id)


def test_submit_publishes_after_the_response(client, keys, broker):
    job_id = _submit(client, keys["a"])
    assert broker.sent == [job_id]  # the background task ran once the response was sent
    assert _job(job_id).enqueued_at is not None


def test_cancel_while_queued_notifies_like_every_other_end(client, keys, broker, receiver):
    job_id = _submit(client, keys["a"], webhook_url=receiver)
    cancelled = client.post(f"/v1/jobs/{job_id}/cancel", headers=auth(keys["a"])).json()
    assert cancelled["status"] == "cancelled" and cancelled["finished"]
    headers, body = Receiver.received[-1]
    assert headers["X-Mixq-Event"] == "job.cancelled" and verified(headers, body, webhook_secret(client, keys["a"]))["job_id"] == job_id


def test_a_job_the_broker_never_took_is_published_by_the_sweeper(client, keys, broker, monkeypatch):
    broker.down = True
    job_id = _submit(client, keys["a"])
    assert _job(job_id).status == "queued" and _job(job_id).enqueued_at is None  # stored, not lost
    broker.down = False
    monkeypatch.setattr(get_settings(), "publish_grace_seconds", 0)
    assert jobs.sweep()["published"] >= 1
    assert job_id in broker.sent and _job(job_id).enqueued_at is not None


def test_a_job_that_cannot_be_queued_fails_with_a_plain_reason_and_notifies(client, keys, broker, receiver,
                                                                            monkeypatch):
    broker.down = True
    job_id = _submit(client, keys["a"], webhook_url=receiver)
    monkeypatch.setattr(get_settings(), "publish_deadline_seconds", 0)
    assert jobs.sweep()["failed"] >= 1
    job = _job(job_id)
    assert job.status == "failed" and "could not be queued" in job.error
    assert "SECRET-BROKER-DETAIL" not in job.error  # the broker's detail is logged, never shown
    headers, body = Receiver.received[-1]
    assert headers["X-Mixq-Event"] == "job.failed" and verified(headers, body, webhook_secret(client, keys["a"]))["job_id"] == job_id


def test_a_running_job_whose_worker_went_silent_is_requeued_and_published(client, keys, broker):
    job_id = _submit(client, keys["a"])
    assert jobs.claim(job_id, "worker-that-dies") is not None
    with session_scope() as session:
        session.execute(update(Job).where(Job.id == job_id).values(heartbeat_at=utcnow() - timedelta(hours=1)))
    broker.sent.clear()
    assert jobs.sweep()["requeued"] == 1
    # Published once; the sweep may also republish other tests' jobs left queued past the unclaimed limit.
    assert _job(job_id).status == "queued" and broker.sent.count(job_id) == 1
    assert not jobs.update_if_mine(job_id, "worker-that-dies", progress=0.5)  # its claim is gone


def test_an_unclaimed_job_is_published_again(client, keys, broker, monkeypatch):
    job_id = _submit(client, keys["a"])
    broker.sent.clear()
    assert job_id not in broker.sent
    monkeypatch.setattr(get_settings(), "unclaimed_after_seconds", 0)
    jobs.sweep()
    assert job_id in broker.sent  # the claim tolerates the duplicate message


def _silence(job_id: str) -> None:
    """The worker holding the job died: its heartbeat stops."""
    with session_scope() as session:
        session.execute(update(Job).where(Job.id == job_id).values(heartbeat_at=utcnow() - timedelta(hours=1)))


def test_a_job_that_keeps_killing_its_worker_fails_after_max_attempts(client, keys, broker, receiver):
    job_id = _submit(client, keys["a"], webhook_url=receiver)
    for attempt in range(1, get_settings().max_attempts + 1):
        assert jobs.claim(job_id, f"worker-{attempt}") is not None
        _silence(job_id)
        jobs.sweep()
    job = _job(job_id)
    assert job.status == "failed" and job.attempts == 3
    assert job.error.startswith("gave up after 3 attempts") and "hard time limit" in job.error
    headers, body = Receiver.received[-1]
    assert headers["X-Mixq-Event"] == "job.failed" and verified(headers, body, webhook_secret(client, keys["a"]))["job_id"] == job_id


def test_a_redelivered_job_out_of_attempts_fails_instead_of_running(client, keys, broker):
    job_id = _submit(client, keys["a"])
    for attempt in range(3):
        assert jobs.claim(job_id, f"worker-{attempt}") is not None
        _silence(job_id)  # each worker killed (the broker redelivers: acks_late)
    assert jobs.claim(job_id, "worker-4") is None
    job = _job(job_id)
    assert job.status == "failed" and "gave up after 3 attempts" in job.error


def test_a_cancel_requested_job_whose_worker_died_ends_cancelled(client, keys, broker, receiver):
    job_id = _submit(client, keys["a"], webhook_url=receiver)
    assert jobs.claim(job_id, "worker-that-dies") is not None
    assert client.post(f"/v1/jobs/{job_id}/cancel", headers=auth(keys["a"])).json()["cancel_requested"]
    _silence(job_id)
    assert jobs.sweep()["cancelled"] == 1
    assert _job(job_id).status == "cancelled"
    headers, body = Receiver.received[-1]
    assert headers["X-Mixq-Event"] == "job.cancelled" and verified(headers, body, webhook_secret(client, keys["a"]))["job_id"] == job_id


def test_a_registry_run_whose_enqueue_fails_is_not_a_500_and_does_not_block_its_entry(client, keys, broker,
                                                                                    monkeypatch):
    body = {"model": "builtin:digits-resnet", "budget": {"max_drop": 0.01}, "schedule": {"interval_seconds": 3600},
            **SMALL_JOB}
    entry = client.post("/v1/registry", json=body, headers=auth(keys["a"])).json()
    broker.down = True
    run = client.post(f"/v1/registry/{entry['id']}/run", headers=auth(keys["a"]))
    assert run.status_code == 200 and run.json()["outcome"] == "enqueued"
    stuck = run.json()["job_id"]
    assert _job(stuck).status == "queued" and _job(stuck).enqueued_at is None
    monkeypatch.setattr(get_settings(), "publish_deadline_seconds", 0)
    jobs.sweep()
    assert _job(stuck).status == "failed"
    broker.down = False
    again = client.post(f"/v1/registry/{entry['id']}/run", headers=auth(keys["a"])).json()
    assert (again["outcome"], again["reason"]) == ("enqueued", "the last job failed: trying again")
    assert again["job_id"] != stuck and again["job_id"] in broker.sent


def test_storing_keeps_the_claim_alive_and_a_full_disk_fails_the_job_with_the_reason(client, keys, broker,
                                                                                   monkeypatch):
    """Zipping and hashing a large bundle outlasts the stale limit; a disk that fills up then must end the
    job, not leave it running for the sweeper to requeue."""
    from worker import runner

    monkeypatch.setattr(get_settings(), "stale_after_seconds", 0.6)  # heartbeats come every 0.2 s in tests
    while_storing = []

    def slow_full_disk(out_dir):
        time.sleep(1.5)
        jobs.sweep()
        while_storing.append(_job(job_id).status)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(runner, "_bundle", slow_full_disk)
    job_id = _submit(client, keys["a"])
    assert runner.run(job_id, worker="t") == "failed"
    assert while_storing == ["running"]  # still beating while it stored: the sweeper left it alone
    job = _job(job_id)
    assert (job.status, job.error, job.attempts) == ("failed", "could not store the results: No space left on device", 1)
