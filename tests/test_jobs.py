"""The job state machine (app.core.jobs): every terminal transition notifies, the outbox publishes what
the request did not, and the sweeper repairs what a dead worker or broker left."""

from datetime import timedelta

import pytest
from sqlalchemy import update

from app.core import jobs, queue
from app.core.db import session_scope
from app.core.models import Job, utcnow
from app.core.settings import get_settings
from conftest import SMALL_JOB, Receiver, auth, verified


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
    assert headers["X-Mixq-Event"] == "job.cancelled" and verified(headers, body)["job_id"] == job_id


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
    assert headers["X-Mixq-Event"] == "job.failed" and verified(headers, body)["job_id"] == job_id


def test_a_running_job_whose_worker_went_silent_is_requeued_and_published(client, keys, broker):
    job_id = _submit(client, keys["a"])
    assert jobs.claim(job_id, "worker-that-dies") is not None
    with session_scope() as session:
        session.execute(update(Job).where(Job.id == job_id).values(heartbeat_at=utcnow() - timedelta(hours=1)))
    broker.sent.clear()
    assert jobs.sweep()["requeued"] == 1
    assert _job(job_id).status == "queued" and broker.sent == [job_id]
    assert not jobs.update_if_mine(job_id, "worker-that-dies", progress=0.5)  # its claim is gone


def test_an_unclaimed_job_is_published_again(client, keys, broker, monkeypatch):
    job_id = _submit(client, keys["a"])
    broker.sent.clear()
    assert job_id not in broker.sent
    monkeypatch.setattr(get_settings(), "unclaimed_after_seconds", 0)
    jobs.sweep()
    assert job_id in broker.sent  # the claim tolerates the duplicate message
