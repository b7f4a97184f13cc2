"""A dead worker's work resumes: `kill -9` of the GPU worker mid-inference and of a CPU worker (main
process and pool) mid-chunk, each with a replacement started, and the job finishes within 2 minutes
(stage leases + the reaper, tasks/leases.py; not Redis' visibility timeout). A poison input that kills
its worker on every delivery fails the job `worker_lost` after AVSR_MAX_DELIVERIES.

The stack's own worker of the queue under test stops consuming for the test (Celery `cancel_consumer`),
so the task runs on a worker of the test's own, which it kills; the consumer is restored afterwards.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import time

import pytest
import redis
import requests
from celery import Celery

from deploy.local.sample_media import write_face_video

from .conftest import INPUT_BUCKET, POISON_PREFIX, upload_frames
from .test_worker_shutdown import wait_for

pytestmark = pytest.mark.integration

RECOVERY_BOUND_S = 120


@pytest.fixture(scope="module")
def long_video(s3, tmp_path_factory) -> dict:
    clip = tmp_path_factory.mktemp("faults") / "faults.mp4"
    write_face_video(clip, seconds=20.0, with_audio=False, seed=11)
    s3.upload_file(str(clip), INPUT_BUCKET, "videos/faults.mp4")
    return {"s3_bucket": INPUT_BUCKET, "s3_key": "videos/faults.mp4", "modality": "video", "beam_size": 8}


@pytest.fixture(scope="module")
def control(stack):
    client = Celery(broker=stack.config.redis_url, backend=stack.config.redis_url)
    client.conf.update(task_serializer="json", accept_content=["json"], result_accept_content=["json"])
    return client.control


@contextlib.contextmanager
def stack_worker_paused(control, name: str, queue: str):
    """The stack's worker `name` stops taking `queue`'s tasks for the block."""
    destination = [f"{name}@{socket.gethostname()}"]
    assert control.cancel_consumer(queue, destination=destination, reply=True, timeout=10)
    try:
        yield
    finally:
        control.add_consumer(queue, destination=destination, reply=True, timeout=10)


def start_ready(stack, name: str, queue: str, env: dict[str, str] | None = None):
    worker = stack.start_worker(name, queue, env=env)
    wait_for(stack.logs / f"{name}.log", lambda e: e["message"].endswith("ready."), f"{name} ready", 180)
    return worker


def wait_for_lease(r: redis.Redis, pattern: str, timeout: float = 180) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for key in r.scan_iter(match=pattern, count=1000):
            return key
        time.sleep(0.02)
    raise AssertionError(f"no lease {pattern} within {timeout}s")


def kill_group(worker) -> None:
    """SIGKILL the worker and its pool children: what the OOM killer or a lost spot instance does."""
    os.killpg(worker.pid, signal.SIGKILL)
    worker.wait(30)


def kill_mid_stage_and_recover(stack, api, body: dict, queue: str, stage_pattern: str) -> float:
    r = redis.Redis.from_url(stack.config.redis_url, decode_responses=True)
    first = start_ready(stack, f"{queue}-doomed", queue)
    replacement = None
    try:
        job_id = api.submit(body)
        wait_for_lease(r, f"avsr:lease:{job_id}.{stage_pattern}")
        kill_group(first)
        killed = time.monotonic()
        job = api.request("GET", f"/v1/jobs/{job_id}").json()
        # The stage's lease existed, so its task had started in the killed process; the job must not be done.
        assert job["status"] == "running", f"killed too late: {job}"
        replacement = start_ready(stack, f"{queue}-replacement", queue)
        job = api.wait(job_id, timeout=RECOVERY_BOUND_S)
        recovered = time.monotonic() - killed
        assert job["status"] == "succeeded", job
        assert recovered < RECOVERY_BOUND_S
        return recovered
    finally:
        for worker in (first, replacement):
            if worker is not None and worker.poll() is None:
                worker.terminate()
                worker.wait(60)


def test_gpu_worker_killed_mid_inference_the_job_finishes(stack, api, control, long_video):
    with stack_worker_paused(control, "gpu", "gpu"):
        recovered = kill_mid_stage_and_recover(stack, api, long_video, "gpu", "infer")
    print(f"gpu worker killed mid-inference: job finished {recovered:.1f}s after the kill")


def test_cpu_worker_killed_mid_chunk_the_job_finishes(stack, api, control, long_video):
    with stack_worker_paused(control, "cpu1", "cpu"):
        recovered = kill_mid_stage_and_recover(stack, api, long_video, "cpu", "chunk.*")
    print(f"cpu worker killed mid-chunk: job finished {recovered:.1f}s after the kill")


def test_poison_input_fails_worker_lost_after_max_deliveries(stack, api, s3, jpeg_frames_small):
    upload_frames(s3, POISON_PREFIX, jpeg_frames_small)
    job_id = api.submit({"s3_bucket": INPUT_BUCKET, "s3_prefix": POISON_PREFIX})
    job = api.wait(job_id, timeout=120)
    assert job["status"] == "failed" and job["error"]["code"] == "worker_lost", job
    r = redis.Redis.from_url(stack.config.redis_url, decode_responses=True)
    task_id = f"{job_id}.prepare"
    assert int(r.get(f"avsr:deliveries:{task_id}")) == 3  # three deliveries died; the fourth failed the job
    time.sleep(3)
    assert not r.exists(f"avsr:lease:{task_id}") and not r.hexists("avsr:leases", task_id)
    assert int(r.get(f"avsr:deliveries:{task_id}")) == 3, "the poison task ran again"
    metrics = requests.get(stack.config.api_url + "/metrics", timeout=10).text
    assert any(line.startswith("avsr_worker_lost_total ") and float(line.split()[1]) >= 1
               for line in metrics.splitlines()), metrics
    assert "lost its worker 3 times" in (stack.logs / "cpu1.log").read_text()
