"""Inference overlapping preprocessing (`tasks/early.py`): a clip over 56 s is decoded while it is
still being preprocessed, and its result, SRT and VTT are the one-piece result's."""

from __future__ import annotations

import json
import time

import pytest
import redis

from gpu_worker.engine import Engine
from tasks.subtitles import render_result

from .conftest import CHECKPOINT, INPUT_BUCKET, REDIS_URL
from .test_pipeline import in_process, work_arrays


@pytest.fixture(scope="module")
def long_talk(s3, tmp_path_factory):
    """58 s of talking face with its voice: 1450 frames, two calibration windows, 15 chunks on the stack."""
    from deploy.local.sample_media import write_face_video

    path = tmp_path_factory.mktemp("early") / "talk.mp4"
    write_face_video(path, seconds=58.0, with_audio=True, seed=21)
    s3.upload_file(str(path), INPUT_BUCKET, "videos/early-talk.mp4")
    return path


def test_segments_are_decoded_while_the_rest_is_preprocessed(api, s3, long_talk):
    r = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    job_id = api.submit({"s3_bucket": INPUT_BUCKET, "s3_key": "videos/early-talk.mp4", "beam_size": 1})
    early_spans: dict[int, dict] = {}
    shown_while_preprocessing: list[dict] = []
    deadline = time.monotonic() + 300
    while True:
        job = api.request("GET", f"/v1/jobs/{job_id}").json()
        for raw in r.hvals(f"avsr:early:{job_id}:spans"):
            span = json.loads(raw)["span"]
            early_spans[span["id"]] = span
        if job["stage"] == "preprocessing" and job["partial_segments"]:
            shown_while_preprocessing = job["partial_segments"]
        if job["status"] in ("succeeded", "failed", "cancelled") or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert job["status"] == "succeeded", job
    result = job["result"]
    final = {(round(s["start"] * 25), round(s["end"] * 25)): s for s in result["segments"]}
    # the early plan settled the final plan's first segments, the same ids and frames
    assert early_spans and len(early_spans) < len(final)
    for span in early_spans.values():
        segment = final[(span["start_frame"], span["end_frame"])]
        assert segment["id"] == span["id"]
    assert job["segments_reused"] == len(early_spans)
    # text came while the clip was still preprocessed, and it is the final text of those segments
    assert shown_while_preprocessing
    for shown in shown_while_preprocessing:
        segment = result["segments"][shown["id"]]
        assert (shown["start"], shown["end"], shown["text"], shown["confidence"]) == (
            segment["start"], segment["end"], segment["text"], segment["confidence"])
    # the result is the one-piece result: the segments decoded early, decoded again alone in this
    # process from the job's features.npz (what `assemble` made, without any early state), give
    # exactly the result's segments; the others were decoded by `infer` itself (test_pipeline.py)
    stored = work_arrays(s3, job_id, "features.npz")
    reused = {"segments": [result["segments"][i] for i in sorted(early_spans)]}
    alone = in_process(Engine(CHECKPOINT, device="cpu"), stored["rois"], stored["audio"], reused, "audiovisual", beam=1)
    for segment, decoded in zip(reused["segments"], alone, strict=True):
        assert (segment["text"], segment["confidence"]) == (decoded["text"], round(decoded["confidence"], 4))
        assert [w["word"] for w in segment["words"]] == [w["word"] for w in decoded["words"]]
    for fmt in ("srt", "vtt"):
        served = api.request("GET", f"/v1/jobs/{job_id}/result?format={fmt}")
        assert served.status_code == 200 and served.text == render_result(result, fmt)[0]
