"""What happens when a job ends: its webhook is notified, and its registry entry's on a regression."""

from __future__ import annotations

from . import webhooks
from .db import session_scope
from .history import history
from .models import SUCCEEDED, Job, RegistryEntry


def job_ended(job_id: str) -> None:
    with session_scope() as session:
        job = session.get(Job, job_id)
        summary = {"job_id": job.id, "model": job.model, "status": job.status, "error": job.error,
                   "revision": job.revision, "final_metric": job.final_metric,
                   "latency_reduction": job.latency_reduction, "registry_entry_id": job.registry_entry_id}
        regression = None
        if job.registry_entry_id and job.status == SUCCEEDED:
            entry = session.get(RegistryEntry, job.registry_entry_id)
            latest = next((row for row in reversed(history(session, entry)) if row["job_id"] == job.id), None)
            if latest and latest["regression"]:
                regression = {**summary, "delta_metric": latest["delta_metric"],
                              "delta_reduction": latest["delta_reduction"],
                              "threshold": entry.regression_threshold}
        url = job.webhook_url
    webhooks.send(url, f"job.{summary['status']}", summary)
    if regression:
        webhooks.send(url, "registry.regression", regression)
