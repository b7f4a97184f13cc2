"""One real stack for the integration tests: Redis (DB 15), SeaweedFS S3, gunicorn API, a CPU and
a GPU-queue Celery worker and Flower, each a separate process on test ports.

The model is the official-format fixture checkpoint (tests/fixtures/avhubert_reference). With
CI=true a service that cannot start fails the run; elsewhere the tests are skipped with the reason.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import shutil
import threading
import time
from pathlib import Path

import cv2
import pytest
import redis
import requests

from deploy.local.stack import Stack, StackConfig
from tasks.settings import get_settings
from tests.conftest import REFERENCE, ROOT, reference_face_frames

CHECKPOINT = REFERENCE / "checkpoints" / "finetune_s2s.pt"
INPUT_BUCKET = "avsr-test-inputs"
OUTPUT_BUCKET = "avsr-test-outputs"
API_KEY = "test-key-123"  # AVSR_API_KEYS: a tenant of its own, reading and writing the test buckets
OTHER_KEY = "other-tenant-key-456"  # AVSR_TENANTS "other": reads the input bucket, writes nowhere
MISSING_BUCKET = "avsr-test-missing"  # on the write list but never created
TENANTS = json.dumps({"other": {"keys": [OTHER_KEY], "read_buckets": [INPUT_BUCKET], "write_buckets": []}})
POISON_PREFIX = "clips/poison/"
# Test runs side by side (e.g. two checkouts) need their own ports and Redis DBs: AVSR_TEST_PORT_BASE
# moves every port of the stack, AVSR_TEST_REDIS_DB the stack's DB (the next two below it are scratch DBs).
PORT_BASE = int(os.environ.get("AVSR_TEST_PORT_BASE", "21000"))
REDIS_DB = int(os.environ.get("AVSR_TEST_REDIS_DB", "15"))
REDIS_URL = f"redis://127.0.0.1:6379/{REDIS_DB}"
SCRATCH_REDIS_URL = f"redis://127.0.0.1:6379/{REDIS_DB - 1}"  # store and webhook tests
ROLE_REDIS_URL = f"redis://127.0.0.1:6379/{REDIS_DB - 2}"  # the per-role image workers


WEBHOOK_SECRET = "webhook-secret"


def _unavailable(reason: str):
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"integration service unavailable in CI: {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture
def scratch_redis(monkeypatch):
    """The scratch DB, emptied, as the project's Redis (`AVSR_REDIS_URL`); yields `monkeypatch` for
    further settings (the settings cache is cleared before and after)."""
    try:
        redis.Redis.from_url(SCRATCH_REDIS_URL, socket_connect_timeout=2).flushdb()
    except redis.RedisError as exc:
        _unavailable(f"Redis at {SCRATCH_REDIS_URL}: {exc}")
    monkeypatch.setenv("AVSR_REDIS_URL", SCRATCH_REDIS_URL)
    get_settings.cache_clear()
    yield monkeypatch
    get_settings.cache_clear()


PORT_SPAN = 1333 + 2 + 10_000 + 1  # the highest port the stack uses: weed's filer gRPC, above PORT_BASE


def _check_port_base() -> None:
    """The stack's ports must stay out of the kernel's ephemeral range, where any outgoing connection
    may already hold one."""
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        return
    first, last = PORT_BASE, PORT_BASE + PORT_SPAN
    if first <= high and low <= last:
        pytest.exit(f"AVSR_TEST_PORT_BASE={first} puts the stack's ports ({first}-{last}) in the ephemeral port "
                    f"range {low}-{high}; choose a base below {low - PORT_SPAN}", returncode=4)


@pytest.fixture(scope="session")
def stack():
    """The running stack (config in `stack.config`); stopped at the end of the session."""
    _check_port_base()
    state_dir = ROOT / "var" / "test-stack"
    shutil.rmtree(state_dir, ignore_errors=True)
    with contextlib.suppress(redis.RedisError):  # Stack starts a private redis-server if none answers
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).flushdb()
    config = StackConfig(
        state_dir=state_dir, redis_url=REDIS_URL, s3_port=PORT_BASE + 333, weed_base_port=PORT_BASE + 1333,
        api_port=PORT_BASE, flower_port=PORT_BASE + 555, api_key=API_KEY, tenants_json=TENANTS,
        flower_auth="flower:flower-pass",
        work_bucket="avsr-test-work", buckets=(INPUT_BUCKET, OUTPUT_BUCKET, "avsr-test-forbidden"),
        model_path=str(CHECKPOINT),
        extra_env={"AVSR_ALLOWED_BUCKETS": f"{INPUT_BUCKET},{OUTPUT_BUCKET}",
                   "AVSR_OUTPUT_BUCKETS": f"{OUTPUT_BUCKET},{MISSING_BUCKET}",
                   "AVSR_CALLBACK_SECRET": WEBHOOK_SECRET,
                   "AVSR_WEBHOOK_BACKOFF_S": "0.2",  # retries within seconds
                   "AVSR_CALLBACK_ALLOW_PRIVATE": "1",  # the test's webhook receiver is on 127.0.0.1
                   "AVSR_URL_ALLOW_PRIVATE": "1",  # so is the test's URL-input server
                   "AVSR_PREDICT_TIMEOUT_S": "120",
                   "AVSR_LOG_JSON": "1", "AVSR_MAX_FRAMES": "3000",
                   # small chunks and segments so a 10 s clip exercises the fan-out and batching
                   "AVSR_CHUNK_FRAMES": "100", "AVSR_MAX_SEGMENT_S": "4",
                   # test only: a worker process exits on this input (tests/integration/test_worker_faults.py)
                   "AVSR_TEST_POISON_KEY": POISON_PREFIX,
                   # the suite is one client on 127.0.0.1; test_rate_limits.py runs its own small limits
                   "AVSR_RATE_LIMIT": "100000/minute", "AVSR_AUTH_FAIL_LIMIT": "100000/minute"},
    )
    stack = Stack(config)
    try:
        stack.start()
    except (RuntimeError, TimeoutError, OSError) as exc:
        _unavailable(f"could not start the local stack: {exc}")
    yield stack
    stack.stop()


@pytest.fixture(scope="session")
def s3(stack):
    return stack.s3_client()


class Api:
    """A tiny authenticated client for the running API."""

    def __init__(self, base: str, key: str):
        self.base, self.key = base, key

    def request(self, method: str, path: str, *, auth: bool = True, **kwargs) -> requests.Response:
        headers = kwargs.pop("headers", {})
        if auth:
            headers.setdefault("X-API-Key", self.key)
        return requests.request(method, self.base + path, headers=headers, timeout=kwargs.pop("timeout", 30),
                                **kwargs)

    def submit(self, body: dict, **kwargs) -> str:
        response = self.request("POST", "/v1/jobs", json=body, **kwargs)
        assert response.status_code in (200, 202), response.text
        return response.json()["job_id"]

    def wait(self, job_id: str, timeout: float = 180) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.request("GET", f"/v1/jobs/{job_id}").json()
            if job["status"] in ("succeeded", "failed", "cancelled"):
                return job
            time.sleep(0.3)
        raise AssertionError(f"job {job_id} did not finish in {timeout}s: {job}")


@pytest.fixture(scope="session")
def api(stack) -> Api:
    return Api(stack.config.api_url, API_KEY)


@pytest.fixture(scope="session")
def other_api(stack) -> Api:
    """The same API as the second tenant."""
    return Api(stack.config.api_url, OTHER_KEY)


class _Receiver(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        self.server.received.append((dict(self.headers), self.rfile.read(int(self.headers["Content-Length"]))))
        failing = len(self.server.received) <= self.server.fail_first
        self.send_response(500 if failing else 204)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def webhook_receiver(request):
    """A real HTTP server on 127.0.0.1 recording POSTs: yields (url, [(headers, body), ...]).
    It answers 204, or 500 to the first N POSTs with
    `@pytest.mark.parametrize("webhook_receiver", [N], indirect=True)`."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    server.received, server.fail_first = [], int(getattr(request, "param", 0))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hook", server.received
    server.shutdown()


