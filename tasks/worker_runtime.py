"""Per-worker-process state: the GPU worker's inference engine and every worker's heartbeat.

The GPU worker loads the model once (`load_engine`, from `worker_process_init`), warms it up,
and its heartbeat carries what `/health` reports (device, GPU name, checkpoint, loaded at).
Heartbeats are Redis keys `avsr:worker:<hostname>` that expire after three missed beats.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from typing import Any

import redis

from tasks import jobs
from tasks.errors import JobError
from tasks.settings import get_settings

log = logging.getLogger(__name__)

HEARTBEAT_PREFIX = "avsr:worker:"

_engine = None
_engine_error: str | None = None
_engine_lock = threading.Lock()
_state: dict[str, Any] = {}
_stop = threading.Event()
_thread: threading.Thread | None = None


def load_engine() -> None:
    """Load and warm up the AV-HuBERT engine in this process (GPU worker start-up)."""
    global _engine, _engine_error
    from gpu_worker.engine import Engine

    settings = get_settings()
    with _engine_lock:
        if _engine is not None:
            return
        started = time.time()
        try:
            if not settings.model_path:
                raise FileNotFoundError("AVHUBERT_MODEL_PATH is not set")
            engine = Engine(settings.model_path, spm_path=settings.spm_path or None,
                            dict_path=settings.dict_path or None, device=settings.device,
                            precision=settings.precision, max_batch_frames=settings.max_batch_frames)
            loaded = time.time()
            engine.warm_up()
        except Exception as exc:  # reported by /health and by every inference task
            _engine_error = f"{type(exc).__name__}: {exc}"
            log.exception("model failed to load")
            return
        _engine, _engine_error = engine, None
        _state.update(loaded_at=loaded, load_seconds=round(loaded - started, 3),
                      warmup_seconds=round(time.time() - loaded, 3))
        log.info("model loaded", extra={"checkpoint": settings.model_path, **engine.describe()})


def engine():
    """This process's engine; loads it on first use (e.g. a worker started without the signal)."""
    if _engine is None:
        load_engine()
    if _engine is None:
        raise JobError("model_unavailable", f"the model is not loaded: {_engine_error}", retryable=True,
                       http_status=503)
    return _engine


def heartbeat_payload(role: str, hostname: str) -> dict[str, Any]:
    payload: dict[str, Any] = {"hostname": hostname, "role": role, "pid": os.getpid(),
                               "host": socket.gethostname(), "updated_at": time.time()}
    if role == "gpu":
        payload["model_loaded"] = _engine is not None
        payload["model_error"] = _engine_error
        payload["checkpoint"] = get_settings().model_path
        payload.update(_state)
        if _engine is not None:
            payload.update(_engine.describe())
            payload.update(_engine.memory())
    return payload


def start_heartbeat(role: str, hostname: str) -> None:
    """Publish this worker's heartbeat every `AVSR_HEARTBEAT_INTERVAL_S` from a daemon thread."""
    global _thread
    interval = get_settings().heartbeat_interval_s
    key = HEARTBEAT_PREFIX + hostname

    def beat() -> None:
        while not _stop.is_set():
            try:
                payload = json.dumps(heartbeat_payload(role, hostname))
                jobs.connection().set(key, payload, ex=max(3, int(3 * interval)))
            except Exception as exc:  # the broker may blip; keep beating
                log.warning("heartbeat failed: %s", exc)
            _stop.wait(interval)

    _stop.clear()
    _thread = threading.Thread(target=beat, name="avsr-heartbeat", daemon=True)
    _thread.start()


def stop_heartbeat(hostname: str) -> None:
    _stop.set()
    try:
        jobs.connection().delete(HEARTBEAT_PREFIX + hostname)
    except Exception as exc:
        log.warning("could not clear heartbeat: %s", exc)


def heartbeats(r: redis.Redis | None = None) -> list[dict[str, Any]]:
    """Every live worker heartbeat (read by `/health` and `/metrics`)."""
    r = r or jobs.connection()
    keys = sorted(r.scan_iter(match=HEARTBEAT_PREFIX + "*", count=100))
    values = r.mget(keys) if keys else []
    return [json.loads(v) for v in values if v]
