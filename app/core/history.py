"""A registry entry's runs, a page at a time, with each successful run's deltas to the previous successful
one and whether it regressed."""

from __future__ import annotations

from sqlalchemy import select

from .models import SUCCEEDED, Job, RegistryEntry, RegistryRun


def _previous_success(session, entry_id: str, before_run_id: int) -> Job | None:
    return session.scalar(select(Job).join(RegistryRun, RegistryRun.job_id == Job.id).where(
        RegistryRun.entry_id == entry_id, RegistryRun.id < before_run_id, Job.status == SUCCEEDED)
        .order_by(RegistryRun.id.desc()).limit(1))


def rows(session, entry: RegistryEntry, runs: list[RegistryRun]) -> list[dict]:
    """`runs` (oldest first) as history rows; the deltas of the first reach back past the page."""
    out, previous = [], _previous_success(session, entry.id, runs[0].id) if runs else None
    for run in runs:
        job = run.job
        row = {"run_id": run.id, "fired_at": run.fired_at, "trigger": run.trigger, "revision": run.revision,
               "outcome": run.outcome, "reason": run.reason, "job_id": run.job_id,
               "job_status": job.status if job else None, "final_metric": None, "latency_ms": None,
               "latency_reduction": None, "delta_metric": None, "delta_reduction": None, "regression": False}
        if job is not None and job.status == SUCCEEDED:
            row.update(final_metric=job.final_metric, latency_reduction=job.latency_reduction,
                       latency_ms=job.report["final"]["latency_ms"]["median"])
            if previous is not None:
                row["delta_metric"] = job.final_metric - previous.final_metric
                row["delta_reduction"] = job.latency_reduction - previous.latency_reduction
                drop = -row["delta_metric"] / abs(previous.final_metric) if previous.final_metric else 0.0
                row["regression"] = (row["delta_reduction"] < -entry.regression_threshold
                                     or drop > entry.regression_threshold)
            previous = job
        out.append(row)
    return out


def history(session, entry: RegistryEntry, limit: int, before: int | None = None) -> tuple[list[dict], int | None]:
    """Newest first: up to `limit` runs older than run id `before`, and the cursor of the next page."""
    query = select(RegistryRun).where(RegistryRun.entry_id == entry.id)
    if before is not None:
        query = query.where(RegistryRun.id < before)
    page = list(session.scalars(query.order_by(RegistryRun.id.desc()).limit(limit + 1)))
    more = len(page) > limit
    page = page[:limit]
    return rows(session, entry, page[::-1])[::-1], page[-1].id if more else None
