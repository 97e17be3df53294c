"""A registry entry's runs in order, with each successful run's deltas to the previous one and whether
it regressed."""

from __future__ import annotations

from .models import SUCCEEDED, RegistryEntry


def history(session, entry: RegistryEntry) -> list[dict]:
    """Runs in order, with each successful run's deltas to the previous successful one."""
    rows, previous = [], None
    for run in entry.runs:
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
        rows.append(row)
    return rows
