"""Runs one job: claim it, run the engine with progress and cancellation, store the results once.

Exactly-once results without trusting the broker:
- `claim` is a conditional UPDATE: only a queued job, or a running one whose heartbeat is stale
  (its worker died), can be taken; a duplicate delivery of a live job finds nothing to claim.
- while it runs, a heartbeat thread refreshes `heartbeat_at` and reads the cancel flag.
- the results are written in one transaction, and only while this worker still holds the claim;
  old layer/step/artifact rows of the job are replaced, never added to.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import threading
import time
import zipfile
from datetime import timedelta
from pathlib import Path

from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy import delete, or_, select, update

from app import registry
from app.db import session_scope
from app.models import CANCELLED, FAILED, QUEUED, RUNNING, SUCCEEDED, Artifact, Job, LayerResult, SearchStep, utcnow
from app.settings import Settings, get_settings
from worker.engine import (Budget, Cancelled, CompressOptions, DataOptions, InputError, LatencyOptions,
                           SensitivityOptions, compress)
from worker.engine.pipeline import Progress
from worker.engine.report import REPORT_FORMAT
from worker.engine.sensitivity import Sensitivity
from worker.engine.sources import parse_source, resolve_revision

log = logging.getLogger("mixq.runner")


def options_for(request: dict, settings: Settings, out_dir: Path) -> CompressOptions:
    """The job request (as validated by the API) in the engine's terms."""
    budget = request["budget"]
    data = request.get("data") or {}
    samples = request["hutchinson_samples"]
    return CompressOptions(
        budget=Budget(budget["max_drop"], budget.get("min_drop", 0.0), budget.get("mode", "relative")),
        sensitivity=SensitivityOptions(ordering=request["ordering"], interlayer=request["interlayer"],
                                       hutchinson_max_samples=samples, hutchinson_min_samples=min(4, samples)),
        data=DataOptions(spec=data.get("spec"), split=data.get("split", "train"),
                         text_column=data.get("text_column", "text"), label_column=data.get("label_column", "label"),
                         image_column=data.get("image_column", "image"), synthetic=data.get("synthetic", False),
                         calibration_samples=request["calibration_samples"], eval_samples=request["eval_samples"],
                         test_samples=request.get("test_samples", DataOptions.test_samples),
                         batch_size=request["batch_size"], seq_len=request["seq_len"]),
        latency=LatencyOptions(),
        device=settings.device,
        low_precision=request["precisions"][0],
        threads=settings.threads,
        model_root=settings.model_root,
        cache_dir=settings.cache_dir,
        out_dir=out_dir,
    )


# The request fields the sensitivity analysis depends on (the budget is not one of them).
SENSITIVITY_FIELDS = ("ordering", "interlayer", "hutchinson_samples", "calibration_samples", "batch_size", "seq_len",
                      "data")


def sensitivity_key(request: dict, revision: str) -> str:
    # The report format versions the analysis itself: a new engine never reuses an old one's scores.
    identity = [REPORT_FORMAT, request["model"], revision, {k: request.get(k) for k in SENSITIVITY_FIELDS}]
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def warm_start(job_id: str, request: dict, settings: Settings) -> tuple[str | None, Sensitivity | None, Job | None]:
    """Record the job's revision; find an earlier analysis of the same revision and data to reuse."""
    try:
        revision = resolve_revision(parse_source(request["model"]), settings.model_root)
    except InputError:
        return None, None, None  # the pipeline reports the real problem when it loads the model
    key = sensitivity_key(request, revision)
    with session_scope() as session:
        job = session.get(Job, job_id)
        job.revision, job.sensitivity_key = revision, key
        donor = session.scalar(select(Job).where(Job.sensitivity_key == key, Job.status == SUCCEEDED,
                                                 Job.tenant_id == job.tenant_id, Job.id != job_id)
                               .order_by(Job.finished_at.desc()))
        # A random ordering costs nothing to recompute: reusing one would report a saving that is not there.
        if donor is None or donor.request.get("ordering") == "random":
            return revision, None, None
        return revision, Sensitivity.from_report(donor.report), donor


