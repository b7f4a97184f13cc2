"""The work of each pipeline stage, as plain functions of the job record (Celery-free).

Keys under the job's work prefix (`s3://<work bucket>/<work prefix><job id>/`):
    plan.json            what `prepare` found (input, chunks)
    audio.npz            `features` float32[T_audio, 104] stacked log filterbanks, `energy_db` float32[T_audio]
                         (video inputs with sound)
    chunks/NNNN.npz      `rois` uint8[n, 96, 96], `landmarks` float32[n, 68, 2], `detected` bool[n]
    features.npz         the stitched clip: `rois` uint8[T, 96, 96] (+ `audio` float32[T, 104])
    result.json/.srt/.vtt   unless the request named its own output location
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import numpy as np

from cpu_worker import audio as audio_lib
from cpu_worker import frames as frames_lib
from cpu_worker import segmentation
from cpu_worker.errors import PreprocessingError
from cpu_worker.mouth_roi import MouthRoiResult, extract_mouth_rois, stitch_results
from tasks import jobs, storage
from tasks.errors import JobError, input_not_found, input_too_large
from tasks.settings import get_settings
from tasks.subtitles import segments_to_srt, segments_to_vtt
from tasks.webhooks import notify

log = logging.getLogger(__name__)

FPS = 25.0  # AV-HuBERT's frame rate: everything downstream of `prepare` is at 25 fps
CHUNK_OVERLAP = 25  # frames each side, so chunks share 50 (stitch_results needs >= 38)


def work_key(job_id: str, name: str) -> str:
    return f"{get_settings().work_prefix}{job_id}/{name}"


def _work_bucket() -> str:
    return get_settings().work_bucket


# --- prepare -------------------------------------------------------------------------------

def prepare(job: dict) -> dict:
    """Validate the input in S3, plan the preprocessing chunks, extract audio features."""
    request = job["request"]
    frames = request["input"]["type"] == "frames"
    plan = _prepare_frames(request) if frames else _prepare_video(job["job_id"], request)
    plan["chunks"] = [c.to_dict() for c in segmentation.plan_chunks(
        plan["num_frames"], chunk_frames=get_settings().chunk_frames, overlap=CHUNK_OVERLAP)]
    storage.put_json(_work_bucket(), work_key(job["job_id"], "plan.json"), plan)
    jobs.update(job["job_id"], chunks_total=len(plan["chunks"]), num_frames=plan["num_frames"],
                modality=plan["modality"], progress=0.05)
    return plan


def _prepare_frames(request: dict) -> dict:
    source = request["input"]
    settings = get_settings()
    objects = storage.list_frames(source["bucket"], source["prefix"])
    if not objects:
        raise input_not_found(f"s3://{source['bucket']}/{source['prefix']} (no .jpg/.png frames)")
    total = sum(o.size for o in objects)
    if total > settings.max_input_bytes:
        raise input_too_large(f"frames add up to {total} bytes, limit {settings.max_input_bytes}")
    # Frames shot at `fps` mapped onto the 25 fps grid exactly as `ImageSequence` resamples them.
    fps = float(source.get("fps") or FPS)
    keys = [o.key for o in frames_lib.resample_timed(((i / fps, o) for i, o in enumerate(objects)), FPS)]
    if len(keys) > settings.max_frames:
        raise input_too_large(f"{len(keys)} frames at 25 fps, limit {settings.max_frames}")
    modality = request["modality"]
    if modality == "audio":
        raise JobError("no_audio", "an image sequence has no audio; use modality video", http_status=400)
    return {"type": "frames", "bucket": source["bucket"], "keys": keys, "num_frames": len(keys),
            "source_frames": len(objects), "modality": "video", "has_audio": False}


def _prepare_video(job_id: str, request: dict) -> dict:
    source = request["input"]
    settings = get_settings()
    obj = storage.head(source["bucket"], source["key"])
    if obj.size > settings.max_input_bytes:
        raise input_too_large(f"video is {obj.size} bytes, limit {settings.max_input_bytes}")
    video = frames_lib.VideoFile(storage.cached_download(obj, source["bucket"]))
    num_frames = video.num_frames()
    if num_frames <= 0:
        raise PreprocessingError("no_frames", "the video has no decodable frames")
    if num_frames > settings.max_frames:
        raise input_too_large(f"{num_frames} frames at 25 fps, limit {settings.max_frames}")
    has_audio = video.has_audio
    if has_audio:
        wave = video.audio()
        storage.put_arrays(_work_bucket(), work_key(job_id, "audio.npz"),
                           features=audio_lib.audio_features(wave, frames_lib.AUDIO_RATE),
                           energy_db=audio_lib.frame_energy_db(wave, frames_lib.AUDIO_RATE, fps=FPS))
    modality = request["modality"]
    if modality == "auto":
        modality = "audiovisual" if has_audio else "video"
    if modality in ("audio", "audiovisual") and not has_audio:
        raise JobError("no_audio", f"modality {modality} needs sound and the video has none", http_status=400)
    return {"type": "video", "bucket": source["bucket"], "key": source["key"], "etag": obj.etag,
            "size": obj.size, "num_frames": num_frames, "modality": modality, "has_audio": has_audio}


# --- preprocess ----------------------------------------------------------------------------

def _chunk_source(plan: dict, chunk: dict):
    """The chunk's frames at 25 fps, streamed (frames: concurrent GETs; video: the host's copy of
    the version `prepare` saw, fetched once per host)."""
    if plan["type"] == "frames":
        keys = plan["keys"][chunk["start"]:chunk["end"]]
        return frames_lib.ImageSequence(storage.get_many(plan["bucket"], keys), fps=FPS)
    obj = storage.S3Object(plan["key"], plan.get("size", 0), plan.get("etag", ""))
    return frames_lib.VideoFile(storage.cached_download(obj, plan["bucket"])).window(chunk["start"], chunk["end"])


def preprocess_chunk(job: dict, chunk: dict) -> dict:
    """Download one chunk's frames and extract its mouth ROIs → `chunks/NNNN.npz`."""
    job_id = job["job_id"]
    plan = storage.get_json(_work_bucket(), work_key(job_id, "plan.json"))
    # A chunk without any face is fine (the clip may have one elsewhere): `assemble` decides.
    roi = extract_mouth_rois(_chunk_source(plan, chunk), fps=FPS, start_frame=chunk["start"], require_face=False,
                             workers=get_settings().cpu_threads or None)
    storage.put_arrays(_work_bucket(), work_key(job_id, f"chunks/{chunk['index']:04d}.npz"), **roi.to_arrays())
    return {"index": chunk["index"], "frames": len(roi), "stats": _jsonable(roi.stats)}


