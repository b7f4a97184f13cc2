"""The work of the CPU stages, as plain functions of the job record (Celery-free).

Every intermediate goes to the job's work prefix in S3 (`tasks.storage.work_key` lists the keys);
only the small typed records of `tasks.records` are returned.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from cpu_worker import audio as audio_lib
from cpu_worker import frames as frames_lib
from cpu_worker import segmentation, speakers, url_input
from cpu_worker.errors import NoFaceDetected, NoFrames
from cpu_worker.landmarks import TrackerConfig
from cpu_worker.mouth_roi import MouthRoiResult, extract_mouth_rois, stitch_results
from tasks import early, jobs, storage
from tasks.errors import JobError, input_not_found, input_too_large
from tasks.records import (
    FPS,
    ChunkSummary,
    FramesInput,
    InputPlan,
    JobRequest,
    JobResult,
    Quality,
    ResultSegment,
    SegmentPlan,
    SegmentSpan,
    SpeakerHint,
    TrackTranscript,
    Transcript,
    UrlInput,
    VideoInput,
    seconds,
)
from tasks.settings import get_settings
from tasks.storage import work_bucket, work_key
from tasks.subtitles import segments_to_srt, segments_to_vtt
from tasks.webhooks import enqueue as enqueue_webhook

CHUNK_OVERLAP = 25  # frames each side, so chunks share 50 (stitch_results needs >= 38)
INPUT_PLAN = "input_plan.json"


# --- prepare -------------------------------------------------------------------------------

def prepare(job: jobs.Job) -> InputPlan:
    """Validate the input in S3, plan the preprocessing chunks, extract audio features."""
    request: JobRequest = job["request"]
    source = request["input"]
    if source["type"] == "frames":
        plan = _prepare_frames(source, request)
    elif source["type"] == "url":
        plan = _prepare_video(job["job_id"], _fetch_url(job["job_id"], source), request)
    else:
        plan = _prepare_video(job["job_id"], source, request)
    plan["chunks"] = [c.to_dict() for c in segmentation.plan_chunks(  # type: ignore[misc]
        plan["num_frames"], chunk_frames=get_settings().chunk_frames, overlap=CHUNK_OVERLAP)]
    storage.put_json(work_bucket(), work_key(job["job_id"], INPUT_PLAN), plan)
    jobs.update(job["job_id"], chunks_total=len(plan["chunks"]), num_frames=plan["num_frames"],
                modality=plan["modality"], progress=0.05)
    return plan


def _prepare_frames(source: FramesInput, request: JobRequest) -> InputPlan:
    settings = get_settings()
    fps = float(source.get("fps") or FPS)
    # more frames than this, shot at `fps`, resample to more than AVSR_MAX_FRAMES at 25 fps
    most = math.ceil((settings.max_frames + 1) * fps / FPS) + 1
    objects = storage.list_frames(source["bucket"], source["prefix"], limit=most)
    if not objects:
        raise input_not_found(f"s3://{source['bucket']}/{source['prefix']} (no .jpg/.png frames)")
    total = sum(o.size for o in objects)
    if total > settings.max_input_bytes:
        raise input_too_large(f"frames add up to {total} bytes, limit {settings.max_input_bytes}")
    # Frames shot at `fps` mapped onto the 25 fps grid exactly as `ImageSequence` resamples them.
    keys = [o.key for o in frames_lib.resample_timed(((i / fps, o) for i, o in enumerate(objects)), FPS)]
    if len(keys) > settings.max_frames:
        raise input_too_large(f"{len(keys)} frames at 25 fps, limit {settings.max_frames}")
    if request["modality"] == "audio":
        raise JobError("no_audio", "an image sequence has no audio; use modality video")
    return {"type": "frames", "bucket": source["bucket"], "keys": keys, "num_frames": len(keys),
            "source_frames": len(objects), "modality": "video", "has_audio": False, "chunks": []}


def _fetch_url(job_id: str, source: UrlInput) -> VideoInput:
    """Fetch a URL input once, into the work prefix (`input.video`, so every chunk task on any host
    reads the same bytes) and this host's input cache."""
    settings = get_settings()
    key = work_key(job_id, "input.video")
    with tempfile.TemporaryDirectory(dir=settings.cache_dir or None) as tmp:
        local = Path(tmp) / "input.video"
        url_input.fetch(source["url"], local, max_bytes=settings.max_input_bytes, timeout_s=settings.url_timeout_s,
                        allow_private=settings.url_allow_private)
        storage.upload_to_cache(local, work_bucket(), key)
    return {"type": "video", "bucket": work_bucket(), "key": key}


