"""Stage leases: a dead worker's task runs again within a minute, not after Redis' visibility timeout.

The process running a stage holds `avsr:lease:<task_id>` (TTL AVSR_LEASE_TTL_S, renewed every third
of it by a thread of that process) and registers the task's signature (name, args, chain, chord,
task id) in the hash `avsr:leases`. A reaper on every worker (one acts at a time, under a Redis
lock, every AVSR_REAPER_INTERVAL_S) re-publishes a registered task whose lease expired while its
job is still running — idempotent, since each stage writes by reference and a finished task id is
marked done. `avsr:deliveries:<task_id>` counts the deliveries that never ended: once AVSR_MAX_DELIVERIES
of them died, the job fails with `worker_lost` instead of running again. A delivery that ends with a
retry leaves a lease marked as waiting for it (`Lease.await_retry`): the retry takes it at once, and if
the worker holding the retry dies it lapses like any other.

Recovery bound after a worker dies: lease TTL + reaper interval + the replacement's start-up.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from tasks import jobs
from tasks.settings import get_settings

log = logging.getLogger(__name__)

REGISTRY = "avsr:leases"  # hash: task id → {"job_id", "signature"}
_LEASE = "avsr:lease:{}"
_DELIVERIES = "avsr:deliveries:{}"
_DONE = "avsr:done:{}"
_REAPER_LOCK = "avsr:reaper"
WORKER_LOST_STAT = "worker_lost_total"  # in jobs.STATS_KEY, exported by /metrics


def _holder() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid()}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class Lease:
    """A running stage's hold on its task id (see `acquire`)."""

    task_id: str
    deliveries: int  # deliveries of this task id that have not ended, this one included
    _stop: threading.Event = field(default_factory=threading.Event)

    def renew_in_background(self) -> None:
        ttl = get_settings().lease_ttl_s
        value = json.dumps(_holder())

        def renew() -> None:
            while not self._stop.wait(ttl / 3):
                try:
                    jobs.connection().set(_LEASE.format(self.task_id), value, ex=ttl)
                except Exception as exc:  # a Redis blip: two more chances before the lease lapses
                    log.warning("lease renewal failed: %s", exc)

        threading.Thread(target=renew, name=f"avsr-lease-{self.task_id}", daemon=True).start()

    def abandon(self) -> None:
        """The delivery cannot end cleanly (Redis, the job store and broker, does not answer): stop
        renewing and write nothing, so the lease lapses and the reaper re-publishes the task from the
        registry once Redis answers, as for a worker that died (this delivery counts as one)."""
        self._stop.set()

    def await_retry(self, countdown: float) -> None:
        """The delivery ends with a retry published `countdown` s ahead: keep the registry entry and leave a
        lease marked as waiting for it, which the retry takes at once and which lapses after `countdown` +
        the lease TTL if no retry came (the worker holding it died): the reaper then re-publishes the task."""
        self._stop.set()
        pipe = jobs.connection().pipeline()
        pipe.set(_LEASE.format(self.task_id), json.dumps({**_holder(), "retry": True}),
                 ex=int(countdown) + get_settings().lease_ttl_s)
        pipe.decr(_DELIVERIES.format(self.task_id))  # this delivery ended; it did not die
        pipe.execute()

    def release(self, *, done: bool) -> None:
        """The delivery ended (succeeded, failed or will be retried): drop the lease; `done` marks the
        task id finished so a stray duplicate delivery is skipped."""
        self._stop.set()
        ttl = get_settings().job_ttl_s
        pipe = jobs.connection().pipeline()
        pipe.delete(_LEASE.format(self.task_id))
        pipe.hdel(REGISTRY, self.task_id)
        pipe.decr(_DELIVERIES.format(self.task_id))
        if done:
            pipe.set(_DONE.format(self.task_id), 1, ex=ttl)
        pipe.execute()


