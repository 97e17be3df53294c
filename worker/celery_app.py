"""The compression workers' Celery application: the shared configuration (app.core.queue) plus the job task."""

from __future__ import annotations

from celery.signals import worker_ready

from app.core.logs import quiet_library_noise
from app.core.queue import SWEEP, make_celery, send

quiet_library_noise()

app = make_celery(include=("worker.tasks",))


@worker_ready.connect
def _sweep_on_start(sender=None, **_):
    """A worker that starts after a crash has the housekeeping worker pick up the jobs the dead worker held."""
    send(SWEEP, [])