def _prepare_video(job_id: str, source: VideoInput, request: JobRequest) -> InputPlan:
    settings = get_settings()
    obj = storage.head(source["bucket"], source["key"])
    if obj.size > settings.max_input_bytes:
        raise input_too_large(f"video is {obj.size} bytes, limit {settings.max_input_bytes}")
    video = frames_lib.VideoFile(storage.cached_download(obj, source["bucket"]))
    num_frames = video.num_frames(settings.max_frames)
    if num_frames <= 0:
        raise NoFrames("the video has no decodable frames")
    if num_frames > settings.max_frames:
        raise input_too_large(f"{num_frames} frames at 25 fps, limit {settings.max_frames}")
    has_audio = video.has_audio
    if has_audio:
        wave = video.audio(frames_lib.audio_samples(num_frames))  # not the audio past the video's end
        assert wave is not None  # has_audio
        storage.put_arrays(work_bucket(), work_key(job_id, "audio.npz"),
                           features=audio_lib.audio_features(wave, frames_lib.AUDIO_RATE),
                           energy_db=audio_lib.frame_energy_db(wave, frames_lib.AUDIO_RATE, fps=FPS))
    modality = resolve_modality(request["modality"], has_audio)
    return {"type": "video", "bucket": source["bucket"], "key": source["key"], "etag": obj.etag,
            "size": obj.size, "num_frames": num_frames, "modality": modality, "has_audio": has_audio,
            "chunks": []}


def resolve_modality(requested: str, has_audio: bool) -> Any:
    """The modality a video is decoded with: `auto` is audiovisual when it has sound, else video;
    audio and audiovisual need sound (`no_audio`)."""
    modality = ("audiovisual" if has_audio else "video") if requested == "auto" else requested
    if modality in ("audio", "audiovisual") and not has_audio:
        raise JobError("no_audio", f"modality {modality} needs sound and the video has none")
    return modality


# --- preprocess ----------------------------------------------------------------------------

def _chunk_frames(plan: InputPlan, start: int, end: int) -> Iterable[np.ndarray]:
    """Frames `[start, end)` at 25 fps, streamed (frames: concurrent GETs; video: the host's copy of
    the version `prepare` saw, fetched once per host)."""
    if plan["type"] == "frames":
        return frames_lib.ImageSequence(storage.get_many(plan["bucket"], plan["keys"][start:end]), fps=FPS)
    obj = storage.S3Object(plan["key"], plan.get("size", 0), plan.get("etag", ""))
    return frames_lib.VideoFile(storage.cached_download(obj, plan["bucket"])).window(start, end)


def input_plan(job: jobs.Job) -> InputPlan:
    """What `prepare` planned for the job (`input_plan.json`)."""
    plan: InputPlan = storage.get_json(work_bucket(), work_key(job["job_id"], INPUT_PLAN))
    return plan


