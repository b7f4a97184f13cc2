"""Batching across jobs through the real stack: jobs decoded in shared batches by the threads-pool GPU
worker give the results each gives when it runs alone, and `partial_segments` holds each job's
segments as they are decoded.

To make the jobs meet in the GPU worker, the stack's GPU and CPU workers stop consuming for the test
(Celery `cancel_consumer`): the jobs are preprocessed first, then a GPU worker of the test's own (a
long linger window, so all the jobs' segments are gathered) runs their inference while finalize
waits, so each job's record shows every segment in `partial_segments` before it succeeds.
"""

from __future__ import annotations

import json
import time

import pytest
import redis

from deploy.local.sample_media import write_face_video
from tasks.settings import get_settings

from .conftest import INPUT_BUCKET, upload_frames
from .test_worker_faults import control, stack_worker_paused, start_ready  # noqa: F401  (control: a fixture)
from .test_worker_shutdown import log_events

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def bodies(s3, jpeg_frames, tmp_path_factory) -> list[dict]:
    """Four jobs of different lengths: two read video only, two audio-visual (beam 3 each)."""
    upload_frames(s3, "clips/batching-face50/", jpeg_frames)
    out = [{"s3_bucket": INPUT_BUCKET, "s3_prefix": "clips/batching-face50/", "beam_size": 3}]
    for seconds, seed, modality in ((6.0, 31, "video"), (6.0, 32, "auto"), (9.0, 33, "auto")):
        clip = tmp_path_factory.mktemp("batching") / f"talk{seed}.mp4"
        write_face_video(clip, seconds=seconds, with_audio=True, seed=seed)
        s3.upload_file(str(clip), INPUT_BUCKET, f"videos/batching{seed}.mp4")
        out.append({"s3_bucket": INPUT_BUCKET, "s3_key": f"videos/batching{seed}.mp4", "beam_size": 3,
                    "modality": modality})
    return out


def wait_for_queue(r: redis.Redis, queue: str, length: int, api, job_ids: list[str], timeout: float = 300) -> None:
    """Until `queue` holds `length` messages (every job's next task), none of the jobs having ended."""
    deadline = time.monotonic() + timeout
    while r.llen(queue) < length:
        jobs = [api.request("GET", f"/v1/jobs/{j}").json() for j in job_ids]
        assert all(job["status"] in ("queued", "running") for job in jobs), jobs
        assert time.monotonic() < deadline, f"{queue} never held {length} tasks"
        time.sleep(0.2)


def segments_of(result: dict) -> list[tuple]:
    return [(s["id"], s["start"], s["end"], s["text"], s.get("track")) for s in result["segments"]]


def test_jobs_batched_together_give_what_each_gives_alone(stack, api, control, bodies):  # noqa: F811
    alone = []
    for body in bodies:
        job = api.wait(api.submit(body))
        assert job["status"] == "succeeded", job
        alone.append(job["result"])
    assert {r["modality"] for r in alone} == {"video", "audiovisual"}
    assert any(len(r["segments"]) >= 3 for r in alone)

    r = redis.Redis.from_url(stack.config.redis_url, decode_responses=True)
    with stack_worker_paused(control, "gpu", "gpu"):
        ids = [api.submit(body) for body in bodies]
        wait_for_queue(r, "gpu", len(ids), api, ids)  # preprocessed: each job's infer task is queued
        with stack_worker_paused(control, "cpu1", "cpu"):
            worker = start_ready(stack, "gpu-batching", "gpu", env={"AVSR_BATCH_LINGER_MS": "3000"})
            try:
                wait_for_queue(r, "cpu", len(ids), api, ids)  # inferred: each job's finalize is queued
                running = [api.request("GET", f"/v1/jobs/{j}").json() for j in ids]
            finally:
                worker.terminate()
                worker.wait(60)
    together = [api.wait(j) for j in ids]

    for before, job, result in zip(running, together, alone, strict=True):
        assert job["status"] == "succeeded", job
        # same results as alone: texts identical, confidences equal to rounding
        assert segments_of(job["result"]) == segments_of(result)
        assert [s["confidence"] for s in job["result"]["segments"]] == \
            pytest.approx([s["confidence"] for s in result["segments"]], abs=2e-4)
        assert job["result"]["text"] == result["text"]
        # before finalize, the running job's partial_segments held every segment, in order
        assert before["status"] == "running" and before["segments_done"] == len(result["segments"])
        partial = before["partial_segments"]
        assert [(s["id"], s["start"], s["end"], s["text"], s.get("track")) for s in partial] == segments_of(result)
        assert [s["confidence"] for s in partial] == pytest.approx(
            [s["confidence"] for s in result["segments"]], abs=2e-4)
        assert "partial_segments" not in job
    # and they did share forward passes: a batch held segments of both video-only jobs, one of both
    # audio-visual jobs (never a video-only with an audio-visual one)
    batches = [e for e in log_events(stack.logs / "gpu-batching.log") if e["message"] == "batch decoded"]
    shared = [set(e["job_ids"].split(",")) for e in batches]
    modality = {j: res["modality"] for j, res in zip(ids, alone, strict=True)}
    assert [modality[j] for j in ids] == ["video", "video", "audiovisual", "audiovisual"]
    for pair in ({ids[0], ids[1]}, {ids[2], ids[3]}):
        assert any(pair <= s for s in shared), json.dumps(batches)
    assert all(len({modality[j] for j in s}) == 1 for s in shared)
    # within the frame budget (the stack's default), which on CPU counts the segments' own frames
    budget = get_settings().max_batch_frames
    assert all(e["frames"] <= budget or e["segments"] == 1 for e in batches), json.dumps(batches)
