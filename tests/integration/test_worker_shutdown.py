"""Workers lose no work: a killed pool process's task is re-queued (acks_late +
reject_on_worker_lost) and SIGTERM lets a worker finish the task in hand (warm shutdown).

A private worker consumes a queue of its own (`drain-test`), so the test knows exactly which
process runs the task; the task is a real 20-second preprocessing chunk.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from deploy.local.sample_media import write_face_video

from .conftest import INPUT_BUCKET

pytestmark = pytest.mark.integration

QUEUE = "drain-test"
WORK_BUCKET = "avsr-test-work"


def log_events(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]


def wait_for(path: Path, predicate, what: str, timeout: float = 90) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for event in log_events(path):
            if predicate(event):
                return event
        time.sleep(0.05)
    raise AssertionError(f"{what} did not appear in {path.name} within {timeout}s")


def pool_children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


@pytest.fixture(scope="module")
def chunk_job(stack, s3, tmp_path_factory, monkeypatch_module):
    """A job record and plan for one 500-frame chunk of a video already in S3."""
    from tasks import jobs
    from tasks.settings import get_settings

    monkeypatch_module.setenv("AVSR_REDIS_URL", stack.config.redis_url)
    get_settings.cache_clear()
    clip = tmp_path_factory.mktemp("drain") / "drain.mp4"
    write_face_video(clip, seconds=20.0, with_audio=False, seed=5)
    s3.upload_file(str(clip), INPUT_BUCKET, "videos/drain.mp4")
    request = {"input": {"type": "video", "bucket": INPUT_BUCKET, "key": "videos/drain.mp4"},
               "modality": "video", "beam_size": 1, "output": None, "callback_url": None}
    job = jobs.create(request)
    chunk = {"index": 0, "start": 0, "end": 500, "core_start": 0, "core_end": 500}
    plan = {"type": "video", "bucket": INPUT_BUCKET, "key": "videos/drain.mp4", "num_frames": 500,
            "modality": "video", "has_audio": False, "chunks": [chunk]}
    s3.put_object(Bucket=WORK_BUCKET, Key=f"jobs/{job['job_id']}/input_plan.json", Body=json.dumps(plan).encode())
    yield job["job_id"], chunk
    jobs.update(job["job_id"], status=jobs.CANCELLED)
    get_settings.cache_clear()


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def send_chunk(stack, job_id: str, chunk: dict, suffix: str) -> str:
    from celery import Celery

    client = Celery(broker=stack.config.redis_url, backend=stack.config.redis_url)
    client.conf.update(task_serializer="json", accept_content=["json"], result_accept_content=["json"])
    task_id = f"{job_id}.chunk.0.{suffix}"
    client.send_task("avsr.preprocess_chunk", args=(chunk["index"], job_id), queue=QUEUE, task_id=task_id)
    return task_id


def chunk_written(s3, job_id: str) -> bool:
    listed = s3.list_objects_v2(Bucket=WORK_BUCKET, Prefix=f"jobs/{job_id}/chunks/")
    return listed.get("KeyCount", 0) == 1


def test_killed_pool_process_task_is_requeued_and_done(stack, s3, chunk_job):
    job_id, chunk = chunk_job
    worker = stack.start_worker("drain1", QUEUE)
    log = stack.logs / "drain1.log"
    wait_for(log, lambda e: e["message"].endswith("ready."), "worker ready")
    task_id = send_chunk(stack, job_id, chunk, "a")
    wait_for(log, lambda e: e["message"] == f"Task avsr.preprocess_chunk[{task_id}] received", "received")
    time.sleep(0.5)  # well inside the task (~2 s of decoding and tracking)
    for child in pool_children(worker.pid):
        os.kill(child, signal.SIGKILL)
    wait_for(log, lambda e: "WorkerLostError" in e["message"] + e.get("exc_info", ""), "worker lost")
    wait_for(log, lambda e: e["message"].startswith(f"Task avsr.preprocess_chunk[{task_id}] succeeded"),
             "the re-queued task succeeding")
    assert chunk_written(s3, job_id)
    worker.terminate()
    worker.wait(60)


def test_sigterm_finishes_the_task_in_hand(stack, s3, chunk_job):
    job_id, chunk = chunk_job
    s3.delete_object(Bucket=WORK_BUCKET, Key=f"jobs/{job_id}/chunks/0000.npz")
    worker = stack.start_worker("drain2", QUEUE)
    log = stack.logs / "drain2.log"
    wait_for(log, lambda e: e["message"].endswith("ready."), "worker ready")
    task_id = send_chunk(stack, job_id, chunk, "b")
    wait_for(log, lambda e: e["message"] == f"Task avsr.preprocess_chunk[{task_id}] received", "received")
    time.sleep(0.5)
    os.kill(worker.pid, signal.SIGTERM)  # what systemd, docker stop and a spot notice send
    assert worker.wait(90) == 0
    text = log.read_text()
    shutdown = text.find("Warm shutdown")
    done = text.find(f"Task avsr.preprocess_chunk[{task_id}] succeeded")
    assert 0 <= shutdown < done, "the worker did not finish the task in hand after SIGTERM"
    assert chunk_written(s3, job_id)
