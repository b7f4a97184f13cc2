"""The GPU queue's Celery task: AV-HuBERT over every segment of a job, batched."""

from __future__ import annotations

from gpu_worker import runtime
from tasks import chain, jobs, storage
from tasks.records import SegmentPlan, Transcript
from tasks.stage_task import stage_task
from tasks.storage import work_key


class JobCancelled(Exception):
    """Raised inside inference when the job was cancelled meanwhile."""


@stage_task(chain.INFER, "inference")
def infer(job: jobs.Job, segment_plan: SegmentPlan) -> Transcript:
    """Decode every segment of `features.npz` with the process's engine."""
    job_id = job["job_id"]
    arrays = storage.get_arrays(storage.work_bucket(), work_key(job_id, "features.npz"))
    engine = runtime.engine()
    total = len(segment_plan["segments"])

    def progress(done: int) -> None:
        # `update` leaves a terminal job as it is and returns it: a cancelled job stops here
        updated = jobs.update(job_id, segments_done=done, progress=round(0.6 + 0.35 * done / max(1, total), 3))
        if jobs.is_terminal(updated):
            raise JobCancelled()

    try:
        decoded = engine.transcribe(
            rois=arrays["rois"], audio=arrays.get("audio"), segments=segment_plan["segments"],
            modality=segment_plan["modality"], beam_size=job["request"]["beam_size"], on_progress=progress)
    except JobCancelled:
        return {"plan": segment_plan, "decoded": [], "model": engine.describe(), "cancelled": True}
    return {"plan": segment_plan, "decoded": decoded, "model": engine.describe()}
