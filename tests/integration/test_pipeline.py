"""End to end through the real stack: HTTP API → Celery (cpu, gpu queues) → S3 → result.

Each successful job is checked against the same work done in-process (the library calls the
workers make), so the service can neither lose, reorder nor alter anything on the way.
"""

from __future__ import annotations

import io
import itertools
import json
import time

import cv2
import numpy as np
import pytest
import srt

from cpu_worker.frames import ImageSequence, VideoFile
from cpu_worker.mouth_roi import extract_mouth_rois
from gpu_worker.engine import Engine

from .conftest import CHECKPOINT, INPUT_BUCKET, OUTPUT_BUCKET, upload_frames

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(CHECKPOINT, device="cpu")


def work_arrays(s3, job_id: str, name: str) -> dict[str, np.ndarray]:
    body = s3.get_object(Bucket="avsr-test-work", Key=f"jobs/{job_id}/{name}")["Body"].read()
    with np.load(io.BytesIO(body)) as data:
        return {k: data[k] for k in data.files}


def in_process(engine: Engine, rois, audio, result: dict, modality: str, beam: int) -> list[dict]:
    segments = [{"id": s["id"], "start_frame": round(s["start"] * 25), "end_frame": round(s["end"] * 25)}
                for s in result["segments"]]
    return engine.transcribe(rois=rois, audio=audio, segments=segments, modality=modality, beam_size=beam)


def test_frames_job_matches_in_process_work(frames_job, s3, jpeg_frames, engine):
    job = frames_job
    assert job["status"] == "succeeded", job
    result = job["result"]
    assert result["num_frames"] == 50 and result["duration_s"] == 2.0
    assert result["modality"] == "video"
    assert 0.0 <= result["confidence"] <= 1.0
    assert result["quality"]["frames_with_face"] == 47  # frames 0, 20 and 21 show no face
    # The ROIs the workers stored are those of the frames in natural order (frame_2 before frame_10).
    expected = extract_mouth_rois(ImageSequence(jpeg_frames, fps=25.0), fps=25.0)
    stored = work_arrays(s3, job["job_id"], "features.npz")
    np.testing.assert_array_equal(stored["rois"], expected.rois)
    # Inference on the GPU-queue worker equals the same model run here.
    decoded = in_process(engine, expected.rois, None, result, "video", beam=3)
    assert [s["text"] for s in result["segments"]] == [d["text"] for d in decoded]
    assert [s["confidence"] for s in result["segments"]] == pytest.approx([d["confidence"] for d in decoded],
                                                                           abs=1e-4)
    assert result["text"] == " ".join(d["text"] for d in decoded if d["text"])
    assert set(result["timings"]) >= {"prepare", "preprocess_chunk", "assemble", "infer"}
    assert job["stage"] == "done" and job["progress"] == 1.0


def test_result_files_in_s3_and_formats(frames_job, api, s3):
    job_id, result = frames_job["job_id"], frames_job["result"]
    location = frames_job["result_location"]
    stored = json.loads(s3.get_object(Bucket=location["bucket"], Key=location["json"])["Body"].read())
    assert stored == result
    subtitles = list(srt.parse(s3.get_object(Bucket=location["bucket"], Key=location["srt"])["Body"].read().decode()))
    # Long texts are wrapped over lines and consecutive cues; the words are all there, in order.
    def squeeze(texts):
        return "".join("".join(texts).split())

    assert squeeze(s.content for s in subtitles) == squeeze(s["text"] for s in result["segments"])
    assert subtitles[0].start.total_seconds() == result["segments"][0]["start"]
    assert api.request("GET", f"/v1/jobs/{job_id}/result").json() == result
    vtt = api.request("GET", f"/v1/jobs/{job_id}/result?format=vtt")
    assert vtt.headers["Content-Type"].startswith("text/vtt") and vtt.text.startswith("WEBVTT")
    assert api.request("GET", f"/v1/jobs/{job_id}/result?format=doc").json()["error"]["code"] == "invalid_format"
    narrow = api.request("GET", f"/v1/jobs/{job_id}/result?format=srt&line_chars=16&max_lines=1")
    cues = list(srt.parse(narrow.text))
    assert all("\n" not in c.content and len(c.content) <= 16 for c in cues)
    assert squeeze(c.content for c in cues) == squeeze(s["text"] for s in result["segments"])
    bad = api.request("GET", f"/v1/jobs/{job_id}/result?format=srt&max_lines=0")
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_field"
    words = [w["word"] for s in result["segments"] for w in s["words"]]
    assert " ".join(words) == " ".join(s["text"] for s in result["segments"] if s["text"])


