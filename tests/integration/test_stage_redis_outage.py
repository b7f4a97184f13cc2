"""A stage whose Redis (job store and broker) stops answering is neither failed nor lost: with its lease
it is left to the reaper (the lease lapses, the registry entry stays); before it, its message is
requeued. Real Redis (the scratch DB); the reaper's re-publication is captured, not sent."""

from __future__ import annotations

import time

import pytest
import redis
from celery.exceptions import Reject

from tasks import jobs, leases
from tasks.celery_app import app
from tasks.settings import get_settings
from tasks.stage_task import stage_task

pytestmark = pytest.mark.integration

DOWN = redis.exceptions.ConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")


@stage_task("avsr.test_redis_gone", "preprocessing")
def _interrupted(job: jobs.Job) -> None:
    raise DOWN


@pytest.fixture
def short_lease(scratch_redis):
    scratch_redis.setenv("AVSR_LEASE_TTL_S", "2")
    get_settings.cache_clear()
    return scratch_redis


def _job() -> str:
    return jobs.create({"input": {"type": "frames", "bucket": "clips", "prefix": "p/"}})["job_id"]


def test_a_stage_interrupted_by_a_redis_outage_runs_again_through_the_reaper(short_lease):
    job_id = _job()
    outcome = _interrupted.apply(args=(job_id,), task_id="t-redis-gone")
    assert outcome.state == "IGNORED"
    record = jobs.get(job_id)
    assert (record["status"], record.get("error")) == (jobs.RUNNING, None)  # not failed internal_error
    r = jobs.connection()
    assert r.hexists(leases.REGISTRY, "t-redis-gone")  # what the reaper re-publishes
    deadline = time.monotonic() + 10
    while r.exists("avsr:lease:t-redis-gone") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not r.exists("avsr:lease:t-redis-gone")  # no longer renewed: it lapsed

    published = []
    short_lease.setattr(app, "signature", lambda sig: type("S", (), {"apply_async": lambda _: published.append(sig)})())
    assert leases.reap() == 1
    assert [(s["task"], s["options"]["task_id"], list(s["args"])) for s in published] == [
        ("avsr.test_redis_gone", "t-redis-gone", [job_id])]


def test_before_its_lease_a_stage_interrupted_by_a_redis_outage_is_requeued(short_lease):
    job_id = _job()

    def unreachable(_job_id: str) -> None:
        raise DOWN

    short_lease.setattr(jobs, "get", unreachable)
    outcome = _interrupted.apply(args=(job_id,), task_id="t-redis-gone-early")
    assert outcome.state == "REJECTED" and isinstance(outcome.result, Reject) and outcome.result.requeue
    short_lease.undo()
    assert jobs.get(job_id)["status"] == jobs.QUEUED
