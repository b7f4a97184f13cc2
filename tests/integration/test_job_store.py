"""Job records in a real Redis: transitions, terminal states, idempotency keys, counters."""

from __future__ import annotations

import threading

import pytest

from tasks import jobs

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("scratch_redis")]


def test_lifecycle_and_terminal_states_are_final():
    job = jobs.create({"input": {"type": "frames"}})
    assert job["status"] == jobs.QUEUED and jobs.get(job["job_id"])["request"] == {"input": {"type": "frames"}}
    jobs.update(job["job_id"], status=jobs.RUNNING, stage="preprocessing")
    jobs.update(job["job_id"], status=jobs.CANCELLED)
    late = jobs.update(job["job_id"], status=jobs.RUNNING, stage="inference")  # a re-delivered task
    assert late["status"] == jobs.CANCELLED and late["stage"] == "preprocessing"
    assert jobs.get(job["job_id"])["status"] == jobs.CANCELLED
    assert jobs.update("f" * 32, status=jobs.RUNNING) is None


def test_concurrent_updates_do_not_lose_writes():
    job_id = jobs.create({})["job_id"]

    def add(stage: str) -> None:
        for _ in range(20):
            jobs.add_timing(job_id, stage, 0.5)

    threads = [threading.Thread(target=add, args=(f"s{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert jobs.get(job_id)["timings"] == {f"s{i}": 10.0 for i in range(4)}


def test_idempotency_key_binds_once_and_detects_other_bodies():
    assert jobs.claim_idempotency_key("k1", {"a": 1}, "job-a") == ("job-a", True)
    assert jobs.claim_idempotency_key("k1", {"a": 1}, "job-b") == ("job-a", True)
    assert jobs.claim_idempotency_key("k1", {"a": 2}, "job-c") == ("job-a", False)


def test_once_and_counters():
    assert jobs.once("j", "webhook") is True
    assert jobs.once("j", "webhook") is False
    assert [jobs.increment("j", "chunks_done") for _ in range(3)] == [1, 2, 3]


def test_status_counters_feed_metrics():
    job_id = jobs.create({})["job_id"]
    jobs.update(job_id, status=jobs.RUNNING)
    jobs.update(job_id, status=jobs.RUNNING)  # no transition, no count
    jobs.update(job_id, status=jobs.SUCCEEDED)
    jobs.record_stage_time("infer", 1.5)
    stats = jobs.stats()
    assert stats["jobs_queued"] == 1 and stats["jobs_running"] == 1 and stats["jobs_succeeded"] == 1
    assert stats["stage_infer_seconds_sum"] == 1.5 and stats["stage_infer_seconds_count"] == 1
