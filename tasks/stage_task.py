"""`stage_task`: register a pipeline stage as a Celery task with the job's bookkeeping around it.

Used by the workers (`cpu_worker/tasks.py`, `gpu_worker/tasks.py`); every task is safe to run
twice (acks_late re-delivery): outputs go to fixed keys and terminal job states never change.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Callable
from typing import Any

import redis
from celery.exceptions import Ignore, Reject, SoftTimeLimitExceeded
from kombu.exceptions import OperationalError

from tasks import jobs, leases
from tasks.celery_app import app
from tasks.errors import DISK_FULL, JobError, disk_full
from tasks.logs import current_job_id
from tasks.settings import get_settings
from tasks.webhooks import enqueue as enqueue_webhook

log = logging.getLogger(__name__)

MAX_RETRIES = 4
# Redis (job store and broker) not answering: an outage of the service, not an outcome of the job
REDIS_UNREACHABLE = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OperationalError)


def stage_task(name: str, stage: str) -> Callable[[Callable[..., Any]], Any]:
    """Register `fn(job, *args)` as Celery task `name`, called as `task(*args, job_id)`.

    Skips work for a job that is already terminal (cancelled, failed elsewhere), records the
    stage and its duration, retries retryable errors with exponential backoff, and marks the
    job failed with a machine-readable code otherwise.
    """

    short = name.rsplit(".", 1)[-1]  # "avsr.finalize" → "finalize": stage timings and log lines

    def decorate(fn: Callable[..., Any]) -> Any:
        # `throws`: a JobError is an expected outcome (logged without a traceback), not a crash.
        @app.task(name=name, bind=True, max_retries=MAX_RETRIES, throws=(JobError,))
        @functools.wraps(fn)
        def run(self: Any, *args: Any) -> Any:
            job_id = args[-1]
            token = current_job_id.set(job_id)
            lease: leases.Lease | None = None
            done = False
            try:
                job = _await_record(job_id)
                if job is None or jobs.is_terminal(job):
                    log.info("skipping %s: job is %s", short, job and job["status"])
                    raise Ignore()
                lease = leases.acquire(self.request.id, job_id, _signature(self))
                if lease is None:
                    log.info("skipping %s: a duplicate delivery of %s", short, self.request.id)
                    raise Ignore()
                if lease.deliveries > get_settings().max_deliveries:
                    leases.worker_lost(job_id, self.request.id, lease.deliveries - 1)
                    done = True
                    raise Ignore()
                _test_poison(job)
                patch: dict[str, Any] = {"status": jobs.RUNNING, "stage": stage}
                if job["started_at"] is None:
                    patch["started_at"] = time.time()
                jobs.update(job_id, **patch)
                started = time.perf_counter()
                result = fn(job, *args[:-1])
                elapsed = time.perf_counter() - started
                jobs.record_stage_time(short, elapsed)
                jobs.add_timing(job_id, short, elapsed)
                log.info("%s done", short, extra={"stage": stage, "seconds": round(elapsed, 4)})
                done = True
                return result
            except Ignore:
                raise
            except REDIS_UNREACHABLE as exc:
                # Neither a failed job nor a lost stage: with the lease, the reaper runs the stage again once
                # Redis answers (the lease lapses, its registry entry stays); before it, the message goes back
                # to the queue (or, if Redis still does not answer, stays unacknowledged until re-delivered).
                log.warning("%s interrupted: Redis does not answer (%s); the stage runs again", short, exc)
                if lease is None:
                    raise Reject(exc, requeue=True) from exc
                lease.abandon()
                lease = None
                raise Ignore() from exc
            except Exception as exc:
                error = as_job_error(exc)
                if error.retryable and self.request.retries < MAX_RETRIES:
                    log.warning("retrying %s after %s", short, error.message)
                    countdown = min(60, 2 ** (self.request.retries + 1))
                    if lease is not None:  # kept until the retry takes it: a dead worker's retry is re-published
                        lease.await_retry(countdown)
                        lease = None
                    raise self.retry(exc=exc, countdown=countdown) from exc
                fail(job_id, error)
                if error.code == "internal_error":
                    log.exception("%s failed", short)
                else:
                    log.warning("%s failed: %s %s", short, error.code, error.message)
                raise error from exc
            finally:
                if lease is not None:
                    lease.release(done=done)
                current_job_id.reset(token)

        return run

    return decorate


RECORD_WAIT_S = 10.0
TEST_POISON_ENV = "AVSR_TEST_POISON_KEY"  # test only, off by default: see `_test_poison`


def _signature(task: Any) -> dict[str, Any]:
    """This delivery as a signature (name, args, task id, chain, chord, queue): what the reaper re-publishes."""
    queue = (task.request.delivery_info or {}).get("routing_key")
    return dict(task.signature_from_request(queue=queue))


def _test_poison(job: jobs.Job) -> None:
    """TEST ONLY (off unless AVSR_TEST_POISON_KEY is set): the process dies, as an input that drives a
    worker past its memory would kill it, when the job's input key or prefix is the one named."""
    poison = os.environ.get(TEST_POISON_ENV)
    source = job["request"]["input"]
    if poison and poison == (source.get("key") or source.get("prefix")):
        log.error("%s names this job's input: the process exits", TEST_POISON_ENV)
        os._exit(70)


def _await_record(job_id: str) -> jobs.Job | None:
    """The job's record; the API stores it just after publishing the first task, so wait a little.
    None after `RECORD_WAIT_S`: the submission failed (its client got a 503) or the record expired."""
    deadline = time.monotonic() + RECORD_WAIT_S
    while (job := jobs.get(job_id)) is None and time.monotonic() < deadline:
        time.sleep(0.1)
    return job


def as_job_error(exc: Exception) -> JobError:
    if isinstance(exc, JobError):
        return exc
    if isinstance(exc, SoftTimeLimitExceeded):
        return JobError("timeout", "the task ran past its time limit")
    if isinstance(exc, OSError) and exc.errno in DISK_FULL:
        return disk_full()
    return JobError("internal_error", "an unexpected error stopped the job (the service log has it, by job id)")


def fail(job_id: str, error: JobError) -> None:
    """Mark the job failed (no-op if it is already terminal) and start its webhook's delivery."""
    job = jobs.update(job_id, status=jobs.FAILED, error=error.to_dict(), finished_at=time.time())
    if job and job["status"] == jobs.FAILED:
        enqueue_webhook(job)
