"""The GPU worker process: `celery --app gpu_worker.worker worker --queues gpu --pool solo`.

Registers the inference task, loads the model once per process (`worker_process_init`) and
publishes a heartbeat carrying the model's state and runs the lease reaper (`tasks/leases.py`).
Imports no preprocessing code (no dlib, no OpenCV).
"""

from __future__ import annotations

from typing import Any

from celery import signals

from gpu_worker import runtime
from gpu_worker import tasks as _tasks  # noqa: F401  (registers avsr.infer)
from tasks import heartbeat, leases
from tasks.celery_app import GPU_QUEUE, app

__all__ = ["app"]


@signals.worker_process_init.connect  # type: ignore[untyped-decorator]  # celery signals are untyped
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
