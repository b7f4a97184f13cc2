"""Worker heartbeats: Redis keys `avsr:worker:<hostname>` that expire after three missed beats.

Every worker beats (its role, pid, host); the GPU worker adds its model state. `/health` and
`/metrics` read them (`heartbeats`).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import redis

from tasks import jobs
from tasks.settings import get_settings

log = logging.getLogger(__name__)

HEARTBEAT_PREFIX = "avsr:worker:"

_stop = threading.Event()


def payload(role: str, hostname: str, extra: Callable[[], dict[str, Any]] | None = None) -> dict[str, Any]:
    beat: dict[str, Any] = {"hostname": hostname, "role": role, "pid": os.getpid(),
                            "host": socket.gethostname(), "updated_at": time.time()}
    if extra is not None:
        beat.update(extra())
    return beat


def start(role: str, hostname: str, extra: Callable[[], dict[str, Any]] | None = None) -> threading.Thread:
    """Publish this worker's heartbeat every `AVSR_HEARTBEAT_INTERVAL_S` from a daemon thread."""
    interval = get_settings().heartbeat_interval_s
    key = HEARTBEAT_PREFIX + hostname

    def beat() -> None:
        while not _stop.is_set():
            try:
                jobs.connection().set(key, json.dumps(payload(role, hostname, extra)), ex=max(3, int(3 * interval)))
            except Exception as exc:  # the broker may blip; keep beating
                log.warning("heartbeat failed: %s", exc)
            _stop.wait(interval)

    _stop.clear()
    thread = threading.Thread(target=beat, name="avsr-heartbeat", daemon=True)
    thread.start()
    return thread


def stop(hostname: str) -> None:
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
