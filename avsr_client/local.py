"""`avsr transcribe`: the service's preprocessing and model, in this process (no Redis, no S3).

The same calls as the workers, in the same order: the video cut into the chunks `prepare` plans,
mouth ROIs per chunk stitched as `assemble` does (`cpu_worker.stages.plan_clip` for the segments),
`gpu_worker.engine.Engine` over the segments, `cpu_worker.stages.build_result` for the result —
so a clip gives the same segments and text here as through the service. Needs the cpu and gpu
extras; imported only by `avsr transcribe`.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from avsr_client.client import result_text
from cpu_worker import audio as audio_lib
from cpu_worker import frames as frames_lib
from cpu_worker import segmentation
from cpu_worker.errors import NoFrames
from cpu_worker.mouth_roi import extract_mouth_rois, stitch_results
from cpu_worker.speakers import needs_track_rois
from cpu_worker.stages import CHUNK_OVERLAP, build_result, plan_clip, resolve_modality, tracker_config
from gpu_worker.engine import Engine
from tasks.records import FPS, JobResult, SpeakerHint, SpeakerMode
from tasks.settings import get_settings
from tasks.subtitles import render_result


class ProgressBar:
    """A one-line bar on stderr: `[#####.....]  50% preprocessing 3/6`."""

    def __init__(self, enabled: bool, width: int = 30):
        self.enabled, self.width = enabled and sys.stderr is not None, width

    def show(self, fraction: float, label: str) -> None:
        if self.enabled:
            filled = round(self.width * min(1.0, fraction))
            bar = "#" * filled + "." * (self.width - filled)
            print(f"\r[{bar}] {100 * fraction:3.0f}% {label:<28}", end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.enabled:
            print(file=sys.stderr, flush=True)


def transcribe(path: str | Path, *, model: str | Path, modality: str | None = None, beam_size: int | None = None,
               device: str = "auto", spm_path: str | None = None, dict_path: str | None = None,
               speaker: SpeakerMode | SpeakerHint | None = None, progress: bool = False) -> JobResult:
    """The result the service would give for this video (preprocessing 0-60 %, decoding 60-100 %);
    `speaker` as the request's field (None: "largest")."""
    settings = get_settings()
    bar = ProgressBar(progress)
    timings: dict[str, float] = {}
    started = time.perf_counter()
    video = frames_lib.VideoFile(path)
    num_frames = video.num_frames()
    if num_frames <= 0:
        raise NoFrames("the video has no decodable frames")
    wave = video.audio(frames_lib.audio_samples(num_frames)) if video.has_audio else None
    chosen = resolve_modality(modality or "auto", wave is not None)
    chunks = segmentation.plan_chunks(num_frames, chunk_frames=settings.chunk_frames, overlap=CHUNK_OVERLAP)
    parts = []
    for chunk in chunks:
        bar.show(0.6 * chunk.index / len(chunks), f"preprocessing {chunk.index + 1}/{len(chunks)}")
        parts.append(extract_mouth_rois(frames_lib.VideoFile(path).window(chunk.start, chunk.end), fps=FPS,
                                        start_frame=chunk.start, require_face=False,
                                        workers=settings.cpu_threads or None, config=tracker_config(),
                                        crop_tracks=needs_track_rois(speaker) and chosen != "audio"))
    clip = stitch_results(parts, max_tracks=settings.max_faces)
    features = energy = None
    if wave is not None:
        features = audio_lib.audio_features(wave, frames_lib.AUDIO_RATE)
        energy = audio_lib.frame_energy_db(wave, frames_lib.AUDIO_RATE, fps=FPS)
    plan, rois = plan_clip(clip, energy, int(clip.stats.get("corrupt_skipped", 0)), settings.max_segment_s, chosen,
                           speaker)
    timings["preprocess"] = round(time.perf_counter() - started, 3)
    bar.show(0.6, "loading the model")
    loaded = time.perf_counter()
    engine = Engine(model, spm_path=spm_path or settings.spm_path or None,
                    dict_path=dict_path or settings.dict_path or None, device=device,
                    precision=settings.precision, max_batch_frames=settings.max_batch_frames)
    total = len(plan["segments"])

    def decoded_so_far(done: int) -> None:
        bar.show(0.6 + 0.4 * done / max(1, total), f"decoding {done}/{total}")

    decoded_so_far(0)
    decoded = engine.transcribe(rois=rois, audio=features, segments=plan["segments"], modality=plan["modality"],
                                beam_size=beam_size or settings.beam_size, on_progress=decoded_so_far)
    timings["inference"] = round(time.perf_counter() - loaded, 3)
    bar.close()
    return build_result({"plan": plan, "decoded": decoded, "model": engine.describe()}, timings)


def render(result: JobResult, fmt: str) -> str:
    """The result as `text` (one line), `json`, `srt` or `vtt`."""
    if fmt == "text":
        return result_text(result) + "\n"
    if fmt == "json":
        return json.dumps(result, indent=2, ensure_ascii=False) + "\n"
    return render_result(result, fmt)[0]