def test_video_with_audio_runs_audiovisual(api, s3, tmp_path, engine):
    from deploy.local.sample_media import write_face_video

    clip = tmp_path / "talk.mp4"
    write_face_video(clip, seconds=3.0, with_audio=True, seed=3)
    s3.upload_file(str(clip), INPUT_BUCKET, "videos/talk.mp4")
    job = api.wait(api.submit({"s3_bucket": INPUT_BUCKET, "s3_key": "videos/talk.mp4",
                               "output": {"s3_bucket": OUTPUT_BUCKET, "s3_prefix": "results"}}))
    assert job["status"] == "succeeded", job
    result = job["result"]
    assert result["modality"] == "audiovisual" and result["num_frames"] == 75
    assert job["result_location"]["bucket"] == OUTPUT_BUCKET
    assert job["result_location"]["json"] == f"results/{job['job_id']}/result.json"
    stored = work_arrays(s3, job["job_id"], "features.npz")
    video = VideoFile(clip)
    expected = extract_mouth_rois(video, fps=25.0)
    np.testing.assert_array_equal(stored["rois"], expected.rois)
    assert stored["audio"].shape == (75, 104)
    decoded = in_process(engine, stored["rois"], stored["audio"], result, "audiovisual", beam=5)
    assert [s["text"] for s in result["segments"]] == [d["text"] for d in decoded]


def test_predict_keeps_the_old_contract(api, frames_job):
    response = api.request("POST", "/predict", json={"s3_bucket": INPUT_BUCKET, "s3_prefix": "clips/face50/"},
                           timeout=180)
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) >= {"text", "confidence", "num_frames"}
    assert body["num_frames"] == 50
    # Same frames, default beam 5 here versus 3 above: only the frame count must agree; the
    # text must equal a fresh job with the same settings.
    again = api.wait(api.submit({"s3_bucket": INPUT_BUCKET, "s3_prefix": "clips/face50/"}))
    assert body["text"] == again["result"]["text"]


@pytest.mark.parametrize(("name", "setup", "code"), [
    ("missing prefix", None, "input_not_found"),
    ("no face", "noise", "no_face_detected"),
    ("no face in 40x2000 frames (too thin for dlib's CNN)", "sliver", "no_face_detected"),
    ("corrupt video", "garbage", "bad_media"),
    ("audio from frames", "frames-audio", "no_audio"),
    ("1x1 frames", "tiny", "no_frames"),
    ("decompression bomb", "bomb", "input_too_large"),
])
def test_bad_inputs_fail_with_a_reason(api, s3, jpeg_frames, name, setup, code):
    if setup is None:
        body = {"s3_bucket": INPUT_BUCKET, "s3_prefix": "does/not/exist/"}
    elif setup == "noise":
        rng = np.random.default_rng(0)
        noise = [cv2.imencode(".png", rng.integers(0, 255, (120, 160, 3), dtype=np.uint8))[1].tobytes()
                 for _ in range(10)]
        body = {"s3_bucket": INPUT_BUCKET, "s3_prefix": upload_frames(s3, "clips/noise/", noise, "png")}
    elif setup == "sliver":
        rng = np.random.default_rng(1)
        thin = [cv2.imencode(".png", rng.integers(0, 255, (2000, 40, 3), dtype=np.uint8))[1].tobytes()
                for _ in range(6)]
        body = {"s3_bucket": INPUT_BUCKET, "s3_prefix": upload_frames(s3, "clips/sliver/", thin, "png")}
    elif setup == "tiny":
        tiny = [cv2.imencode(".png", np.zeros((1, 1, 3), np.uint8))[1].tobytes()] * 5
        body = {"s3_bucket": INPUT_BUCKET, "s3_prefix": upload_frames(s3, "clips/tiny/", tiny, "png")}
    elif setup == "bomb":
        from tests.unit.test_frames_sources import _png_header

        bomb = [_png_header(30000, 30000)] * 2
        body = {"s3_bucket": INPUT_BUCKET, "s3_prefix": upload_frames(s3, "clips/bomb/", bomb, "png")}
    elif setup == "garbage":
        s3.put_object(Bucket=INPUT_BUCKET, Key="videos/garbage.mp4", Body=b"\x00not a video" * 100)
        body = {"s3_bucket": INPUT_BUCKET, "s3_key": "videos/garbage.mp4"}
    else:
        upload_frames(s3, "clips/face50/", jpeg_frames)
        body = {"s3_bucket": INPUT_BUCKET, "s3_prefix": "clips/face50/", "modality": "audio"}
    job = api.wait(api.submit(body))
    assert job["status"] == "failed", name
    assert job["error"]["code"] == code, job["error"]
    assert job["error"]["message"]


