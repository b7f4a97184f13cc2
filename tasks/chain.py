"""The job pipeline as Celery task names and signatures, shared by the API and the workers.

    prepare (cpu)      list/validate the input in S3, plan chunks, audio features → S3
      └─ chord( preprocess_chunk × N (cpu)   download + mouth ROIs per chunk → S3 )
      │          └─ infer_early × M (gpu)   the segments the chunks so far settle (`tasks/early.py`)
           └─ assemble (cpu)   stitch chunks, plan segments → S3
                └─ infer (gpu)    AV-HuBERT on every segment, batched
                     └─ finalize (cpu)   result JSON/SRT/VTT → S3, job succeeded, webhook

Tasks are addressed by name only (`app.signature`), so the API and each worker import none of
the code that runs them: `cpu_worker/tasks.py` and `gpu_worker/tasks.py` register the names.
Task ids are derived from the job id (`<job>.<stage>`), so a cancellation can revoke tasks that
are not even queued yet.
"""

from __future__ import annotations

import time

from celery import chord, group
from celery.canvas import Signature

from tasks import jobs
from tasks.celery_app import app
from tasks.records import Chunk, SegmentSpan
from tasks.settings import get_settings

PREPARE, PREPROCESS_CHUNK, ASSEMBLE, INFER, FINALIZE = (
    "avsr.prepare", "avsr.preprocess_chunk", "avsr.assemble", "avsr.infer", "avsr.finalize")
INFER_EARLY = "avsr.infer_early"  # gpu queue: decode settled segments while the rest is preprocessed
DELIVER_WEBHOOK = "avsr.deliver_webhook"  # cpu queue: one attempt of a finished job's webhook
STAGE_TASKS = ("prepare", "assemble", "infer", "finalize")


def task_id(job_id: str, stage: str) -> str:
    return f"{job_id}.{stage}"


def _sig(name: str, *args: object, job_id: str, stage: str) -> Signature:
    return app.signature(name, args=(*args, job_id), task_id=task_id(job_id, stage))


def submit(job_id: str) -> None:
    """Start the pipeline of a freshly created job (publishes `prepare`).

    Nothing reads `prepare`'s Celery result (the job record is the state), so none is kept: with one,
    the publishing process first subscribes to the result's channel on the result backend, whose
    retries (20, seconds each) held a submit for minutes when Redis hung."""
    _sig(PREPARE, job_id=job_id, stage="prepare").apply_async(ignore_result=True)


_LAUNCHED = "avsr:launched:{}"  # the job's chord was published whole
_LAUNCHES = "avsr:launches:{}"  # publications of the job's chord begun


def launch(job_id: str, chunks: list[Chunk]) -> bool:
    """After `prepare`: the chunks as a chord, then assemble → infer → finalize, published once per
    job (False: an earlier delivery of `prepare` did it).

    A delivery that died or lost Redis part-way through publishing leaves a chord that may never
    complete (some chunk messages never sent); the next delivery publishes a whole new one. Its chunk
    task ids carry the attempt (`chunk.<i>.r<k>`), so none of its chunks is skipped as a duplicate of
    the first chord's and it completes; the stages after the chord keep their ids, so if both chords
    complete, the second `assemble` is a duplicate delivery and skipped (`tasks/leases.py`)."""
    r = jobs.connection()
    if r.exists(_LAUNCHED.format(job_id)):
        return False
    ttl = get_settings().job_ttl_s
    pipe = r.pipeline()
    pipe.incr(_LAUNCHES.format(job_id))
    pipe.expire(_LAUNCHES.format(job_id), ttl)
    attempt = int(pipe.execute()[0])
    chunk_tasks = group(_sig(PREPROCESS_CHUNK, chunk["index"], job_id=job_id,
                             stage=_chunk_stage(chunk["index"], attempt)) for chunk in chunks)
    (chord(chunk_tasks, _sig(ASSEMBLE, job_id=job_id, stage="assemble"))
     | _sig(INFER, job_id=job_id, stage="infer")
     | _sig(FINALIZE, job_id=job_id, stage="finalize")).apply_async()
    r.set(_LAUNCHED.format(job_id), 1, ex=ttl)
    return True


def _chunk_stage(index: int, launch: int) -> str:
    """The stage name (task id suffix) of chunk `index` in the job's `launch`-th publication (from 1)."""
    return f"chunk.{index}" if launch == 1 else f"chunk.{index}.r{launch - 1}"


def infer_early(job_id: str, batch: int, spans: list[SegmentSpan], offset: int) -> None:
    """Publish early batch `batch`: `spans` (clip frames) over `early/NNNN.npz`, which starts at `offset`."""
    app.signature(INFER_EARLY, args=(batch, spans, offset, job_id),
                  task_id=task_id(job_id, f"early.{batch}")).apply_async()


def deliver_webhook(job_id: str, attempt: int, countdown: float = 0.0) -> None:
    """Publish attempt `attempt` of the job's webhook delivery (`tasks/webhooks.py`), `countdown` s from now."""
    app.signature(DELIVER_WEBHOOK, args=(job_id, attempt),
                  task_id=task_id(job_id, f"webhook.{attempt}")).apply_async(countdown=countdown)


def cancel(job_id: str) -> jobs.Job | None:
    """Mark the job cancelled, revoke its tasks (queued ones are dropped, running ones stop at their
    next check) and start its webhook's delivery (a cancelled job is finished too)."""
    from tasks.webhooks import enqueue as enqueue_webhook

    job = jobs.update(job_id, status=jobs.CANCELLED, finished_at=time.time(), stage="cancelled")
    if job is None:
        return None
    ids = [task_id(job_id, s) for s in STAGE_TASKS]
    launches = int(jobs.connection().get(_LAUNCHES.format(job_id)) or 1)
    ids += [task_id(job_id, _chunk_stage(i, launch))
            for i in range(job.get("chunks_total") or 0) for launch in range(1, launches + 1)]
    ids += [task_id(job_id, f"early.{i}") for i in range(job.get("early_batches") or 0)]
    app.control.revoke(ids)
    if job["status"] == jobs.CANCELLED:  # not a job that had already finished otherwise
        enqueue_webhook(job)
    return job
