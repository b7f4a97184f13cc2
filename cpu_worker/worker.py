"""The CPU worker process: `celery --app cpu_worker.worker worker --queues cpu --pool prefork`.

Registers the preprocessing tasks and publishes a heartbeat and runs the lease reaper
(`tasks/leases.py`). Imports no model code (no torch).
"""

from __future__ import annotations

from typing import Any

from celery import signals

from cpu_worker import tasks as _tasks  # noqa: F401  (registers the cpu-queue tasks)
from tasks import heartbeat, leases
from tasks.celery_app import CPU_QUEUE, app

__all__ = ["app"]


@signals.worker_ready.connect
def _start_heartbeat(sender: Any = None, **_kwargs: Any) -> None:
    leases.start_reaper()
    heartbeat.start(CPU_QUEUE, str(sender.hostname))


@signals.worker_shutdown.connect
def _stop_heartbeat(sender: Any = None, **_kwargs: Any) -> None:
    leases.stop_reaper()
    heartbeat.stop(str(getattr(sender, "hostname", "")))