def preprocess_chunk(job: jobs.Job, chunk_index: int) -> ChunkSummary:
    """Download one chunk's frames and extract its mouth ROIs → `chunks/NNNN.npz`."""
    job_id = job["job_id"]
    plan = input_plan(job)
    chunk = plan["chunks"][chunk_index]
    # A chunk without any face is fine (the clip may have one elsewhere): `assemble` decides.
    roi = extract_mouth_rois(_chunk_frames(plan, chunk["start"], chunk["end"]), fps=FPS, start_frame=chunk["start"],
                             require_face=False, workers=get_settings().cpu_threads or None,
                             config=tracker_config(),
                             crop_tracks=speakers.needs_track_rois(job["request"].get("speaker"))
                             and plan["modality"] != "audio")
    storage.put_arrays(work_bucket(), work_key(job_id, f"chunks/{chunk_index:04d}.npz"), **roi.to_arrays())
    return {"index": chunk_index, "frames": len(roi), "stats": _jsonable(roi.stats)}


def tracker_config() -> TrackerConfig:
    """The tracker's settings (`AVSR_MAX_FACES`: how many faces are followed as tracks)."""
    return TrackerConfig(max_faces=get_settings().max_faces)


def chunk_progress(job: jobs.Job) -> float:
    """Progress after one more chunk of `job` is done: preprocessing spans 0.05 → 0.6."""
    done = jobs.increment(job["job_id"], "chunks_done")
    total = max(1, job.get("chunks_total") or 1)  # set by `prepare` before the chunks were queued
    return round(0.05 + 0.55 * min(1.0, done / total), 3)


# --- assemble ------------------------------------------------------------------------------

def plan_clip(clip: MouthRoiResult, energy_db: np.ndarray | None, corrupt_skipped: int, max_segment_s: float,
              modality: Any, speaker: str | SpeakerHint | None = None) -> tuple[SegmentPlan, np.ndarray]:
    """The segments and quality of a stitched clip, and the ROI streams they read (pure): cut at face-track
    breaks, pauses and silence (`energy_db`, the audio's per-frame energy, when it has sound), for the
    face(s) the request's `speaker` names (`cpu_worker/speakers.py`)."""
    if len(clip) == 0:
        raise NoFrames("no decodable frames in the input")
    if not clip.detected.any():
        raise NoFaceDetected("no face was found in any frame")
    energy = None if energy_db is None else clip_energy(energy_db, len(clip))
    tracks = speakers.face_tracks(clip)
    mode = "hint" if isinstance(speaker, dict) else (speaker or speakers.DEFAULT)
    if (mode == "speaking" and energy is None) or modality == "audio":
        mode = speakers.DEFAULT  # nothing to synchronise with / no face read: documented fallbacks
    rois = clip.rois
    read = clip
    if mode == speakers.DEFAULT:
        spans = _spans(clip, energy, max_segment_s)
        for span in spans:
            k = speakers.default_track(clip, tracks, span["start_frame"], span["end_frame"])
            if k is not None:
                span["track"] = k + 1
    elif mode in ("hint", "center"):
        k = (speakers.choose_hint(tracks, speaker) if isinstance(speaker, dict)
             else speakers.choose_center(tracks, clip.stats.get("frame_size")))
        read, rois = tracks[k], tracks[k].rois
        spans = [{**span, "track": k + 1} for span in _spans(read, energy, max_segment_s)]
    elif mode == "speaking":
        assert energy is not None
        spans, rois = _speaking(clip, tracks, energy, max_segment_s)
    elif mode == "all":
        spans = sorted(({**span, "track": k + 1, "stream": k} for k, track in enumerate(tracks)
                        for span in _spans(track, None, max_segment_s)),
                       key=lambda span: (span["start_frame"], span["track"]))
        spans = [{**span, "id": i} for i, span in enumerate(spans)]
        rois, modality = np.stack([t.rois for t in tracks]), "video"
    else:
        raise ValueError(f"unknown speaker {speaker!r}")
    quality: Quality = {
        "frames": len(clip),
        "frames_with_face": int(read.detected.sum()),
        "face_ratio": round(float(read.detected.mean()), 4),
        "face_breaks": [list(b) for b in read.breaks],
        "corrupt_frames_skipped": corrupt_skipped,
        "tracks": speakers.track_info(tracks),
        "speaker": mode,
    }
    return {"num_frames": len(clip), "modality": modality, "quality": quality, "segments": spans}, rois


