"""The CPU queue's Celery tasks: prepare, preprocess_chunk, assemble, finalize, deliver_webhook (`tasks/chain.py`)."""

from __future__ import annotations

from typing import Any

from cpu_worker import early, stages
from tasks import chain, jobs, webhooks
from tasks.celery_app import app
from tasks.logs import current_job_id
from tasks.records import ChunkSummary, InputPlan, SegmentPlan, Transcript
from tasks.stage_task import stage_task


@stage_task(chain.PREPARE, "downloading")
def prepare(job: jobs.Job) -> dict[str, int]:
    plan: InputPlan = stages.prepare(job)
    chain.launch(job["job_id"], plan["chunks"])
    return {"chunks": len(plan["chunks"])}


@stage_task(chain.PREPROCESS_CHUNK, "preprocessing")
def preprocess_chunk(job: jobs.Job, chunk_index: int) -> ChunkSummary:
    summary = stages.preprocess_chunk(job, chunk_index)
    jobs.update(job["job_id"], progress=stages.chunk_progress(job))
    early.chunk_finished(job, chunk_index)
    return summary


@stage_task(chain.ASSEMBLE, "preprocessing")
def assemble(job: jobs.Job, summaries: list[ChunkSummary]) -> SegmentPlan:
    return stages.assemble(job, summaries)


@stage_task(chain.FINALIZE, "finalizing")
def finalize(job: jobs.Job, transcript: Transcript) -> dict[str, Any]:
    return stages.finalize(job, transcript)


@app.task(name=chain.DELIVER_WEBHOOK)
def deliver_webhook(job_id: str, attempt: int) -> str | None:
    """One attempt of a finished job's webhook; schedules the next one after its back-off."""
    token = current_job_id.set(job_id)
    try:
        delay = webhooks.deliver(job_id, attempt)
        if delay is not None:
            chain.deliver_webhook(job_id, attempt + 1, countdown=delay)
        return (webhooks.state(job_id) or {}).get("status")
    finally:
        current_job_id.reset(token)
