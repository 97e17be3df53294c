"""Runs one job: claim it, run the engine with progress and cancellation, store the results once.

Every status change goes through `app.core.jobs` (the claim, progress and results are written only while
this worker holds the claim); this module adds what only a worker does: the heartbeat thread, the
engine call, the warm start and the artifact bundle.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import threading
import time
import zipfile
from pathlib import Path

from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy import select

from app.core import jobs
from app.core.auth import may_use_hub_token
from app.core.db import session_scope
from app.core.models import CANCELLED, FAILED, SUCCEEDED, Job, utcnow
from app.core.settings import Settings, get_settings
from worker.engine.errors import Cancelled, InputError
from worker.engine.hardware import detect
from worker.engine.pipeline import CompressOptions, Progress, compress
from worker.engine.report import REPORT_FORMAT
from worker.engine.sensitivity import Sensitivity
from worker.engine.spec import parse_source, resolve_revision

log = logging.getLogger("mixq.runner")

# The request fields the sensitivity analysis depends on (the budget is not one of them).
SENSITIVITY_FIELDS = ("ordering", "interlayer", "analysis_loss", "hutchinson_samples", "calibration_samples",
                      "batch_size", "seq_len", "data")


def sensitivity_key(request: dict, revision: str, hardware_key: str) -> str:
    # The report format versions the analysis itself: a new engine never reuses an old one's scores. The hardware
    # too: what the simulation reproduces (activation widths, kernels, the format menu) is measured per machine.
    identity = [REPORT_FORMAT, request["model"], revision, hardware_key,
                {k: request.get(k) for k in SENSITIVITY_FIELDS}]
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def warm_start(job_id: str, request: dict, settings: Settings, hub_token: bool
               ) -> tuple[str | None, Sensitivity | None, Job | None]:
    """Record the job's revision; find an earlier analysis of the same revision and data to reuse."""
    try:
        revision = resolve_revision(parse_source(request["model"]), settings.model_root, settings.hub_timeout_seconds,
                                    hub_token)
    except InputError:
        return None, None, None  # the pipeline reports the real problem when it loads the model
    key = sensitivity_key(request, revision, detect(settings.device).key)
    with session_scope() as session:
        job = session.get(Job, job_id)
        job.revision, job.sensitivity_key = revision, key
        donor = session.scalar(select(Job).where(Job.sensitivity_key == key, Job.status == SUCCEEDED,
                                                 Job.tenant_id == job.tenant_id, Job.id != job_id)
                               .order_by(Job.finished_at.desc()))
        # A random ordering costs nothing to recompute: reusing one would report a saving that is not there.
        if donor is None or donor.request.get("ordering") == "random":
            return revision, None, None
        reused = Sensitivity.from_report(donor.report)  # None where the donor needed no analysis
        return revision, reused, donor if reused else None


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
                if not jobs.update_if_mine(self.job_id, self.worker, heartbeat_at=utcnow()):
                    self.lost.set()
                if jobs.cancel_requested(self.job_id):
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
        jobs.update_if_mine(self.job_id, self.worker, phase=event.phase, progress=event.fraction, step=event.step,
                            steps=event.steps, message=event.message, phases=event.phases, heartbeat_at=utcnow())


def run(job_id: str, worker: str, settings: Settings | None = None) -> str | None:
    """Run the job if it can be claimed; returns its final status, or None if another holder has it."""
    settings = settings or get_settings()
    job = jobs.claim(job_id, worker, settings)
    if job is None:
        log.info("job %s not claimable (finished, cancelled, out of attempts or running elsewhere)", job_id)
        return None
    out_dir = Path(settings.artifacts_dir) / job_id / f"attempt-{job.attempts}"
    heartbeat = Heartbeat(job_id, worker, settings.heartbeat_seconds)
    heartbeat.start()  # beats until the results are stored: zipping and hashing a large bundle takes a while
    try:
        report = _compress(job, settings, out_dir, ProgressWriter(job_id, worker, heartbeat))
        stored = jobs.finish(job_id, worker, report.to_dict(), _artifacts(out_dir, report))
    except Cancelled as exc:
        return _end(job_id, worker, CANCELLED, message=str(exc))
    except InputError as exc:
        return _end(job_id, worker, FAILED, error=str(exc))
    except SoftTimeLimitExceeded:
        return _end(job_id, worker, FAILED, error=f"time limit exceeded ({settings.job_soft_time_limit}s)")
    except OSError as exc:  # a full disk or a lost volume while writing the model or its bundle
        log.exception("job %s could not store its results", job_id)
        return _end(job_id, worker, FAILED, error=f"could not store the results: {exc.strerror or exc}")
    except Exception as exc:
        log.exception("job %s failed", job_id)
        return _end(job_id, worker, FAILED, error=f"internal error: {type(exc).__name__}: {exc}")
    finally:
        heartbeat.stop.set()
    if stored != SUCCEEDED:  # the claim was lost, or a cancel arrived as the job finished
        log.warning("job %s: %s; discarding this run's results", job_id,
                    "cancelled as it finished" if stored else "lost the claim before storing results")
        shutil.rmtree(out_dir, ignore_errors=True)
    return stored


def _compress(job: Job, settings: Settings, out_dir: Path, progress: ProgressWriter):
    with session_scope() as session:
        hub_token = may_use_hub_token(session, job.tenant_id)
    revision, reused, donor = warm_start(job.id, job.request, settings, hub_token)
    options = CompressOptions.from_request(job.request, device=settings.device, threads=settings.threads,
                                           model_root=settings.model_root, cache_dir=settings.cache_dir,
                                           out_dir=out_dir, profile_seconds=settings.profile_seconds_per_layer,
                                           hub_token=hub_token)
    options.reuse_sensitivity, options.revision = reused, revision
    options.data.max_input_bytes = settings.max_job_memory_bytes  # checked again before images are allocated
    report = compress(job.model, options, progress=progress)
    if donor is not None and report.search["method"].get("reused"):
        report.warm_start = {"reused_from_job": donor.id, "saved_seconds": round(
            donor.phases.get("sensitivity", 0.0) - report.phases["sensitivity"], 3)}
    return report


def _end(job_id: str, worker: str, status: str, message: str | None = None, error: str | None = None) -> str:
    jobs.end_running(job_id, worker, status, message, error)
    return status


def _artifacts(out_dir: Path, report) -> dict[str, dict]:
    """Each downloadable file by kind: the bundle (everything), and the deployable files inside it."""
    files = {"bundle": _bundle(out_dir)}
    if report.artifact and "weights" in report.artifact:  # a plan searched outside torch has no torch weights
        files["safetensors"] = out_dir / report.artifact["weights"]
    onnx = report.exports.get("onnx") or {}
    if onnx.get("file") and not onnx.get("error"):
        files["onnx"] = out_dir / onnx["file"]
    if report.artifact and "gguf" in report.artifact:  # a plan searched in llama.cpp
        files["gguf"] = out_dir / report.artifact["gguf"]
    return {kind: {"path": str(path), "size_bytes": path.stat().st_size, "sha256": _sha256(path)}
            for kind, path in files.items()}


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
