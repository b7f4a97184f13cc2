"""The job pipeline as Celery tasks.

    prepare (cpu)      list/validate the input in S3, plan chunks, audio features → S3
      └─ chord( preprocess_chunk × N (cpu)   download + mouth ROIs per chunk → S3 )
           └─ assemble (cpu)   stitch chunks, plan segments → S3
                └─ infer (gpu)    AV-HuBERT on every segment, batched
                     └─ finalize (cpu)   result JSON/SRT/VTT → S3, job succeeded, webhook

Only keys and small JSON travel through Redis; arrays go to the work prefix in S3.
Every task is safe to run twice (acks_late re-delivery): outputs are written to fixed keys
and terminal job states never change. Task ids are derived from the job id
(`<job>.<stage>`), so a cancellation can revoke tasks that are not even queued yet.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from typing import Any

from celery import chord, group
from celery.exceptions import Ignore, SoftTimeLimitExceeded

from tasks import jobs, stages
from tasks.celery_app import app
from tasks.errors import JobError
from tasks.logs import current_job_id
from tasks.webhooks import notify

log = logging.getLogger(__name__)

MAX_RETRIES = 4


def task_id(job_id: str, stage: str) -> str:
    return f"{job_id}.{stage}"


def job_task(name: str, stage: str) -> Callable:
    """Register `fn(job, *args)` as Celery task `avsr.<name>` with the job's bookkeeping around it.

    Skips work for a job that is already terminal (cancelled, failed elsewhere), records the
    stage and its duration, retries retryable errors with exponential backoff, and marks the
    job failed with a machine-readable code otherwise.
    """

    def decorate(fn: Callable) -> Callable:
        # `throws`: a JobError is an expected outcome (logged without a traceback), not a crash.
        @app.task(name=f"avsr.{name}", bind=True, max_retries=MAX_RETRIES, throws=(JobError,))
        @functools.wraps(fn)
        def run(self, *args: Any) -> Any:
            job_id = args[-1]
            token = current_job_id.set(job_id)
            try:
                job = jobs.get(job_id)
                if jobs.is_terminal(job):
                    log.info("skipping %s: job is %s", name, job and job["status"])
                    raise Ignore()
                patch: dict[str, Any] = {"status": jobs.RUNNING, "stage": stage}
                if job["started_at"] is None:
                    patch["started_at"] = time.time()
                jobs.update(job_id, **patch)
                started = time.perf_counter()
                result = fn(job, *args[:-1])
                elapsed = time.perf_counter() - started
                jobs.record_stage_time(name, elapsed)
                jobs.add_timing(job_id, name, elapsed)
                log.info("%s done", name, extra={"stage": stage, "seconds": round(elapsed, 4)})
                return result
            except Ignore:
                raise
            except Exception as exc:
                error = _as_job_error(exc)
                if error.retryable and self.request.retries < MAX_RETRIES:
                    log.warning("retrying %s after %s", name, error.message)
                    raise self.retry(exc=exc, countdown=min(60, 2 ** (self.request.retries + 1))) from exc
                fail(job_id, error)
                if error.code == "internal_error":
                    log.exception("%s failed", name)
                else:
                    log.warning("%s failed: %s %s", name, error.code, error.message)
                raise error from exc
            finally:
                current_job_id.reset(token)

        return run

    return decorate


def _as_job_error(exc: Exception) -> JobError:
    if isinstance(exc, JobError):
        return exc
    if isinstance(exc, SoftTimeLimitExceeded):
        return JobError("timeout", "the task ran past its time limit")
    code = getattr(exc, "code", None)
    if isinstance(code, str):  # cpu_worker / gpu_worker errors carry a machine-readable code
        return JobError(code, str(exc))
    return JobError("internal_error", f"{type(exc).__name__}: {exc}", http_status=500)


def fail(job_id: str, error: JobError) -> None:
    """Mark the job failed (no-op if it is already terminal) and notify its webhook."""
    job = jobs.update(job_id, status=jobs.FAILED, error=error.to_dict(), finished_at=time.time())
    if job and job["status"] == jobs.FAILED:
        notify(job)


@job_task("prepare", "downloading")
def prepare(job: dict) -> dict:
    plan = stages.prepare(job)
    job_id = job["job_id"]
    if jobs.once(job_id, "launch"):
        chunk_tasks = group(
            preprocess_chunk.s(chunk, job_id).set(task_id=task_id(job_id, f"chunk.{chunk['index']}"))
            for chunk in plan["chunks"]
        )
        pipeline = chord(chunk_tasks, assemble.s(job_id).set(task_id=task_id(job_id, "assemble")))
        (pipeline
         | infer.s(job_id).set(task_id=task_id(job_id, "infer"))
         | finalize.s(job_id).set(task_id=task_id(job_id, "finalize"))).apply_async()
    return {"chunks": len(plan["chunks"])}


@job_task("preprocess_chunk", "preprocessing")
def preprocess_chunk(job: dict, chunk: dict) -> dict:
    summary = stages.preprocess_chunk(job, chunk)
    jobs.update(job["job_id"], progress=stages.chunk_progress(job))
    return summary


@job_task("assemble", "preprocessing")
def assemble(job: dict, chunk_summaries: list[dict]) -> dict:
    return stages.assemble(job, chunk_summaries)


@job_task("infer", "inference")
def infer(job: dict, plan: dict) -> dict:
    return stages.infer(job, plan)


@job_task("finalize", "finalizing")
def finalize(job: dict, decoded: dict) -> dict:
    return stages.finalize(job, decoded)


STAGE_TASKS = ("prepare", "assemble", "infer", "finalize")


def submit(job: dict) -> None:
    """Start the pipeline for a freshly created job."""
    prepare.apply_async((job["job_id"],), task_id=task_id(job["job_id"], "prepare"))


def cancel(job_id: str) -> dict | None:
    """Mark the job cancelled and revoke its tasks (queued ones are dropped, running ones stop
    at their next check)."""
    job = jobs.update(job_id, status=jobs.CANCELLED, finished_at=time.time(), stage="cancelled")
    if job is None:
        return None
    ids = [task_id(job_id, s) for s in STAGE_TASKS]
    ids += [task_id(job_id, f"chunk.{i}") for i in range(job.get("chunks_total") or 0)]
    app.control.revoke(ids)
    return job