def clip_energy(energy_db: np.ndarray, num_frames: int) -> np.ndarray:
    """The audio's per-frame energy over the clip's frames: cut, or padded with its quietest level."""
    energy = np.full(num_frames, energy_db.min(initial=-100.0), np.float32)
    energy[:min(num_frames, len(energy_db))] = energy_db[:num_frames]
    return energy


def _spans(clip: MouthRoiResult, energy: np.ndarray | None, max_segment_s: float,
           face: np.ndarray | None = None) -> list[SegmentSpan]:
    """The segments of one ROI stream (`segmentation.plan_segments` on its face run, motion and the audio)."""
    segments = segmentation.plan_segments(
        len(clip), FPS, face_present=speakers.face_mask(clip) if face is None else face,
        mouth_motion=segmentation.mouth_motion(clip.rois) if face is None else None,
        audio_energy_db=energy, max_segment_s=max_segment_s)
    return [{"id": s.id, "start_frame": s.start_frame, "end_frame": s.end_frame} for s in segments]


def _speaking(clip: MouthRoiResult, tracks: list[MouthRoiResult], energy: np.ndarray,
              max_segment_s: float) -> tuple[list[SegmentSpan], np.ndarray]:
    """`speaking`: segments where any face is seen, cut at the audio's pauses; each reads the track whose
    mouth opening follows the audio energy best (`speakers.sync_score`), else the default track."""
    anyone = np.logical_or.reduce([speakers.face_mask(t) for t in tracks])
    spans = _spans(clip, energy, max_segment_s, face=anyone)
    rois = clip.rois.copy()
    for span in spans:
        a, b = span["start_frame"], span["end_frame"]
        scores: dict[int, float] = {}
        for k, track in enumerate(tracks):
            seen = track.detected[a:b]
            if seen.mean() >= speakers.SYNC_MIN_COVERAGE:
                score = speakers.sync_score(speakers.mouth_opening(track.landmarks[a:b]), energy[a:b], seen)
                if score is not None:
                    scores[k] = score
        chosen = max(scores, key=lambda t: scores[t]) if scores else speakers.default_track(clip, tracks, a, b)
        if chosen is not None:  # else the default stream, which no track follows here
            span["track"] = chosen + 1
            rois[a:b] = tracks[chosen].rois[a:b]
    return spans, rois


def assemble(job: jobs.Job, summaries: list[ChunkSummary]) -> SegmentPlan:
    """Stitch the chunks into one clip and plan its segments → `features.npz` (ROIs, audio features)."""
    job_id = job["job_id"]
    bucket = work_bucket()
    plan = input_plan(job)
    chunk_keys = [work_key(job_id, f"chunks/{i:04d}.npz") for i in range(len(plan["chunks"]))]
    clip = stitch_results([MouthRoiResult.from_arrays(storage.get_arrays(bucket, key)) for key in chunk_keys],
                          max_tracks=get_settings().max_faces)
    sound = storage.get_arrays(bucket, work_key(job_id, "audio.npz")) if plan["has_audio"] else None
    corrupt = sum(int(s["stats"].get("corrupt_skipped", 0)) for s in summaries)
    segment_plan, rois = plan_clip(clip, sound["energy_db"] if sound else None, corrupt, get_settings().max_segment_s,
                                   plan["modality"], job["request"].get("speaker"))
    # The audio features stay at their own length: inference cuts or pads them to each segment.
    storage.put_arrays(bucket, work_key(job_id, "features.npz"), rois=rois,
                       **({"audio": sound["features"]} if sound else {}))
    jobs.update(job_id, segments_total=len(segment_plan["segments"]), quality=segment_plan["quality"],
                num_frames=len(clip), progress=0.6)
    return segment_plan


