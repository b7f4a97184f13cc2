"""Early inference, the CPU side (`tasks/early.py`): after each chunk, publish the segments that the
chunks preprocessed so far already settle, so the GPU decodes them while the rest is preprocessed.

Only for the default speaker (`largest`, whose ROIs do not depend on the rest of the clip) and clips
of more than one calibration window (56 s; a shorter clip's plan needs all of it). Chunks that finish
out of order wait for their predecessors: the chunks from the first that are all done are stitched
(from the chunk before the planning origin's calibration window on; `stitch_results` gives the same
frames as the whole clip's stitch from that chunk's first kept frame), and
`segmentation.settled_segments` plans what they decide.
"""

from __future__ import annotations

import logging

from cpu_worker import segmentation, speakers
from cpu_worker.mouth_roi import MouthRoiResult, stitch_boundary, stitch_results
from cpu_worker.stages import clip_energy, input_plan
from tasks import chain, early, jobs, storage
from tasks.records import FPS, InputPlan, SegmentSpan
from tasks.settings import get_settings
from tasks.storage import work_bucket, work_key

log = logging.getLogger(__name__)


def wanted(job: jobs.Job) -> bool:
    """Whether the job's inference can start before its preprocessing ends (from what `prepare` recorded)."""
    return (get_settings().early_inference and (job["request"].get("speaker") or speakers.DEFAULT) == speakers.DEFAULT
            and (job.get("chunks_total") or 0) > 1
            and len(segmentation.calibration_windows(job.get("num_frames") or 0, FPS)) > 1)


def chunk_finished(job: jobs.Job, chunk_index: int) -> int:
    """Chunk `chunk_index` is stored: publish what the chunks done so far settle; returns the segments
    published. Never raises: early inference only saves time, `assemble` and `infer` do the work anyway."""
    if not wanted(job):
        return 0
    job_id = job["job_id"]
    published = 0
    try:
        plan = input_plan(job)
        with early.publisher_lock(job_id) as taken:
            # Not taken: the holder re-reads the chunks done before it lets go, so it sees this one.
            prefix = early.chunk_done(job_id, chunk_index)
            while taken:
                state = early.state(job_id)
                if prefix <= state["chunks"] or prefix >= len(plan["chunks"]):
                    break
                published += _publish(job, plan, state, prefix)
                prefix = early.chunk_done(job_id, chunk_index)
    except Exception:  # logged; the job goes on without early decodes
        log.exception("early inference: publishing failed")
    return published


def _split(plan: InputPlan, k: int) -> int:
    """The first frame `stitch_results` keeps of chunk `k` (where chunk k-1's frames stop)."""
    return 0 if k == 0 else stitch_boundary(plan["chunks"][k]["start"])


def _publish(job: jobs.Job, plan: InputPlan, state: early.EarlyState, prefix: int) -> int:
    """Plan the first `prefix` chunks from the state's origin on; publish what they settle as one batch."""
    job_id, bucket, settings = job["job_id"], work_bucket(), get_settings()
    n = plan["num_frames"]
    windows = segmentation.calibration_windows(n, FPS)
    window_start = next(a for a, b in windows if state["origin"] < b or b == n)
    margin = segmentation.settle_margin(FPS)
    first = max(k for k in range(prefix) if k == 0 or _split(plan, k) + margin <= window_start)
    parts = [MouthRoiResult.from_arrays(storage.get_arrays(bucket, work_key(job_id, f"chunks/{k:04d}.npz")))
             for k in range(first, prefix)]
    clip = stitch_results(parts, max_tracks=settings.max_faces)
    offset, known_end = _split(plan, first), _split(plan, prefix)
    lo, hi = offset - clip.start_frame, known_end - clip.start_frame
    sound = storage.get_arrays(bucket, work_key(job_id, "audio.npz")) if plan["has_audio"] else None
    segments, origin = segmentation.settled_segments(
        n, FPS, offset=offset, origin=state["origin"], first_id=state["next_id"],
        face_present=speakers.face_mask(clip)[lo:hi], mouth_motion=segmentation.mouth_motion(clip.rois[lo:hi]),
        audio_energy_db=None if sound is None else clip_energy(sound["energy_db"], n)[offset:known_end],
        max_segment_s=settings.max_segment_s)
    new: early.EarlyState = {"origin": origin, "next_id": state["next_id"] + len(segments), "chunks": prefix,
                             "batches": state["batches"] + bool(segments)}
    spans: list[SegmentSpan] = [{"id": s.id, "start_frame": s.start_frame, "end_frame": s.end_frame}
                                for s in segments]
    if spans:
        a, b = spans[0]["start_frame"], spans[-1]["end_frame"]
        arrays = {"rois": clip.rois[a - clip.start_frame:b - clip.start_frame]}
        if sound is not None:
            arrays["audio"] = sound["features"][a:b]
        batch = state["batches"]
        storage.put_arrays(bucket, work_key(job_id, f"early/{batch:04d}.npz"), **arrays)
        early.record_batch(job_id, new, spans)
        jobs.update(job_id, early_batches=new["batches"])
        chain.infer_early(job_id, batch, spans, a)
        log.info("early inference: batch published", extra={"batch": batch, "segments": len(spans),
                                                             "frames": b - a, "chunks": prefix})
    else:
        early.record_batch(job_id, new, [])
    return len(spans)