def claim(job_id: str, worker: str, settings: Settings) -> Job | None:
    now = utcnow()
    stale = now - timedelta(seconds=settings.stale_after_seconds)
    with session_scope() as session:
        taken = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.cancel_requested.is_(False),
                   or_(Job.status == QUEUED, (Job.status == RUNNING) & (Job.heartbeat_at < stale)))
            .values(status=RUNNING, worker=worker, heartbeat_at=now, attempts=Job.attempts + 1,
                    started_at=now, message="running", error=None)
        ).rowcount
        return session.get(Job, job_id) if taken == 1 else None


def _update_if_mine(job_id: str, worker: str, **values) -> bool:
    with session_scope() as session:
        return session.execute(
            update(Job).where(Job.id == job_id, Job.worker == worker, Job.status == RUNNING).values(**values)
        ).rowcount == 1


class Heartbeat(threading.Thread):
    """Keeps the claim alive during long phases (one Hessian-vector product can take seconds)."""

    def __init__(self, job_id: str, worker: str, interval: float):
        super().__init__(daemon=True, name=f"heartbeat-{job_id}")
        self.job_id, self.worker, self.interval = job_id, worker, interval
        self.stop = threading.Event()
        self.cancel = threading.Event()
        self.lost = threading.Event()  # another worker took the job over: stop working on it

    def run(self) -> None:
        while not self.stop.wait(self.interval):
            try:
                if not _update_if_mine(self.job_id, self.worker, heartbeat_at=utcnow()):
                    self.lost.set()
                with session_scope() as session:
                    if session.scalar(select(Job.cancel_requested).where(Job.id == self.job_id)):
                        self.cancel.set()
            except Exception:  # a database hiccup must not kill the job; the next beat retries
                log.warning("heartbeat failed for job %s", self.job_id, exc_info=True)


class ProgressWriter:
    """Writes progress in short transactions, at most a few times a second, and stops on cancel."""

    def __init__(self, job_id: str, worker: str, heartbeat: Heartbeat, min_interval: float = 0.5):
        self.job_id, self.worker, self.heartbeat, self.min_interval = job_id, worker, heartbeat, min_interval
        self.last_write = 0.0
        self.last_key = None

    def __call__(self, event: Progress) -> None:
        if self.heartbeat.cancel.is_set():
            raise Cancelled("cancelled by request")
        if self.heartbeat.lost.is_set():
            raise Cancelled("another worker took this job over")
        key = (event.phase, event.step)
        now = time.monotonic()
        if key == self.last_key and now - self.last_write < self.min_interval:
            return
        self.last_key, self.last_write = key, now
        _update_if_mine(self.job_id, self.worker, phase=event.phase, progress=event.fraction, step=event.step,
                        steps=event.steps, message=event.message, phases=event.phases, heartbeat_at=utcnow())


def run(job_id: str, worker: str, settings: Settings | None = None) -> str | None:
    """Run the job if it can be claimed; returns its final status, or None if another holder has it."""
    settings = settings or get_settings()
    job = claim(job_id, worker, settings)
    if job is None:
        log.info("job %s not claimable (finished, cancelled or running elsewhere)", job_id)
        return None
    out_dir = Path(settings.artifacts_dir) / job_id / f"attempt-{job.attempts}"
    heartbeat = Heartbeat(job_id, worker, settings.heartbeat_seconds)
    heartbeat.start()
    try:
        revision, reused, donor = warm_start(job_id, job.request, settings)
        options = options_for(job.request, settings, out_dir)
        options.reuse_sensitivity, options.revision = reused, revision
        report = compress(job.model, options, progress=ProgressWriter(job_id, worker, heartbeat))
        if donor is not None and report.search["method"].get("reused"):
            report.warm_start = {"reused_from_job": donor.id, "saved_seconds": round(
                donor.phases.get("sensitivity", 0.0) - report.phases["sensitivity"], 3)}
    except Cancelled as exc:
        return _finish(job_id, worker, CANCELLED, message=str(exc))
    except InputError as exc:
        return _finish(job_id, worker, FAILED, error=str(exc))
    except SoftTimeLimitExceeded:
        return _finish(job_id, worker, FAILED, error=f"time limit exceeded ({settings.job_soft_time_limit}s)")
    except Exception as exc:
        log.exception("job %s failed", job_id)
        return _finish(job_id, worker, FAILED, error=f"internal error: {type(exc).__name__}: {exc}")
    finally:
        heartbeat.stop.set()
    return store_results(job_id, worker, report.to_dict(), out_dir)