# --- finalize ------------------------------------------------------------------------------

def build_result(transcript: Transcript, timings: dict[str, float]) -> JobResult:
    """The public result: text, confidence, timed segments, model and timings."""
    plan = transcript["plan"]
    segments: list[ResultSegment] = []
    for span, hyp in zip(plan["segments"], transcript["decoded"], strict=True):
        segment: ResultSegment = {
            "id": span["id"],
            "start": seconds(span["start_frame"]),
            "end": seconds(span["end_frame"]),
            "text": hyp["text"],
            "confidence": round(hyp["confidence"], 4),
            "words": [{**w, "confidence": round(w["confidence"], 4)} for w in hyp.get("words", [])],
        }
        if "track" in span:
            segment["track"] = span["track"]
        segments.append(segment)
    text, confidence = _joined(segments)
    tracks = sorted({s["track"] for s in segments if "track" in s})
    transcripts: list[TrackTranscript] = []
    for track in tracks:
        track_text, track_confidence = _joined([s for s in segments if s.get("track") == track])
        transcripts.append({"track": track, "text": track_text, "confidence": track_confidence})
    return {
        "text": text,
        "confidence": confidence,
        "transcripts": transcripts,
        "num_frames": plan["num_frames"],
        "duration_s": seconds(plan["num_frames"]),
        "modality": plan["modality"],
        "segments": segments,
        "quality": plan.get("quality", {}),
        "model": transcript["model"],
        "timings": timings,
    }


def _joined(segments: list[ResultSegment]) -> tuple[str, float]:
    """Text of the segments that have any, and their confidence weighted by duration."""
    spoken = [s for s in segments if s["text"]]
    weights = [s["end"] - s["start"] for s in spoken]
    confidence = (sum(w * s["confidence"] for w, s in zip(weights, spoken, strict=True)) / sum(weights)
                  if spoken and sum(weights) > 0 else 0.0)
    return " ".join(s["text"] for s in spoken), round(confidence, 4)


def result_location(job: jobs.Job) -> tuple[str, str]:
    """(bucket, key prefix) where result.json/.srt/.vtt go."""
    output = job["request"].get("output")
    if output:
        prefix = output["prefix"].rstrip("/")
        return output["bucket"], f"{prefix}/{job['job_id']}/" if prefix else f"{job['job_id']}/"
    return work_bucket(), work_key(job["job_id"], "")


def finalize(job: jobs.Job, transcript: Transcript) -> dict[str, Any]:
    """Write the result files, mark the job succeeded (once) and start its webhook's delivery (once)."""
    if transcript.get("cancelled"):
        return {"cancelled": True}
    job_id = job["job_id"]
    current = jobs.get(job_id) or job
    result = build_result(transcript, dict(current.get("timings") or {}))
    bucket, prefix = result_location(job)
    storage.require_bucket(bucket)  # never create a client's bucket (SeaweedFS would, on put_object)
    storage.put_json(bucket, prefix + "result.json", result)
    storage.put_bytes(bucket, prefix + "result.srt", segments_to_srt(result["segments"]).encode(),
                      "application/x-subrip")
    storage.put_bytes(bucket, prefix + "result.vtt", segments_to_vtt(result["segments"]).encode(), "text/vtt")
    location = {"bucket": bucket, "json": prefix + "result.json", "srt": prefix + "result.srt",
                "vtt": prefix + "result.vtt"}
    done = jobs.update(job_id, status=jobs.SUCCEEDED, stage="done", progress=1.0, result=result,
                       result_location=location, finished_at=time.time(), partial_segments=[])
    if done and done["status"] == jobs.SUCCEEDED:
        early.forget(job_id)
        enqueue_webhook(done)
    return {"job_id": job_id, "status": done and done["status"]}


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=lambda v: v.item() if hasattr(v, "item") else str(v)))
