"""The Celery worker application: the shared configuration (app.core.queue) plus this side's tasks."""

from __future__ import annotations

from celery.signals import worker_ready

from app.core.logs import quiet_library_noise
from app.core.queue import SWEEP, make_celery

quiet_library_noise()

app = make_celery(include=("worker.tasks",))


@worker_ready.connect
def _sweep_on_start(sender=None, **_):
    """A worker that starts after a crash picks up the jobs the dead worker held."""
    app.send_task(SWEEP)
