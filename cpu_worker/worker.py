"""The CPU worker process: `celery --app cpu_worker.worker worker --queues cpu --pool prefork`.

Registers the preprocessing tasks, loads the dlib models before the pool forks, bounds each pool child's
memory, publishes a heartbeat and runs the lease reaper (`tasks/leases.py`). Imports no torch.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from celery import signals

from cpu_worker import tasks as _tasks  # noqa: F401  (registers the cpu-queue tasks)
from cpu_worker.landmarks import preload_models
from cpu_worker.mouth_roi import tracking_threads
from tasks import heartbeat, leases
from tasks.celery_app import CPU_QUEUE, app
from tasks.settings import get_settings

__all__ = ["app"]

log = logging.getLogger(__name__)

# A child whose resident memory grew past the limit (a leak, a huge input) is replaced after its task,
# instead of growing until the kernel's OOM killer takes a neighbour.
app.conf.worker_max_memory_per_child = get_settings().worker_max_memory_mb * 1024  # KiB


_models_loaded: dict[str, float] = {}


@signals.worker_init.connect
def _load_models(**_kwargs: Any) -> None:
    """The dlib detector and predictor sets, loaded once in the main process before the pool forks:
    every pool child (a replaced one too) inherits them in shared pages, so no task waits ~1.5 s a set.
    (Logged at `worker_ready`: the worker's logging is set up after this signal.)"""
    started, sets = time.perf_counter(), tracking_threads(get_settings().cpu_threads or None)
    preload_models(sets)
    _models_loaded.update(sets=sets, seconds=round(time.perf_counter() - started, 2))


@signals.worker_ready.connect
def _start_heartbeat(sender: Any = None, **_kwargs: Any) -> None:
    log.info("dlib models loaded", extra=_models_loaded)
    leases.start_reaper()
    heartbeat.start(CPU_QUEUE, str(sender.hostname))


@signals.worker_shutdown.connect
def _stop_heartbeat(sender: Any = None, **_kwargs: Any) -> None:
    leases.stop_reaper()
    heartbeat.stop(str(getattr(sender, "hostname", "")))