def chunk_progress(job: dict) -> float:
    """Progress after one more chunk of `job` is done: preprocessing spans 0.05 → 0.6."""
    done = jobs.increment(job["job_id"], "chunks_done")
    total = max(1, job.get("chunks_total") or 1)  # set by `prepare` before the chunks were queued
    return round(0.05 + 0.55 * min(1.0, done / total), 3)


# --- assemble ------------------------------------------------------------------------------

def assemble(job: dict, summaries: list[dict]) -> dict:
    """Stitch the chunks into one clip, align the audio, plan the segments → `features.npz`."""
    job_id = job["job_id"]
    plan = storage.get_json(_work_bucket(), work_key(job_id, "plan.json"))
    parts = [MouthRoiResult.from_arrays(storage.get_arrays(_work_bucket(), work_key(job_id, f"chunks/{i:04d}.npz")))
             for i in range(len(plan["chunks"]))]
    clip = stitch_results(parts)
    if len(clip) == 0:
        raise PreprocessingError("no_frames", "no decodable frames in the input")
    if not clip.detected.any():
        raise PreprocessingError("no_face_detected", "no face was found in any frame")
    arrays = {"rois": clip.rois}
    energy = None
    if plan["has_audio"]:
        sound = storage.get_arrays(_work_bucket(), work_key(job_id, "audio.npz"))
        arrays["audio"] = audio_lib.align_audio_to_video(sound["features"], len(clip))
        energy = np.full(len(clip), sound["energy_db"].min(initial=-100.0), np.float32)
        energy[:min(len(clip), len(sound["energy_db"]))] = sound["energy_db"][:len(clip)]
    face_track = np.ones(len(clip), bool)  # short gaps were interpolated; only breaks lack a face
    for start, end in clip.breaks:
        face_track[start:end] = False
    segments = segmentation.plan_segments(
        len(clip), FPS, face_present=face_track, mouth_motion=segmentation.mouth_motion(clip.rois),
        audio_energy_db=energy, max_segment_s=get_settings().max_segment_s)
    storage.put_arrays(_work_bucket(), work_key(job_id, "features.npz"), **arrays)
    quality = {
        "frames": len(clip),
        "frames_with_face": int(clip.detected.sum()),
        "face_ratio": round(float(clip.detected.mean()), 4),
        "face_breaks": [list(b) for b in clip.breaks],
        "corrupt_frames_skipped": sum(int(s["stats"].get("corrupt_skipped", 0)) for s in summaries),
    }
    jobs.update(job_id, segments_total=len(segments), quality=quality, num_frames=len(clip), progress=0.6)
    return {"num_frames": len(clip), "modality": plan["modality"], "quality": quality,
            "segments": [{"id": s.id, "start_frame": s.start_frame, "end_frame": s.end_frame} for s in segments]}


