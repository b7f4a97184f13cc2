"""The GPU queue's Celery tasks: AV-HuBERT over every segment of a job (`infer`) and over the segments
settled while the job is still preprocessed (`infer_early`, `tasks/early.py`), batched with the other
jobs in inference on this worker (`gpu_worker/batcher.py`)."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from gpu_worker import runtime
from gpu_worker.batcher import Progress
from gpu_worker.engine import SegmentInput, segment_inputs
from tasks import chain, early, jobs, storage
from tasks.celery_app import app
from tasks.logs import current_job_id
from tasks.records import DecodedSegment, PartialSegment, SegmentPlan, SegmentSpan, Transcript, seconds
from tasks.settings import get_settings
from tasks.stage_task import stage_task
from tasks.storage import work_key

log = logging.getLogger(__name__)
_POLL_S = 0.5  # how often `infer` looks for the results of early decodes still running

Results = list[DecodedSegment | None]


class JobCancelled(Exception):
    """Raised inside inference when the job was cancelled meanwhile."""


@stage_task(chain.INFER, "inference")
def infer(job: jobs.Job, segment_plan: SegmentPlan) -> Transcript:
    """Decode every segment of `features.npz` (reusing the early decodes of identical inputs); the job
    record shows the segments done so far."""
    job_id = job["job_id"]
    arrays = storage.get_arrays(storage.work_bucket(), work_key(job_id, "features.npz"))
    engine = runtime.engine()
    spans = segment_plan["segments"]
    modality, beam_size = segment_plan["modality"], job["request"]["beam_size"]
    items = segment_inputs(arrays["rois"], arrays.get("audio"), spans, modality)
    digests = [early.input_digest(i.video, i.audio, modality=modality, beam_size=beam_size, model=engine.identity)
               for i in items]
    results = _stored(job_id, spans, digests)
    reused = sum(r is not None for r in results)

    def progress(results: Results) -> None:
        done = sum(r is not None for r in results)
        # `update` leaves a terminal job as it is and returns it: a cancelled job stops here
        updated = jobs.update(job_id, segments_done=done,
                              progress=round(0.6 + 0.35 * done / max(1, len(spans)), 3),
                              partial_segments=partial_segments(spans, results))
        if jobs.is_terminal(updated):
            raise JobCancelled()

    try:
        progress(results)
        reused += _decode_missing(job_id, items, spans, digests, results, modality, beam_size, progress)
    except JobCancelled:
        return {"plan": segment_plan, "decoded": [], "model": engine.describe(), "cancelled": True}
    decoded = [r for r in results if r is not None]
    jobs.update(job_id, segments_reused=reused)
    log.info("inference done", extra={"segments": len(spans), "reused": reused})
    return {"plan": segment_plan, "decoded": decoded, "model": engine.describe()}


def _stored(job_id: str, spans: Sequence[SegmentSpan], digests: Sequence[str]) -> Results:
    """The stored result of each segment's inputs (None when there is none), with the segment's id."""
    return [None if r is None else {**r, "id": span["id"]}
            for span, r in zip(spans, early.stored_decodes(job_id, digests), strict=True)]


def _decode_missing(job_id: str, items: list[SegmentInput], spans: Sequence[SegmentSpan], digests: Sequence[str],
                    results: Results, modality: str, beam_size: int, progress: Progress) -> int:
    """Fill `results`: decode the segments with no stored result, except those an early batch is still
    decoding, whose results are awaited while they keep coming or this worker's batcher is decoding some
    of the job's segments (`AVSR_EARLY_WAIT_S` without either: an early batch on a worker that died).
    Returns how many came from the store meanwhile.

    Each look reads the early batches' states first and the store second: a batch stores its results
    before it leaves `queued`, so a segment not in flight at the first read has its result in the store
    at the second (or its batch failed). Read the other way round, a batch finishing between the two
    reads had its segments decoded twice."""
    wait_s = get_settings().early_wait_s
    taken = 0
    last_news = time.monotonic()
    while True:
        if runtime.batcher().working_for(job_id):  # an early batch of the job is decoding here: news to come
            last_news = time.monotonic()
        in_flight = early.in_flight(job_id) if time.monotonic() - last_news < wait_s else set()
        missing = [k for k, r in enumerate(results) if r is None]
        fresh = _stored(job_id, [spans[k] for k in missing], [digests[k] for k in missing])
        news = [(k, r) for k, r in zip(missing, fresh, strict=True) if r is not None]
        for k, r in news:
            results[k] = r
        taken += len(news)
        if news:
            last_news = time.monotonic()
            progress(results)
        missing = [k for k in missing if results[k] is None]
        if not missing:
            return taken
        todo = [k for k in missing if (spans[k]["start_frame"], spans[k]["end_frame"]) not in in_flight]
        if not todo:
            time.sleep(_POLL_S)
            continue

        def merged(sub: Results, todo: list[int] = todo) -> None:
            now = list(results)
            for k, r in zip(todo, sub, strict=True):
                now[k] = r
            progress(now)

        decoded = runtime.batcher().decode_items([items[k] for k in todo], modality=modality,
                                                 beam_size=beam_size, on_progress=merged)
        for k, result in zip(todo, decoded, strict=True):
            results[k] = result
        last_news = time.monotonic()


@app.task(name=chain.INFER_EARLY)  # type: ignore[untyped-decorator]  # celery is untyped
def infer_early(batch: int, spans: list[SegmentSpan], offset: int, job_id: str) -> int:
    """Decode early batch `batch` of a job still preprocessed and store each result under its inputs'
    digest. Never fails the job: after an error `infer` decodes these segments itself."""
    token = current_job_id.set(job_id)
    status = early.FAILED
    try:
        job = jobs.get(job_id)
        if jobs.is_terminal(job) or job is None:
            return 0
        engine = runtime.engine()
        modality, beam_size = job["modality"], job["request"]["beam_size"]
        arrays = storage.get_arrays(storage.work_bucket(), work_key(job_id, f"early/{batch:04d}.npz"))
        local: list[SegmentSpan] = [{**s, "start_frame": s["start_frame"] - offset,
                                     "end_frame": s["end_frame"] - offset} for s in spans]
        items = segment_inputs(arrays.get("rois"), arrays.get("audio"), local, modality)
        digests = [early.input_digest(i.video, i.audio, modality=modality, beam_size=beam_size,
                                      model=engine.identity) for i in items]

        for group in decode_groups(batch, len(items)):

            def store(results: Results, group: range = group) -> None:
                done = {k: r for k, r in zip(group, results, strict=True) if r is not None}
                early.store_decoded(job_id, {digests[k]: r for k, r in done.items()},
                                    {spans[k]["id"]: digests[k] for k in done})
                _show_early(job_id)
                if jobs.is_terminal(jobs.get(job_id)):
                    raise JobCancelled()

            runtime.batcher().decode_items([items[k] for k in group], modality=modality, beam_size=beam_size,
                                           on_progress=store)
        status = early.DONE
        return len(items)
    except JobCancelled:
        return 0
    except Exception:  # logged: `infer` decodes what this batch did not
        log.exception("early inference: batch %d failed", batch)
        return 0
    finally:
        early.set_batch(job_id, batch, status)
        current_job_id.reset(token)


def decode_groups(batch: int, count: int) -> list[range]:
    """How early batch `batch` hands its `count` segments to the batcher: the job's first batch in groups of
    1, 2, 4, ... segments, so that its first text shows soon; a later batch in one group, which batches best
    (its text shows after the earlier batches' anyway: the status shows the decoded prefix of the clip)."""
    if batch > 0:
        return [range(count)] if count else []
    groups, start = [], 0
    while start < count:
        groups.append(range(start, min(count, 2 * start + 1)))
        start = groups[-1].stop
    return groups


def _show_early(job_id: str) -> None:
    """`partial_segments` from the early decodes, unless the job already shows more."""
    decoded = early.decoded_prefix(job_id)
    shown = partial_segments([span for span, _ in decoded], [result for _, result in decoded])

    def merge(job: jobs.Job) -> dict[str, object]:
        return {} if len(job.get("partial_segments") or []) >= len(shown) else {"partial_segments": shown}

    jobs.update(job_id, merge=merge)


def partial_segments(spans: Sequence[SegmentSpan], results: Sequence[DecodedSegment | None]) -> list[PartialSegment]:
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
