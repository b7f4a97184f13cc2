"""`stage_task`: register a pipeline stage as a Celery task with the job's bookkeeping around it.

Used by the workers (`cpu_worker/tasks.py`, `gpu_worker/tasks.py`); every task is safe to run
twice (acks_late re-delivery): outputs go to fixed keys and terminal job states never change.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from typing import Any

from celery.exceptions import Ignore, SoftTimeLimitExceeded

from tasks import jobs
from tasks.celery_app import app
from tasks.errors import JobError
from tasks.logs import current_job_id
from tasks.webhooks import enqueue as enqueue_webhook

log = logging.getLogger(__name__)

MAX_RETRIES = 4


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
            try:
                job = jobs.get(job_id)
                if job is None or jobs.is_terminal(job):
                    log.info("skipping %s: job is %s", short, job and job["status"])
                    raise Ignore()
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
                return result
            except Ignore:
                raise
            except Exception as exc:
                error = as_job_error(exc)
                if error.retryable and self.request.retries < MAX_RETRIES:
                    log.warning("retrying %s after %s", short, error.message)
                    raise self.retry(exc=exc, countdown=min(60, 2 ** (self.request.retries + 1))) from exc
                fail(job_id, error)
                if error.code == "internal_error":
                    log.exception("%s failed", short)
                else:
                    log.warning("%s failed: %s %s", short, error.code, error.message)
                raise error from exc
            finally:
                current_job_id.reset(token)

        return run

    return decorate


def as_job_error(exc: Exception) -> JobError:
    if isinstance(exc, JobError):
        return exc
    if isinstance(exc, SoftTimeLimitExceeded):
        return JobError("timeout", "the task ran past its time limit")
    return JobError("internal_error", "an unexpected error stopped the job (the service log has it, by job id)")


def fail(job_id: str, error: JobError) -> None:
    """Mark the job failed (no-op if it is already terminal) and start its webhook's delivery."""
    job = jobs.update(job_id, status=jobs.FAILED, error=error.to_dict(), finished_at=time.time())
    if job and job["status"] == jobs.FAILED:
        enqueue_webhook(job)
