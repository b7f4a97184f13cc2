"""The CPU worker process: `celery --app cpu_worker.worker worker --queues cpu --pool prefork`.

Registers the preprocessing tasks, bounds each pool child's memory, publishes a heartbeat and runs
the lease reaper (`tasks/leases.py`). Imports no model code (no torch).
"""

from __future__ import annotations

from typing import Any

from celery import signals

from cpu_worker import tasks as _tasks  # noqa: F401  (registers the cpu-queue tasks)
from tasks import heartbeat, leases
from tasks.celery_app import CPU_QUEUE, app
from tasks.settings import get_settings

__all__ = ["app"]

# A child whose resident memory grew past the limit (a leak, a huge input) is replaced after its task,
# instead of growing until the kernel's OOM killer takes a neighbour.
app.conf.worker_max_memory_per_child = get_settings().worker_max_memory_mb * 1024  # KiB


@signals.worker_ready.connect
def _start_heartbeat(sender: Any = None, **_kwargs: Any) -> None:
    leases.start_reaper()
    heartbeat.start(CPU_QUEUE, str(sender.hostname))


@signals.worker_shutdown.connect
def _stop_heartbeat(sender: Any = None, **_kwargs: Any) -> None:
    leases.stop_reaper()
    heartbeat.stop(str(getattr(sender, "hostname", "")))
