"""The public job view says which worker a job waits for when no live worker serves its stage's queue."""

from __future__ import annotations

import pytest

import api.jobs as api_jobs
from api import create_app
from tasks.settings import Settings


def record(status: str, stage: str) -> dict:
    request = {"input": {"type": "video", "bucket": "b", "key": "k"}, "modality": "auto", "beam_size": 5,
               "output": None, "callback_url": None}
    return {"job_id": "a" * 32, "status": status, "stage": stage, "progress": 0.5, "created_at": 1.0,
            "request": request}


@pytest.mark.parametrize(("live", "status", "stage", "waiting_for"), [
    ({"cpu"}, "running", "inference", "gpu worker"),
    ({"gpu"}, "queued", "queued", "cpu worker"),
    ({"gpu"}, "running", "preprocessing", "cpu worker"),
    ({"cpu", "gpu"}, "running", "inference", None),
    (set(), "succeeded", "done", None),
])
def test_waiting_for(monkeypatch, live, status, stage, waiting_for):
    monkeypatch.setattr(api_jobs, "_live_roles", lambda: frozenset(live))
    with create_app(Settings()).test_request_context():
        job = record(status, stage) | ({"result": {}} if status == "succeeded" else {})
        assert api_jobs.job_view(job).get("waiting_for") == waiting_for


def test_partial_segments_until_the_job_succeeds(monkeypatch):
    from gpu_worker.tasks import partial_segments

    monkeypatch.setattr(api_jobs, "_live_roles", lambda: frozenset({"cpu", "gpu"}))
    spans = [{"id": 0, "start_frame": 0, "end_frame": 50, "track": 2, "stream": 1},
             {"id": 1, "start_frame": 50, "end_frame": 90}, {"id": 2, "start_frame": 90, "end_frame": 100}]
    decoded = {"text": "hello", "confidence": 0.812345, "score": -0.2, "num_tokens": 2, "words": [],
               "end_logprob": -0.1}
    # segments 0 and 2 are decoded, 1 is not: only the first is shown (the prefix: text in order)
    partial = partial_segments(spans, [decoded, None, {**decoded, "id": 2}])
    assert partial == [{"id": 0, "start": 0.0, "end": 2.0, "text": "hello", "confidence": 0.8123, "track": 2}]
    with create_app(Settings()).test_request_context():
        assert api_jobs.job_view(record("queued", "queued"))["partial_segments"] == []
        running = record("running", "inference") | {"partial_segments": partial}
        assert api_jobs.job_view(running)["partial_segments"] == partial
        done = record("succeeded", "done") | {"partial_segments": partial, "result": {}}
        assert "partial_segments" not in api_jobs.job_view(done)
