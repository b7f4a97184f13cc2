"""The Celery application: Redis broker and backend, JSON only, reliable delivery, queues by name.

Workers:
    celery --app tasks.celery_app worker --queues cpu --pool prefork --concurrency 2 \
        --prefetch-multiplier 1 --hostname cpu@%h
    celery --app tasks.celery_app worker --queues gpu --pool solo --prefetch-multiplier 1 --hostname gpu@%h
    celery --app tasks.celery_app flower --port=5555

A worker consuming the `gpu` queue loads the model once (`worker_process_init`; the solo pool
sends it in the worker process itself, so CUDA never meets a fork), warms it up and publishes
a heartbeat that `/health` reads (see `tasks/worker_runtime.py`). Every worker beats.
"""

from __future__ import annotations

from celery import Celery, signals

from tasks.logs import configure_logging
from tasks.settings import Settings, get_settings, redis_sentinel

CPU_QUEUE, GPU_QUEUE = "cpu", "gpu"


def celery_config(settings: Settings) -> dict:
    """The Celery configuration for `settings` (broker and result backend on AVSR_REDIS_URL).

    A `sentinel://` URL adds `master_name` (AVSR_REDIS_SENTINEL_MASTER) to the broker's and the
    result backend's transport options; kombu and Celery then ask the Sentinels for the master.
    """
    # A task not acked within the visibility timeout is re-delivered: keep it above the hard limit.
    transport_options: dict[str, object] = {"visibility_timeout": settings.task_time_limit_s + 600}
    if redis_sentinel(settings.redis_url, settings.redis_sentinel_master) is not None:
        transport_options["master_name"] = settings.redis_sentinel_master
    return dict(
        broker_url=settings.redis_url,
        result_backend=settings.redis_url,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        result_expires=settings.job_ttl_s,
        task_default_queue=CPU_QUEUE,
        task_routes={"avsr.infer": {"queue": GPU_QUEUE}, "avsr.*": {"queue": CPU_QUEUE}},
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        worker_prefetch_multiplier=1,
        task_soft_time_limit=settings.task_soft_time_limit_s,
        task_time_limit=settings.task_time_limit_s,
        broker_transport_options=dict(transport_options),
        result_backend_transport_options=dict(transport_options),
        broker_connection_retry_on_startup=True,
        task_track_started=True,
        worker_send_task_events=True,
        task_send_sent_event=True,
        worker_hijack_root_logger=False,
        enable_utc=True,
    )


settings = get_settings()
app = Celery("avsr", include=["tasks.pipeline"])
app.conf.update(celery_config(settings))

_worker: dict[str, object] = {"queues": set(), "hostname": None}


def _role() -> str:
    return GPU_QUEUE if GPU_QUEUE in _worker["queues"] else CPU_QUEUE


@signals.setup_logging.connect
def _setup_logging(**_kwargs) -> None:
    configure_logging(settings.log_level, settings.log_json)


@signals.celeryd_init.connect
def _remember_worker(sender=None, instance=None, conf=None, options=None, **_kwargs) -> None:
    queues = (options or {}).get("queues") or []
    if isinstance(queues, str):
        queues = queues.split(",")
    _worker["queues"] = {q.strip() for q in queues}
    _worker["hostname"] = sender


@signals.worker_process_init.connect
def _load_model_on_gpu_worker(**_kwargs) -> None:
    if _role() == GPU_QUEUE:
        from tasks import worker_runtime

        worker_runtime.load_engine()


@signals.worker_ready.connect
def _start_heartbeat(sender=None, **_kwargs) -> None:
    from tasks import worker_runtime

    worker_runtime.start_heartbeat(_role(), str(_worker["hostname"] or sender.hostname))


@signals.worker_shutdown.connect
def _stop_heartbeat(sender=None, **_kwargs) -> None:
    from tasks import worker_runtime

    worker_runtime.stop_heartbeat(str(_worker["hostname"] or getattr(sender, "hostname", "")))
