"""A stage that ends with a retry keeps its registry entry and a lease marked as waiting for the retry:
the retry takes it at once, and if the worker holding the retry dies the lease lapses and the reaper
re-publishes the task (instead of the retry waiting for Redis' visibility timeout). Real Redis (the
scratch DB); the reaper's re-publication is captured, not sent."""

from __future__ import annotations

import time

import pytest
from celery.exceptions import Retry

from tasks import jobs, leases
from tasks.celery_app import app
from tasks.errors import JobError
from tasks.settings import get_settings
from tasks.stage_task import stage_task

pytestmark = pytest.mark.integration

calls: list[str] = []


@stage_task("avsr.test_retry_lease", "preprocessing")
def _flaky(job: jobs.Job) -> str:
    calls.append(job["job_id"])
    if len(calls) == 1:
        raise JobError("transient_error", "S3 answered 503", retryable=True)
    return "done"


@pytest.fixture
def short_lease(scratch_redis):
    scratch_redis.setenv("AVSR_LEASE_TTL_S", "2")
    get_settings.cache_clear()
    calls.clear()
    return scratch_redis


def test_a_retry_whose_worker_died_is_re_published_and_a_retry_takes_its_lease(short_lease):
    job_id = jobs.create({"input": {"type": "frames", "bucket": "clips", "prefix": "p/"}})["job_id"]
    with pytest.MonkeyPatch.context() as patch:  # the retry is published (here: nowhere), its worker dies
        patch.setattr(_flaky, "retry", lambda **kwargs: Retry(f"retry in {kwargs['countdown']} s"))
        assert _flaky.apply(args=(job_id,), task_id="t-retry").state == "RETRY"
    r = jobs.connection()
    assert r.hexists(leases.REGISTRY, "t-retry")
    assert 2 < r.ttl("avsr:lease:t-retry") <= 2 + 2  # countdown 2 s + lease TTL 2 s

    deadline = time.monotonic() + 10
    while r.exists("avsr:lease:t-retry") and time.monotonic() < deadline:
        time.sleep(0.2)
    published = []
    short_lease.setattr(app, "signature", lambda sig: type("S", (), {"apply_async": lambda _: published.append(sig)})())
    assert leases.reap() == 1
    assert [(s["task"], s["options"]["task_id"]) for s in published] == [("avsr.test_retry_lease", "t-retry")]


def test_the_retry_runs_at_once_on_the_lease_left_for_it(short_lease):
    job_id = jobs.create({"input": {"type": "frames", "bucket": "clips", "prefix": "p/"}})["job_id"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_flaky, "retry", lambda **kwargs: Retry("retry"))
        assert _flaky.apply(args=(job_id,), task_id="t-retry-2").state == "RETRY"
    started = time.monotonic()
    outcome = _flaky.apply(args=(job_id,), task_id="t-retry-2")  # the retry's delivery, same task id
    assert outcome.state == "SUCCESS" and outcome.result == "done"
    assert time.monotonic() - started < 1.5  # not a duplicate waiting out a live holder (2 x TTL)
    r = jobs.connection()
    assert not r.exists("avsr:lease:t-retry-2") and not r.hexists(leases.REGISTRY, "t-retry-2")