def upload_frames(s3, prefix: str, encoded: list[bytes], ext: str = "jpg") -> str:
    """Upload frames as `<prefix>frame_<i>.<ext>` (unpadded numbers: natural order matters)."""
    for i, body in enumerate(encoded):
        s3.put_object(Bucket=INPUT_BUCKET, Key=f"{prefix}frame_{i}.{ext}", Body=body)
    return prefix


@pytest.fixture(scope="session")
def jpeg_frames() -> list[bytes]:
    return [cv2.imencode(".jpg", f, [cv2.IMWRITE_JPEG_QUALITY, 92])[1].tobytes() for f in reference_face_frames()]


@pytest.fixture(scope="session")
def jpeg_frames_small(jpeg_frames) -> list[bytes]:
    return jpeg_frames[1:16]


@pytest.fixture(scope="session")
def frames_job(api, s3, jpeg_frames) -> dict:
    """A finished job over the reference clip uploaded as 50 JPEG frames (beam 3)."""
    upload_frames(s3, "clips/face50/", jpeg_frames)
    job_id = api.submit({"s3_bucket": INPUT_BUCKET, "s3_prefix": "clips/face50/", "beam_size": 3})
    return api.wait(job_id)


@pytest.fixture(scope="session")
def frames_job_done(frames_job) -> dict:
    assert frames_job["status"] == "succeeded", frames_job
    return frames_job