def _finish(job_id: str, worker: str, status: str, message: str | None = None, error: str | None = None) -> str:
    if _update_if_mine(job_id, worker, status=status, finished_at=utcnow(), message=message or status, error=error):
        _notify(job_id)
    return status


def _notify(job_id: str) -> None:
    try:
        registry.after_job(job_id)
    except Exception:  # a notification problem never changes the job's outcome
        log.exception("notifications for job %s failed", job_id)


def _bundle(out_dir: Path) -> Path:
    path = out_dir / "bundle.zip"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:  # weights do not compress
        for file in sorted(out_dir.rglob("*")):
            if file.is_file() and file != path:
                archive.write(file, file.relative_to(out_dir))
    return path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def store_results(job_id: str, worker: str, report: dict, out_dir: Path) -> str | None:
    bundle = _bundle(out_dir)
    with session_scope() as session:
        job = session.scalar(select(Job).where(Job.id == job_id, Job.worker == worker, Job.status == RUNNING)
                             .with_for_update())
        if job is None:  # presumed dead and taken over: the new holder writes the results
            log.warning("job %s: lost the claim before storing results; discarding this run", job_id)
            shutil.rmtree(out_dir, ignore_errors=True)
            return None
        for model in (LayerResult, SearchStep, Artifact):
            session.execute(delete(model).where(model.job_id == job_id))
        session.add_all(LayerResult(job_id=job_id, position=i, **{k: layer[k] for k in (
            "name", "kind", "params", "hessian_trace", "trace_stderr", "hessian_term", "interlayer", "score", "rank",
            "precision")}) for i, layer in enumerate(report["layers"]))
        session.add_all(SearchStep(job_id=job_id, position=i, k=s["k"], metric=s["metric"], drop=s["drop"],
                                   latency_ms=s["latency_ms"], accepted=s["accepted"], chosen=s["chosen"])
                        for i, s in enumerate(report["search"]["steps"]))
        session.add(Artifact(job_id=job_id, kind="bundle", path=str(bundle), size_bytes=bundle.stat().st_size,
                             sha256=_sha256(bundle)))
        job.status, job.finished_at, job.progress, job.phase = SUCCEEDED, utcnow(), 1.0, "done"
        job.message = report["message"]
        job.report, job.phases, job.result_status = report, report["phases"], report["status"]
        job.baseline_metric, job.final_metric = report["baseline"]["metric"], report["final"]["metric"]
        job.latency_reduction = report["latency_reduction"]
    _notify(job_id)
    return SUCCEEDED


def requeue_stale(settings: Settings | None = None) -> list[tuple[str, int]]:
    """Running jobs whose heartbeat stopped (their worker died) go back to the queue."""
    settings = settings or get_settings()
    stale = utcnow() - timedelta(seconds=settings.stale_after_seconds)
    with session_scope() as session:
        jobs = list(session.scalars(select(Job).where(Job.status == RUNNING, Job.heartbeat_at < stale)
                                    .with_for_update(skip_locked=True)))
        for job in jobs:
            job.status, job.worker, job.message = QUEUED, None, "requeued: its worker stopped responding"
        return [(job.id, job.priority) for job in jobs]
