"""/predict does not starve the API: with 50 /predict calls waiting on jobs that cannot finish (the
stack's CPU worker stops consuming), /health and GET /v1/jobs/<id> still answer within a second, and
the callers past AVSR_PREDICT_MAX_WAITERS per API process get 503 predict_busy with Retry-After."""

from __future__ import annotations

import json
import threading
import time

import pytest
import redis
import requests

from .conftest import INPUT_BUCKET, OTHER_KEY, upload_frames
from .test_worker_faults import stack_worker_paused

pytestmark = pytest.mark.integration

PREFIX = "clips/predict-load/"
CALLERS = 50


def test_fifty_waiting_predicts_leave_health_and_polling_fast(stack, api, s3, jpeg_frames_small):

    upload_frames(s3, PREFIX, jpeg_frames_small)
    body = {"s3_bucket": INPUT_BUCKET, "s3_prefix": PREFIX}
    polled = api.submit(body)  # a job to poll
    answers: list[requests.Response] = []
    r = redis.Redis.from_url(stack.config.redis_url, decode_responses=True)
    from celery import Celery

    client = Celery(broker=stack.config.redis_url)
    client.conf.update(task_serializer="json", accept_content=["json"])
    with stack_worker_paused(client.control, "cpu1", "cpu"):
        def call() -> None:
            answers.append(api.request("POST", "/predict", json=body, timeout=150))

        threads = [threading.Thread(target=call) for _ in range(CALLERS)]
        for t in threads:
            t.start()
        time.sleep(3)  # every call has reached the API: some wait, the rest are refused
        other: list[requests.Response] = []  # another tenant still finds a slot: one tenant holds at most half
        threads.append(threading.Thread(target=lambda: other.append(requests.post(
            f"{api.base}/predict", json=body, headers={"X-API-Key": OTHER_KEY}, timeout=150))))
        threads[-1].start()
        time.sleep(1)
        timings = []
        for _ in range(10):
            for path in ("/health", f"/v1/jobs/{polled}"):
                started = time.monotonic()
                answer = api.request("GET", path, timeout=10)
                timings.append((path, time.monotonic() - started, answer.status_code))
            time.sleep(0.2)
        busy = [a for a in answers if a.status_code == 503]
        waiting = [json.loads(v) for k in r.scan_iter(match="avsr:job:*", count=1000)
                   if k.count(":") == 2 and (v := r.get(k))]
        waiting = [j for j in waiting if j["request"]["input"].get("prefix") == PREFIX and j["status"] == "queued"]
        for job in waiting:  # each tenant cancels its own (another tenant's key gets 404)
            key = {"X-API-Key": OTHER_KEY} if job["tenant"] == "other" else {}
            assert api.request("DELETE", f"/v1/jobs/{job['job_id']}", headers=key).status_code == 202
        for t in threads:
            t.join(60)
    print("slowest:", max(timings, key=lambda t: t[1]), f"; {len(busy)} refused, {len(waiting)} waited")
    assert all(status == 200 for _, _, status in timings), timings
    assert max(seconds for _, seconds, _ in timings) < 1.0, timings
    assert len(answers) == CALLERS
    assert busy and all(a.json()["error"]["code"] == "predict_busy" and int(a.headers["Retry-After"]) > 0
                        for a in busy)
    cancelled = [a for a in answers if a.status_code != 503]
    assert len(cancelled) <= 2 * 8 and all(a.json()["error"]["code"] == "job_cancelled" for a in cancelled)
    assert [a.json()["error"]["code"] for a in other] == ["job_cancelled"]  # it waited, not predict_busy
