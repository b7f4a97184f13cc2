"""Rate limits on a second API process with small limits (same Redis as the stack): a burst over
AVSR_RATE_LIMIT per key, and failed authentications per address, answer 429 rate_limited + Retry-After."""

from __future__ import annotations

import pytest
import redis

from .conftest import PORT_BASE
from .extra_api import extra_api

pytestmark = pytest.mark.integration

MISSING_JOB = "/v1/jobs/" + "f" * 32


@pytest.fixture(autouse=True)
def fresh_counters(stack):
    r = redis.Redis.from_url(stack.config.redis_url)
    for key in r.scan_iter(match="LIMITS:LIMITER/avsr/*", count=1000):
        r.delete(key)


def assert_rate_limited(answer) -> None:
    assert answer.status_code == 429, answer.text
    assert answer.json()["error"]["code"] == "rate_limited"
    assert int(answer.headers["Retry-After"]) > 0


def test_a_burst_over_the_key_limit_is_429_with_retry_after(stack):
    env = {"AVSR_RATE_LIMIT": "10/minute", "AVSR_AUTH_FAIL_LIMIT": "1000/minute"}
    with extra_api(stack, PORT_BASE + 22, env, "api-limited") as api:
        statuses = [api.request("GET", MISSING_JOB).status_code for _ in range(8)]
        statuses.append(api.request("DELETE", MISSING_JOB).status_code)  # one counter across the routes
        statuses.append(api.request("POST", "/v1/uploads", json={}).status_code)  # uploads count too
        assert statuses == [404] * 9 + [400]
        assert_rate_limited(api.request("GET", MISSING_JOB))
        assert api.request("GET", "/health").status_code == 200  # operations routes are not limited


def test_failed_authentications_are_counted_per_address(stack):
    env = {"AVSR_RATE_LIMIT": "1000/minute", "AVSR_AUTH_FAIL_LIMIT": "5/minute"}
    with extra_api(stack, PORT_BASE + 23, env, "api-authfail") as api:
        guesses = [api.request("GET", MISSING_JOB, headers={"X-API-Key": f"guess-{i}"}) for i in range(5)]
        assert [g.status_code for g in guesses] == [401] * 5
        assert_rate_limited(api.request("GET", MISSING_JOB, headers={"X-API-Key": "guess-5"}))
        assert_rate_limited(api.request("GET", MISSING_JOB))  # the address is blocked, whatever key it shows


def test_failed_authentications_on_uploads_are_counted(stack):
    env = {"AVSR_RATE_LIMIT": "1000/minute", "AVSR_AUTH_FAIL_LIMIT": "3/minute"}
    with extra_api(stack, PORT_BASE + 25, env, "api-authfail-uploads") as api:
        guesses = [api.request("POST", "/v1/uploads", json={"size": 1}, headers={"X-API-Key": f"guess-{i}"})
                   for i in range(3)]
        assert [g.status_code for g in guesses] == [401] * 3
        assert_rate_limited(api.request("POST", "/v1/uploads", json={"size": 1}, headers={"X-API-Key": "guess-3"}))