# --- infer ---------------------------------------------------------------------------------

def infer(job: dict, plan: dict) -> dict:
    """Decode every segment with the process's AV-HuBERT engine (GPU worker)."""
    from tasks import worker_runtime

    job_id = job["job_id"]
    arrays = storage.get_arrays(_work_bucket(), work_key(job_id, "features.npz"))
    engine = worker_runtime.engine()
    total = len(plan["segments"])

    def progress(done: int) -> None:
        # `update` leaves a terminal job as it is and returns it: a cancelled job stops here
        updated = jobs.update(job_id, segments_done=done, progress=round(0.6 + 0.35 * done / max(1, total), 3))
        if jobs.is_terminal(updated):
            raise JobCancelled()

    try:
        decoded = engine.transcribe(
            rois=arrays["rois"], audio=arrays.get("audio"), segments=plan["segments"],
            modality=plan["modality"], beam_size=job["request"]["beam_size"], on_progress=progress)
    except JobCancelled:
        return {"cancelled": True}
    return {**plan, "decoded": decoded, "model": engine.describe()}


class JobCancelled(Exception):
    """Raised inside a long stage when the job was cancelled meanwhile."""


# --- finalize ------------------------------------------------------------------------------

def build_result(decoded: dict, timings: dict) -> dict:
    """The public result: text, confidence, timed segments, model and timings."""
    segments = []
    for seg, hyp in zip(decoded["segments"], decoded["decoded"], strict=True):
        segments.append({
            "id": seg["id"],
            "start": round(seg["start_frame"] / FPS, 3),
            "end": round(seg["end_frame"] / FPS, 3),
            "text": hyp["text"],
            "confidence": round(hyp["confidence"], 4),
        })
    spoken = [s for s in segments if s["text"]]
    weights = [s["end"] - s["start"] for s in spoken]
    confidence = (sum(w * s["confidence"] for w, s in zip(weights, spoken, strict=True)) / sum(weights)
                  if spoken and sum(weights) > 0 else 0.0)
    return {
        "text": " ".join(s["text"] for s in spoken),
        "confidence": round(confidence, 4),
        "num_frames": decoded["num_frames"],
        "duration_s": round(decoded["num_frames"] / FPS, 3),
        "modality": decoded["modality"],
        "segments": segments,
        "quality": decoded.get("quality", {}),
        "model": decoded["model"],
        "timings": timings,
    }


def result_location(job: dict) -> tuple[str, str]:
    """(bucket, key prefix) where result.json/.srt/.vtt go."""
    output = job["request"].get("output")
    if output:
        return output["bucket"], f"{output['prefix'].rstrip('/')}/{job['job_id']}/" if output["prefix"] \
            else f"{job['job_id']}/"
    return _work_bucket(), work_key(job["job_id"], "")


def finalize(job: dict, decoded: dict) -> dict:
    """Write the result files, mark the job succeeded (once) and call its webhook (once)."""
    if decoded.get("cancelled"):
        return {"cancelled": True}
    job_id = job["job_id"]
    current = jobs.get(job_id) or job
    result = build_result(decoded, dict(current.get("timings") or {}))
    bucket, prefix = result_location(job)
    storage.put_json(bucket, prefix + "result.json", result)
    storage.put_bytes(bucket, prefix + "result.srt", segments_to_srt(result["segments"]).encode(),
                      "application/x-subrip")
    storage.put_bytes(bucket, prefix + "result.vtt", segments_to_vtt(result["segments"]).encode(), "text/vtt")
    location = {"bucket": bucket, "json": prefix + "result.json", "srt": prefix + "result.srt",
                "vtt": prefix + "result.vtt"}
    done = jobs.update(job_id, status=jobs.SUCCEEDED, stage="done", progress=1.0, result=result,
                       result_location=location, finished_at=time.time())
    if done and done["status"] == jobs.SUCCEEDED:
        notify(done)
    return {"job_id": job_id, "status": done and done["status"]}


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=lambda v: v.item() if hasattr(v, "item") else str(v)))