def acquire(task_id: str, job_id: str, signature: dict[str, Any]) -> Lease | None:
    """Take the lease of `task_id` for this delivery; None when it is a duplicate (the task id is
    done, or another live process holds it)."""
    r = jobs.connection()
    settings = get_settings()
    deadline = time.monotonic() + 2 * settings.lease_ttl_s
    while (raw := r.get(_LEASE.format(task_id))) is not None:
        holder = json.loads(raw)
        if holder.get("retry"):
            break  # the lease of a delivery that ended with a retry: this is it (or the reaper's copy)
        if holder["host"] == socket.gethostname() and not _pid_alive(int(holder["pid"])):
            break  # e.g. a killed pool child on this host, its task re-queued at once by Celery
        if time.monotonic() > deadline:
            log.info("task %s is held by live %s: this delivery is a duplicate", task_id, holder)
            return None
        time.sleep(1.0)
    if r.exists(_DONE.format(task_id)):
        return None
    pipe = r.pipeline()
    pipe.incr(_DELIVERIES.format(task_id))
    pipe.expire(_DELIVERIES.format(task_id), settings.job_ttl_s)
    pipe.set(_LEASE.format(task_id), json.dumps(_holder()), ex=settings.lease_ttl_s)
    pipe.hset(REGISTRY, task_id, json.dumps({"job_id": job_id, "signature": signature}, default=str))
    deliveries = int(pipe.execute()[0])
    lease = Lease(task_id, deliveries)
    lease.renew_in_background()
    return lease


def worker_lost(job_id: str, task_id: str, deaths: int) -> None:
    """Fail the job: its task's worker died `deaths` times. Logged and counted for /metrics."""
    from tasks.errors import JobError
    from tasks.stage_task import fail

    log.error("task %s lost its worker %d times: failing the job", task_id, deaths,
              extra={"job_id": job_id, "task_id": task_id, "deaths": deaths})
    jobs.connection().hincrby(jobs.STATS_KEY, WORKER_LOST_STAT, 1)
    fail(job_id, JobError("worker_lost", f"the worker running {task_id.split('.', 1)[-1]} died {deaths} times"))


def reap() -> int:
    """Re-publish (or fail) every registered task whose lease expired while its job still runs.
    Returns how many it handled."""
    from tasks.celery_app import app

    r = jobs.connection()
    handled = 0
    for key, raw in r.hgetall(REGISTRY).items():
        task_id = str(key)
        if r.exists(_LEASE.format(task_id)) or not r.hdel(REGISTRY, task_id):
            continue  # alive, or released (or reaped) meanwhile
        entry = json.loads(raw)
        job = jobs.get(entry["job_id"])
        if jobs.is_terminal(job):
            continue
        handled += 1
        deaths = int(r.get(_DELIVERIES.format(task_id)) or 0)
        if deaths >= get_settings().max_deliveries:
            worker_lost(entry["job_id"], task_id, deaths)
            continue
        log.warning("lease of %s expired: re-publishing it (%d deaths so far)", task_id, deaths,
                    extra={"job_id": entry["job_id"], "task_id": task_id})
        app.signature(entry["signature"]).apply_async()
    return handled


_reaper_stop = threading.Event()


def start_reaper() -> threading.Thread:
    """Run `reap` every AVSR_REAPER_INTERVAL_S from a daemon thread (every worker starts one; a Redis
    lock lets one act per interval)."""
    interval = get_settings().reaper_interval_s

    def loop() -> None:
        while not _reaper_stop.wait(interval):
            try:
                if jobs.connection().set(_REAPER_LOCK, socket.gethostname(), nx=True, ex=max(1, int(interval))):
                    reap()
            except Exception as exc:  # keep reaping after a Redis blip
                log.warning("reaper failed: %s", exc)

    _reaper_stop.clear()
    thread = threading.Thread(target=loop, name="avsr-reaper", daemon=True)
    thread.start()
    return thread


def stop_reaper() -> None:
    _reaper_stop.set()
