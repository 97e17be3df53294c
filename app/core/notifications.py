"""What happens when a job ends: its webhook is notified, and its registry entry's on a regression."""

from __future__ import annotations

from sqlalchemy import select

from . import webhooks
from .db import session_scope
from .history import rows
from .models import SUCCEEDED, Job, RegistryEntry, RegistryRun


def job_ended(job_id: str) -> None:
    with session_scope() as session:
        job = session.get(Job, job_id)
        summary = {"job_id": job.id, "model": job.model, "status": job.status, "error": job.error,
                   "revision": job.revision, "final_metric": job.final_metric,
                   "latency_reduction": job.latency_reduction, "registry_entry_id": job.registry_entry_id}
        regression = None
        if job.registry_entry_id and job.status == SUCCEEDED:
            entry = session.get(RegistryEntry, job.registry_entry_id)
            run = session.scalar(select(RegistryRun).where(RegistryRun.job_id == job.id))
            latest = rows(session, entry, [run])[0] if run else None
            if latest and latest["regression"]:
                regression = {**summary, "delta_metric": latest["delta_metric"],
                              "delta_reduction": latest["delta_reduction"],
                              "threshold": entry.regression_threshold}
        url, tenant_id = job.webhook_url, job.tenant_id
    webhooks.send(url, f"job.{summary['status']}", summary, tenant_id)
    if regression:
        webhooks.send(url, "registry.regression", regression, tenant_id)