def test_long_clip_fans_out_and_batches_segments(api, s3, tmp_path, engine):
    """10 s at AVSR_CHUNK_FRAMES=100 → 3 preprocessing tasks in parallel; AVSR_MAX_SEGMENT_S=4 → several
    segments decoded in batches. Stitched chunks equal one-piece preprocessing, batched decoding equals
    one segment at a time, and segment times tile the clip's face track in order."""
    from deploy.local.sample_media import write_face_video

    clip = tmp_path / "long.mp4"
    utterances = write_face_video(clip, seconds=10.0, with_audio=True, seed=11)
    s3.upload_file(str(clip), INPUT_BUCKET, "videos/long.mp4")
    job = api.wait(api.submit({"s3_bucket": INPUT_BUCKET, "s3_key": "videos/long.mp4", "beam_size": 2}))
    assert job["status"] == "succeeded", job
    result = job["result"]
    stored = work_arrays(s3, job["job_id"], "features.npz")
    whole = extract_mouth_rois(VideoFile(clip), fps=25.0)
    np.testing.assert_array_equal(stored["rois"], whole.rois)
    plan_key = f"jobs/{job['job_id']}/input_plan.json"
    plan = json.loads(s3.get_object(Bucket="avsr-test-work", Key=plan_key)["Body"].read())
    assert len(plan["chunks"]) == 3
    segments = result["segments"]
    assert len(segments) >= 3 and job["segments_total"] == len(segments) == job["segments_done"]
    assert all(0 < s["end"] - s["start"] <= 4.0 for s in segments)
    assert all(a["end"] <= b["start"] for a, b in itertools.pairwise(segments))
    # cuts fall in the pauses between the generated utterances where a pause is needed
    inside_speech = [s for s in segments[:-1] for u0, u1 in utterances if u0 + 0.2 < s["end"] < u1 - 0.2
                     and u1 - u0 < 4.0]
    assert not inside_speech
    for seg in segments:  # one at a time, as the official single-utterance decode
        alone = in_process(engine, stored["rois"], stored["audio"], {"segments": [seg]}, "audiovisual", beam=2)
        assert alone[0]["text"] == seg["text"]
        assert alone[0]["confidence"] == pytest.approx(seg["confidence"], abs=1e-4)


def test_redelivered_finalize_changes_nothing(api, stack, frames_job_done):
    """acks_late can deliver a task twice: a late finalize with other data must not touch the result."""
    from celery import Celery

    job_id = frames_job_done["job_id"]
    client = Celery(broker=stack.config.redis_url, backend=stack.config.redis_url)
    client.conf.update(task_serializer="json", accept_content=["json"], result_accept_content=["json"])
    decoded = client.AsyncResult(f"{job_id}.infer").get(timeout=10)
    tampered = {**decoded, "decoded": [{**d, "text": "tampered"} for d in decoded["decoded"]]}
    client.send_task("avsr.finalize", args=(tampered, job_id), queue="cpu")
    log = stack.logs / "cpu1.log"
    deadline = time.monotonic() + 30
    skipped = []
    while not skipped and time.monotonic() < deadline:
        lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
        skipped = [e for e in lines if e.get("job_id") == job_id and e["message"].startswith("skipping finalize")]
        time.sleep(0.2)
    assert skipped, "the worker never consumed the re-delivered finalize"
    job = api.request("GET", f"/v1/jobs/{job_id}").json()
    assert job["result"] == frames_job_done["result"] and job["finished_at"] == frames_job_done["finished_at"]


def test_frames_at_another_rate_are_resampled_like_the_library(api, s3, frames_job_done, jpeg_frames):
    """50 frames shot at 50 fps are 1 s of video: 25 frames at the model's rate, the same ones
    `ImageSequence(fps=50)` picks."""
    job = api.wait(api.submit({"s3_bucket": INPUT_BUCKET, "s3_prefix": "clips/face50/", "fps": 50}))
    assert job["status"] == "succeeded", job
    assert job["result"]["num_frames"] == 25 and job["result"]["duration_s"] == 1.0
    expected = extract_mouth_rois(ImageSequence(jpeg_frames, fps=50.0), fps=25.0)
    np.testing.assert_array_equal(work_arrays(s3, job["job_id"], "features.npz")["rois"], expected.rois)
