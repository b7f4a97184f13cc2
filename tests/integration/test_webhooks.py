"""Webhook delivery (`tasks.webhooks.deliver`) against a real HTTP receiver and real Redis."""

from __future__ import annotations

import base64
import contextlib
import json
import socketserver
import threading
import time

import pytest
from standardwebhooks import Webhook

from tasks import jobs, webhooks
from tasks.settings import get_settings

pytestmark = pytest.mark.integration

@pytest.fixture
def scratch(scratch_redis):
    scratch_redis.setenv("AVSR_CALLBACK_SECRET", "s3cret")
    scratch_redis.setenv("AVSR_WEBHOOK_MAX_ATTEMPTS", "3")
    get_settings.cache_clear()
    return scratch_redis


def finished_job(url: str) -> dict:
    job = jobs.create({"callback_url": url})  # type: ignore[typeddict-item]
    done = jobs.update(job["job_id"], status=jobs.SUCCEEDED, result={"text": "hello"})
    webhooks.enqueue(done)  # publishes attempt 1 to the scratch DB's queue (no worker there)
    return done


def test_private_receivers_are_refused_at_delivery_and_the_job_shows_it(scratch, webhook_receiver):
    url, received = webhook_receiver
    job = finished_job(url)
    assert webhooks.deliver(job["job_id"], 1) is None
    assert received == []
    state = webhooks.state(job["job_id"])
    assert state["status"] == "failed" and "non-global" in state["last_error"]


@pytest.mark.parametrize("webhook_receiver", [10], indirect=True)
def test_attempts_back_off_and_end_failed(scratch, webhook_receiver):
    scratch.setenv("AVSR_CALLBACK_ALLOW_PRIVATE", "true")
    scratch.setenv("AVSR_WEBHOOK_BACKOFF_S", "2")
    get_settings.cache_clear()
    url, received = webhook_receiver
    job = finished_job(url)
    delays = [webhooks.deliver(job["job_id"], n) for n in (1, 2, 3)]
    assert 1.0 <= delays[0] <= 3.0 and 2.0 <= delays[1] <= 6.0 and delays[2] is None  # 3rd of 3: over
    assert webhooks.deliver(job["job_id"], 2) is None  # a re-delivered attempt posts nothing
    assert len(received) == 3 and webhooks.state(job["job_id"])["status"] == "failed"


def test_one_delivery_per_job_and_attempt(scratch, webhook_receiver):
    scratch.setenv("AVSR_CALLBACK_ALLOW_PRIVATE", "true")
    get_settings.cache_clear()
    url, received = webhook_receiver
    job = finished_job(url)
    webhooks.enqueue(job)  # a re-delivered finalize: no second delivery
    delivery_id = webhooks.state(job["job_id"])["delivery_id"]
    assert webhooks.deliver(job["job_id"], 1) is None
    assert webhooks.deliver(job["job_id"], 1) is None
    assert len(received) == 1
    headers, body = received[0]
    verified = Webhook("whsec_" + base64.b64encode(b"s3cret").decode()).verify(body, headers)
    assert verified["result"] == {"text": "hello"} and headers["webhook-id"] == delivery_id
    assert webhooks.state(job["job_id"]) | {"last_attempt_at": 0} == {
        "status": "delivered", "attempts": 1, "delivery_id": delivery_id, "last_status": 204, "last_attempt_at": 0}


def test_a_name_is_resolved_once_and_sent_as_the_host_header(scratch, webhook_receiver):
    url, received = webhook_receiver
    named = url.replace("127.0.0.1", "localhost")
    with pytest.raises(PermissionError):  # loopback, not allowed by default
        webhooks.post(named, b"{}", "msg_x", "s3cret", allow_private=False)
    assert webhooks.post(named, b"{}", "msg_x", "s3cret", allow_private=True) == 204
    headers = received[0][0]
    assert headers["Host"] == named.split("/")[2] and headers["webhook-id"] == "msg_x"


def test_a_cancelled_job_posts_its_webhook(scratch, webhook_receiver):
    from tasks import chain

    scratch.setenv("AVSR_CALLBACK_ALLOW_PRIVATE", "true")
    get_settings.cache_clear()
    url, received = webhook_receiver
    job = jobs.create({"callback_url": url})  # type: ignore[typeddict-item]
    assert chain.cancel(job["job_id"])["status"] == jobs.CANCELLED  # publishes attempt 1 (no worker there)
    chain.cancel(job["job_id"])  # cancelled twice: still one delivery
    state = webhooks.state(job["job_id"])
    assert state["status"] == "pending"
    assert webhooks.deliver(job["job_id"], 1) is None
    assert len(received) == 1 and webhooks.state(job["job_id"])["status"] == "delivered"
    body = json.loads(received[0][1])
    assert (body["type"], body["status"], body["job_id"]) == ("job.cancelled", "cancelled", job["job_id"])


class _Trickle(socketserver.BaseRequestHandler):
    """Reads the request, then answers one byte every 0.3 s (at most 10 s, or until the client hangs up)."""

    def handle(self) -> None:
        self.request.settimeout(5)
        with contextlib.suppress(OSError):
            data = b""
            while b"\r\n\r\n" not in data:
                data += self.request.recv(65536)
            answer = b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n"
            deadline = time.monotonic() + 10
            for i in range(len(answer)):
                if time.monotonic() > deadline:
                    return
                self.request.sendall(answer[i:i + 1])
                time.sleep(0.3)


def test_a_receiver_that_trickles_its_answer_is_cut_off(scratch, monkeypatch):
    scratch.setenv("AVSR_CALLBACK_ALLOW_PRIVATE", "true")
    get_settings.cache_clear()
    monkeypatch.setattr(webhooks, "ATTEMPT_S", 1.5)
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Trickle)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        job = finished_job(f"http://127.0.0.1:{server.server_address[1]}/hook")
        started = time.monotonic()
        delay = webhooks.deliver(job["job_id"], 1)
        assert time.monotonic() - started < 4  # each byte came within the read timeout: only the deadline ends it
        state = webhooks.state(job["job_id"])
        assert delay is not None and state["status"] == "pending" and "1.5 s" in state["last_error"]
    finally:
        server.shutdown()
