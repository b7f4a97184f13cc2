"""The GPU queue's Celery task: AV-HuBERT over every segment of a job, batched with the other jobs
in inference on this worker (`gpu_worker/batcher.py`)."""

from __future__ import annotations

from gpu_worker import runtime
from tasks import chain, jobs, storage
from tasks.records import DecodedSegment, PartialSegment, SegmentPlan, SegmentSpan, Transcript, seconds
from tasks.stage_task import stage_task
from tasks.storage import work_key


class JobCancelled(Exception):
    """Raised inside inference when the job was cancelled meanwhile."""


@stage_task(chain.INFER, "inference")
def infer(job: jobs.Job, segment_plan: SegmentPlan) -> Transcript:
    """Decode every segment of `features.npz`; the job record shows the segments done so far."""
    job_id = job["job_id"]
    arrays = storage.get_arrays(storage.work_bucket(), work_key(job_id, "features.npz"))
    engine = runtime.engine()
    spans = segment_plan["segments"]
    jobs.update(job_id, partial_segments=[])  # a re-delivery starts again

    def progress(results: list[DecodedSegment | None]) -> None:
        done = sum(r is not None for r in results)
        # `update` leaves a terminal job as it is and returns it: a cancelled job stops here
        updated = jobs.update(job_id, segments_done=done, progress=round(0.6 + 0.35 * done / max(1, len(spans)), 3),
                              partial_segments=partial_segments(spans, results))
        if jobs.is_terminal(updated):
            raise JobCancelled()

    try:
        decoded = runtime.batcher().transcribe(
            rois=arrays["rois"], audio=arrays.get("audio"), segments=spans,
            modality=segment_plan["modality"], beam_size=job["request"]["beam_size"], on_progress=progress)
    except JobCancelled:
        return {"plan": segment_plan, "decoded": [], "model": engine.describe(), "cancelled": True}
    return {"plan": segment_plan, "decoded": decoded, "model": engine.describe()}


def partial_segments(spans: list[SegmentSpan], results: list[DecodedSegment | None]) -> list[PartialSegment]:
    """The job's first segments that are decoded, up to the first one that is not (`partial_segments`)."""
    partial: list[PartialSegment] = []
    for span, result in zip(spans, results, strict=True):
        if result is None:
            break
        segment: PartialSegment = {"id": span["id"], "start": seconds(span["start_frame"]),
                                   "end": seconds(span["end_frame"]), "text": result["text"],
                                   "confidence": round(result["confidence"], 4)}
        if "track" in span:
            segment["track"] = span["track"]
        partial.append(segment)
    return partial
