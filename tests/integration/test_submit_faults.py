"""Atomic submit: one job per Idempotency-Key under concurrency, and a broker cut answers 503 fast
and leaves no job behind (a real TCP proxy between a second API process and Redis)."""

from __future__ import annotations

import re
import threading
import time
from urllib.parse import urlparse

import pytest
import redis
import requests

from .conftest import INPUT_BUCKET, PORT_BASE, upload_frames
from .extra_api import extra_api
from .tcp_proxy import TcpProxy

pytestmark = pytest.mark.integration

JOB_KEY = re.compile(r"^avsr:job:[0-9a-f]{32}$")


def job_records(r: redis.Redis) -> set[str]:
    return {k for k in r.scan_iter(match="avsr:job:*", count=1000) if JOB_KEY.match(k)}


@pytest.fixture(scope="module")
def frames_body(s3, jpeg_frames_small) -> dict:
    upload_frames(s3, "clips/submit-faults/", jpeg_frames_small)
    return {"s3_bucket": INPUT_BUCKET, "s3_prefix": "clips/submit-faults/", "beam_size": 1}


def test_concurrent_posts_with_one_key_make_one_job(api, frames_body):
    barrier = threading.Barrier(16)
    answers: list[requests.Response] = []

    def post() -> None:
        barrier.wait()
        answers.append(api.request("POST", "/v1/jobs", json=frames_body, headers={"Idempotency-Key": "race-1"}))

    threads = [threading.Thread(target=post) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(a.status_code for a in answers) == [200] * 15 + [202], [a.text for a in answers]
    assert len({a.json()["job_id"] for a in answers}) == 1
    assert api.wait(answers[0].json()["job_id"])["status"] == "succeeded"


@pytest.fixture
def proxied_api(stack):
    """A second API process whose Redis connection runs through a `TcpProxy`."""
    url = urlparse(stack.config.redis_url)
    proxy = TcpProxy((url.hostname, url.port or 6379))
    env = {"AVSR_REDIS_URL": f"redis://127.0.0.1:{proxy.port}{url.path}"}
    try:
        with extra_api(stack, PORT_BASE + 21, env, "api-proxied") as proxied:
            yield proxied, proxy
    finally:
        proxy.close()


@pytest.fixture
def broker_fault(stack, proxied_api):
    """The proxied API with its connections open, a Redis client and the job records before the fault."""
    proxied, proxy = proxied_api
    r = redis.Redis.from_url(stack.config.redis_url, decode_responses=True)
    assert proxied.request("GET", "/health").status_code == 200  # connections through the proxy are open
    return proxied, proxy, r, job_records(r)


def test_broker_cut_answers_503_fast_leaves_no_job_and_the_retry_runs(api, broker_fault, frames_body):
    proxied, proxy, r, before = broker_fault
    proxy.cut()
    headers = {"Idempotency-Key": "cut-1"}
    for _ in range(2):  # the pooled connections die on the first try, new ones on the second
        started = time.monotonic()
        answer = proxied.request("POST", "/v1/jobs", json=frames_body, headers=headers)
        elapsed = time.monotonic() - started
        assert answer.status_code == 503, answer.text
        assert answer.json()["error"]["code"] == "broker_unavailable"
        assert elapsed < 5, f"503 took {elapsed:.1f}s"
    assert job_records(r) == before, "a failed submit left a job record behind"

    proxy.restore()
    retried = proxied.request("POST", "/v1/jobs", json=frames_body, headers=headers)
    assert retried.status_code == 202, retried.text
    job_id = retried.json()["job_id"]
    assert job_records(r) == before | {f"avsr:job:{job_id}"}
    again = proxied.request("POST", "/v1/jobs", json=frames_body, headers=headers)
    assert (again.status_code, again.json()["job_id"]) == (200, job_id)
    assert api.wait(job_id)["status"] == "succeeded"


def test_a_hung_broker_answers_503_in_seconds_and_the_retry_runs(api, broker_fault, frames_body):
    # Redis stopped (SIGSTOP) or partitioned keeps its connections open and answers nothing: without
    # socket timeouts a submit waited for the whole outage and held an API thread for as long.
    proxied, proxy, r, before = broker_fault
    proxy.freeze()
    try:
        answer = proxied.request("POST", "/v1/jobs", json=frames_body, timeout=60)
        assert (answer.status_code, answer.json()["error"]["code"]) == (503, "broker_unavailable"), answer.text
        polled = proxied.request("GET", "/v1/jobs/" + "0" * 32, timeout=60)
        assert (polled.status_code, polled.json()["error"]["code"]) == (503, "broker_unavailable"), polled.text
    finally:
        proxy.restore()
    assert job_records(r) == before, "a failed submit left a job record behind"
    retried = proxied.request("POST", "/v1/jobs", json=frames_body)
    assert retried.status_code == 202, retried.text
    assert api.wait(retried.json()["job_id"])["status"] == "succeeded"


def test_a_dead_submissions_claim_is_taken_over(stack, api, frames_body, monkeypatch):
    """An API process that died between claiming a key and storing its job leaves a bare claim:
    the next request with that key waits for it to lapse and creates the job."""
    from api.validation import parse_job_request
    from tasks import jobs
    from tasks.settings import get_settings

    monkeypatch.setenv("AVSR_REDIS_URL", stack.config.redis_url)
    get_settings.cache_clear()
    try:
        request = parse_job_request(frames_body, get_settings())
        assert jobs.claim_idempotency_key("dead-1", request, "0" * 32) == ("0" * 32, True)
        answer = api.request("POST", "/v1/jobs", json=frames_body, headers={"Idempotency-Key": "dead-1"})
        assert answer.status_code == 202, answer.text
        assert answer.json()["job_id"] != "0" * 32
        assert api.wait(answer.json()["job_id"])["status"] == "succeeded"
    finally:
        get_settings.cache_clear()
