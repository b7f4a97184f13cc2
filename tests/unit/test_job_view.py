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
