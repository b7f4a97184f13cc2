"""Redis restart: a private redis-server with AOF (as compose and EC2 run it) crashes (SIGKILL) with
jobs queued; the API answers 503 while it is down; after the restart the job records and the queue
are back and the jobs finish once workers run: none lost."""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import subprocess
import time

import pytest
import redis

from deploy.local.stack import Stack

from .conftest import INPUT_BUCKET, PORT_BASE, upload_frames
from .extra_api import extra_api
from .test_worker_shutdown import wait_for

pytestmark = pytest.mark.integration

REDIS_PORT = PORT_BASE + 40


def start_redis(data, log) -> subprocess.Popen:
    server = shutil.which("redis-server")
    if server is None:
        pytest.skip("redis-server is not installed")
    proc = subprocess.Popen([server, "--port", str(REDIS_PORT), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "yes", "--appendfsync", "everysec", "--dir", str(data)],
                            stdout=log, stderr=subprocess.STDOUT)
    client = redis.Redis(port=REDIS_PORT, socket_connect_timeout=1)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        with contextlib.suppress(redis.RedisError):
            if client.ping():
                return proc
        time.sleep(0.1)
    raise RuntimeError("private redis-server did not start")


def test_jobs_survive_a_redis_crash_and_restart(stack, s3, jpeg_frames_small, tmp_path):
    upload_frames(s3, "clips/redis-restart/", jpeg_frames_small)
    body = {"s3_bucket": INPUT_BUCKET, "s3_prefix": "clips/redis-restart/", "beam_size": 1}
    url = f"redis://127.0.0.1:{REDIS_PORT}/0"
    private = Stack(dataclasses.replace(stack.config, redis_url=url, state_dir=tmp_path / "stack"))
    log = open(tmp_path / "redis.log", "ab")  # noqa: SIM115 - closed below
    server = start_redis(tmp_path, log)
    try:
        with extra_api(stack, PORT_BASE + 24, {"AVSR_REDIS_URL": url}, "api-redis-restart") as api:
            ids = [api.submit(body) for _ in range(3)]  # no worker yet: they wait in the queue
            time.sleep(1.5)  # appendfsync everysec
            server.kill()
            server.wait(10)
            answer = api.request("POST", "/v1/jobs", json=body)
            assert answer.status_code == 503 and answer.json()["error"]["code"] == "broker_unavailable"
            assert api.request("GET", "/health").status_code == 503
            server = start_redis(tmp_path, log)
            assert [api.request("GET", f"/v1/jobs/{i}").json()["status"] for i in ids] == ["queued"] * 3
            private.start_worker("cpu-restart", "cpu")
            private.start_worker("gpu-restart", "gpu")
            wait_for(private.logs / "gpu-restart.log", lambda e: e["message"].endswith("ready."), "gpu ready", 180)
            assert [api.wait(i, timeout=180)["status"] for i in ids] == ["succeeded"] * 3
    finally:
        private.stop()
        server.kill()
        server.wait(10)
        log.close()
