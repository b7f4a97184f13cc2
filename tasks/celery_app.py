"""The Celery application: Redis broker and backend, JSON only, reliable delivery, queues by name.

Every process uses this one app; the workers add their own tasks to it:
    celery --app cpu_worker.worker worker --queues cpu --pool prefork --concurrency 2 \
        --prefetch-multiplier 1 --hostname cpu@%h
    celery --app gpu_worker.worker worker --queues gpu --pool threads --prefetch-multiplier 1 --hostname gpu@%h
    celery --app tasks.celery_app flower --port=5555
The API only publishes by task name (`tasks/chain.py`).
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
    # It is a last resort: stage leases (tasks/leases.py) re-publish a dead worker's task much sooner.
    # A Redis that stops answering without closing its connections (a hung process, a partition) must
    # not hold a publish or a worker's broker call: each socket read gives up after 3 s (kombu's BRPOP
    # polls for 1 s at a time, well inside it).
    transport_options: dict[str, object] = {"visibility_timeout": settings.task_time_limit_s + 600,
                                            "socket_connect_timeout": 3, "socket_timeout": 3}
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
        task_routes={"avsr.infer": {"queue": GPU_QUEUE}, "avsr.infer_early": {"queue": GPU_QUEUE},
                     "avsr.*": {"queue": CPU_QUEUE}},
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        worker_prefetch_multiplier=1,
        task_soft_time_limit=settings.task_soft_time_limit_s,
        task_time_limit=settings.task_time_limit_s,
        broker_transport_options=dict(transport_options),
        result_backend_transport_options=dict(transport_options),
        broker_connection_retry_on_startup=True,
        # A publish (the API's submit) gives up within about 10 s when Redis is gone or hung: 503, not a hang.
        broker_connection_timeout=3,
        task_publish_retry_policy={"max_retries": 2, "interval_start": 0, "interval_step": 0.5,
                                   "interval_max": 1},
        task_track_started=True,
        worker_send_task_events=True,
        task_send_sent_event=True,
        worker_hijack_root_logger=False,
        enable_utc=True,
    )


settings = get_settings()
app = Celery("avsr")
app.conf.update(celery_config(settings))


@signals.setup_logging.connect
def _setup_logging(**_kwargs: object) -> None:
    configure_logging(settings.log_level, settings.log_json)
