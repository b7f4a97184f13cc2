"""The GPU worker process: `celery --app gpu_worker.worker worker --queues gpu --pool threads`.

Registers the inference task, runs AVSR_GPU_CONCURRENT_JOBS of them at once (threads of this one
process, whose segments one batcher thread decodes together: `gpu_worker/batcher.py`), loads the
model once, before any task (`worker_init`), publishes a heartbeat carrying the model's state and
runs the lease reaper (`tasks/leases.py`). Imports no preprocessing code (no dlib, no OpenCV).
"""

from __future__ import annotations

from typing import Any

from celery import signals

from gpu_worker import runtime
from gpu_worker import tasks as _tasks  # noqa: F401  (registers avsr.infer)
from tasks import heartbeat, leases
from tasks.celery_app import GPU_QUEUE, app
from tasks.settings import get_settings

__all__ = ["app"]

# `--pool threads` without `--concurrency`: the setting says how many jobs are in inference at once.
app.conf.worker_concurrency = get_settings().gpu_concurrent_jobs


@signals.worker_init.connect  # type: ignore[untyped-decorator]  # celery signals are untyped
def _load_model(**_kwargs: Any) -> None:
    runtime.load_engine()


@signals.worker_ready.connect  # type: ignore[untyped-decorator]  # celery signals are untyped
def _start_heartbeat(sender: Any = None, **_kwargs: Any) -> None:
    leases.start_reaper()
    heartbeat.start(GPU_QUEUE, str(sender.hostname), runtime.model_state)


@signals.worker_shutdown.connect  # type: ignore[untyped-decorator]  # celery signals are untyped
def _stop_heartbeat(sender: Any = None, **_kwargs: Any) -> None:
    leases.stop_reaper()
    heartbeat.stop(str(getattr(sender, "hostname", "")))
