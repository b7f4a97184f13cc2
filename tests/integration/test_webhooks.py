"""Webhooks against a real HTTP receiver and real Redis: sent once, signed, private targets refused."""

from __future__ import annotations

import hashlib
import hmac
import json

import pytest
import redis

from tasks import jobs, webhooks
from tasks.settings import get_settings

from .conftest import SCRATCH_REDIS_URL, _unavailable

pytestmark = pytest.mark.integration

URL = SCRATCH_REDIS_URL


@pytest.fixture
def receiver(monkeypatch, webhook_receiver):
    try:
        redis.Redis.from_url(URL, socket_connect_timeout=2).flushdb()
    except redis.RedisError as exc:
        _unavailable(f"Redis at {URL}: {exc}")
    monkeypatch.setenv("AVSR_REDIS_URL", URL)
    monkeypatch.setenv("AVSR_CALLBACK_SECRET", "s3cret")
    get_settings.cache_clear()
    yield webhook_receiver
    get_settings.cache_clear()


def finished_job(url: str) -> dict:
    job = jobs.create({"callback_url": url})
    return jobs.update(job["job_id"], status=jobs.SUCCEEDED, result={"text": "hello"})


def test_private_receivers_are_refused_by_default(receiver):
    url, received = receiver
    webhooks.notify(finished_job(url))
    assert received == []


def test_allowed_receiver_gets_one_signed_post(receiver, monkeypatch):
    monkeypatch.setenv("AVSR_CALLBACK_ALLOW_PRIVATE", "true")
    get_settings.cache_clear()
    url, received = receiver
    job = finished_job(url)
    webhooks.notify(job)
    webhooks.notify(job)  # a re-delivered finalize: no second POST
    assert len(received) == 1
    headers, body = received[0]
    assert json.loads(body)["result"] == {"text": "hello"}
    digest = hmac.new(b"s3cret", headers["X-AVSR-Timestamp"].encode() + b"." + body, hashlib.sha256).hexdigest()
    assert headers["X-AVSR-Signature"] == f"sha256={digest}"
