"""`prepare` publishes a job's chord once; a publication cut short (the worker died, Redis went away)
is published again whole by the next delivery, under chunk task ids of its own. Real Redis (the
scratch DB); what would be published is captured, not sent."""

from __future__ import annotations

import pytest
import redis
from celery import canvas

from tasks import chain, jobs

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("scratch_redis")]

CHUNKS = [{"index": 0, "start": 0, "end": 800}, {"index": 1, "start": 800, "end": 1300}]


@pytest.fixture
def published(monkeypatch):
    """The chords `chain.launch` publishes; the first publication fails part-way when `cut` is set."""
    sent: list[canvas._chord] = []
    cut = {"first": False}

    def apply_async(self: canvas._chord, *args: object, **kwargs: object) -> None:
        if cut.pop("first", False):
            raise redis.exceptions.ConnectionError("Connection closed by server.")
        sent.append(self)

    monkeypatch.setattr(canvas._chord, "apply_async", apply_async)
    return sent, cut


def _chunk_ids(published: canvas._chord) -> list[str]:
    return [sig.options["task_id"] for sig in published.tasks]


def _later_ids(published: canvas._chord) -> list[str]:
    """The chord's body: assemble | infer | finalize."""
    return [sig.options["task_id"] for sig in published.body.tasks]


def test_the_chord_is_published_once_per_job(published):
    sent, _ = published
    job_id = jobs.create({})["job_id"]
    assert chain.launch(job_id, CHUNKS) is True
    assert chain.launch(job_id, CHUNKS) is False  # a re-delivered prepare
    assert len(sent) == 1
    assert _chunk_ids(sent[0]) == [f"{job_id}.chunk.0", f"{job_id}.chunk.1"]
    assert _later_ids(sent[0]) == [f"{job_id}.assemble", f"{job_id}.infer", f"{job_id}.finalize"]


def test_a_publication_cut_short_is_published_again_under_new_chunk_ids(published):
    sent, cut = published
    cut["first"] = True
    job_id = jobs.create({})["job_id"]
    with pytest.raises(redis.exceptions.ConnectionError):
        chain.launch(job_id, CHUNKS)
    assert sent == []
    assert chain.launch(job_id, CHUNKS) is True  # the next delivery of prepare
    assert chain.launch(job_id, CHUNKS) is False
    assert len(sent) == 1
    # chunks of a partial first chord cannot be taken for this one's (a done task id is skipped)
    assert _chunk_ids(sent[0]) == [f"{job_id}.chunk.0.r1", f"{job_id}.chunk.1.r1"]
    # one assemble, infer, finalize whichever chord completes first (the other's are duplicates)
    assert _later_ids(sent[0]) == [f"{job_id}.assemble", f"{job_id}.infer", f"{job_id}.finalize"]


def test_cancel_revokes_the_chunks_of_every_publication(published, monkeypatch):
    _, cut = published
    cut["first"] = True
    job_id = jobs.create({})["job_id"]
    with pytest.raises(redis.exceptions.ConnectionError):
        chain.launch(job_id, CHUNKS)
    chain.launch(job_id, CHUNKS)
    jobs.update(job_id, status=jobs.RUNNING, chunks_total=len(CHUNKS))
    revoked: list[str] = []
    monkeypatch.setattr(chain.app.control, "revoke", revoked.extend)
    monkeypatch.setattr("tasks.webhooks.enqueue", lambda job: None)
    assert chain.cancel(job_id)["status"] == jobs.CANCELLED
    assert {f"{job_id}.chunk.{i}{r}" for i in (0, 1) for r in ("", ".r1")} <= set(revoked)
