"""The HTTP surface of the running API, Flower and the webhook, over real sockets."""

from __future__ import annotations

import base64
import time

import pytest
import requests
from standardwebhooks import Webhook

from api import create_app
from tasks.settings import Settings

from .conftest import INPUT_BUCKET, WEBHOOK_SECRET, upload_frames

pytestmark = pytest.mark.integration


def test_auth_is_required_and_both_headers_work(api):
    body = {"s3_bucket": INPUT_BUCKET, "s3_prefix": "x/"}
    missing = api.request("POST", "/v1/jobs", json=body, auth=False)
    assert missing.status_code == 401 and missing.json()["error"]["code"] == "unauthorized"
    wrong = api.request("GET", "/v1/jobs/" + "0" * 32, headers={"X-API-Key": "nope"})
    assert wrong.status_code == 401
    bearer = api.request("GET", "/v1/jobs/" + "0" * 32, auth=False, headers={"Authorization": f"Bearer {api.key}"})
    assert bearer.status_code == 404 and bearer.json()["error"]["code"] == "job_not_found"


@pytest.mark.parametrize(("kwargs", "status", "code"), [
    ({"data": "{not json", "headers": {"Content-Type": "application/json"}}, 400, "invalid_json"),
    ({"json": {"s3_bucket": "avsr-test-forbidden", "s3_prefix": "a/"}}, 403, "bucket_not_allowed"),
    ({"json": {"s3_bucket": INPUT_BUCKET, "s3_prefix": "a/", "beam_size": 999}}, 400, "invalid_field"),
    ({"data": "x" * 100_000, "headers": {"Content-Type": "application/json"}}, 413, "request_entity_too_large"),
])
def test_bad_requests_are_4xx_with_codes(api, kwargs, status, code):
    response = api.request("POST", "/v1/jobs", **kwargs)
    assert response.status_code == status
    assert response.json()["error"]["code"] == code


def test_idempotency_key(api):
    body = {"s3_bucket": INPUT_BUCKET, "s3_prefix": "idem/"}
    headers = {"Idempotency-Key": f"idem-{time.time()}"}
    first = api.request("POST", "/v1/jobs", json=body, headers=dict(headers))
    second = api.request("POST", "/v1/jobs", json=body, headers=dict(headers))
    assert first.status_code == 202 and second.status_code == 200
    assert first.json()["job_id"] == second.json()["job_id"]
    other = api.request("POST", "/v1/jobs", json={**body, "beam_size": 2}, headers=dict(headers))
    assert other.status_code == 409 and other.json()["error"]["code"] == "idempotency_key_conflict"


def test_cancel_stops_a_job_for_good(api, s3):
    import cv2
    import numpy as np

    frames = [cv2.imencode(".jpg", np.full((64, 64, 3), i, np.uint8))[1].tobytes() for i in range(5)]
    prefix = upload_frames(s3, "clips/cancel/", frames)
    job_id = api.submit({"s3_bucket": INPUT_BUCKET, "s3_prefix": prefix})
    cancelled = api.request("DELETE", f"/v1/jobs/{job_id}")
    assert cancelled.status_code == 202 and cancelled.json()["status"] == "cancelled"
    time.sleep(3)  # whatever was already running must not revive it
    job = api.request("GET", f"/v1/jobs/{job_id}").json()
    assert job["status"] == "cancelled" and "result" not in job
    again = api.request("DELETE", f"/v1/jobs/{job_id}")
    assert again.status_code == 409 and again.json()["error"]["code"] == "job_finished"
    assert api.request("GET", f"/v1/jobs/{job_id}/result").status_code == 409


def test_health_reports_model_device_and_workers(api):
    response = api.request("GET", "/health", auth=False)
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ok" and body["model_loaded"] is True
    assert body["device"] == "cpu" and body["gpu_name"] is None
    assert body["broker"]["ok"] is True and body["workers"]["cpu"] >= 1
    assert body["workers"]["gpu"][0]["checkpoint"] == "finetune_s2s.pt"


def test_health_is_503_when_the_broker_is_down():
    app = create_app(Settings(redis_url="redis://127.0.0.1:1/0"))
    response = app.test_client().get("/health")
    assert response.status_code == 503
    assert response.json["status"] == "unavailable" and response.json["broker"]["ok"] is False


def test_metrics_export_jobs_queues_and_workers(api, frames_job_done):
    text = requests.get(api.base + "/metrics", timeout=10).text
    succeeded = [line for line in text.splitlines() if line.startswith('avsr_jobs_total{status="succeeded"}')]
    assert succeeded and float(succeeded[0].split()[-1]) >= 1
    assert 'avsr_queue_depth{queue="gpu"}' in text
    assert 'avsr_workers{role="gpu"} 1.0' in text
    assert "avsr_stage_duration_seconds_count" in text


def test_openapi_lists_every_route(api):
    spec = requests.get(api.base + "/openapi.json", timeout=10).json()
    assert spec["openapi"].startswith("3.")
    assert {"/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/result", "/predict", "/health", "/metrics"} \
        <= set(spec["paths"])


def _listening_addresses(port: int) -> set[str]:
    """The local addresses with a TCP socket listening on `port` (from /proc/net/tcp and tcp6)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                address, hex_port = local.split(":")
                if state == "0A" and int(hex_port, 16) == port:  # LISTEN
                    found.add(address)
    return found


def test_flower_is_behind_its_auth_or_on_loopback_only(stack):
    base = stack.config.flower_url
    for path in ("/", "/workers", "/tasks", "/broker", "/api/workers", "/api/tasks", "/api/task/types",
                 "/api/queues/length", "/api/task/info/x", "/api/task/result/x"):
        assert requests.get(base + path, timeout=10, allow_redirects=False).status_code == 401, path
    # Flower 2.2 serves /metrics without its auth: it must only listen on 127.0.0.1
    assert requests.get(base + "/metrics", timeout=10).status_code == 200
    assert _listening_addresses(stack.config.flower_port) == {"0100007F"}


def test_flower_sees_workers_and_finished_tasks(stack, frames_job_done):
    base, auth = stack.config.flower_url, tuple(stack.config.flower_auth.split(":"))
    assert requests.get(f"{base}/api/workers", timeout=10).status_code == 401
    workers = requests.get(f"{base}/api/workers", auth=auth, params={"refresh": "true"}, timeout=20).json()
    names = set(workers)
    assert any(n.startswith("gpu@") for n in names) and any(n.startswith("cpu1@") for n in names)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        tasks = requests.get(f"{base}/api/tasks", auth=auth, timeout=10).json()
        finished = [t for t in tasks.values() if t.get("name") == "avsr.finalize" and t.get("state") == "SUCCESS"]
        if finished:
            break
        time.sleep(0.5)
    assert finished, "Flower never saw a finished avsr.finalize task"


def verifier() -> Webhook:
    """What a receiver runs: the Standard Webhooks library with the service's secret."""
    return Webhook("whsec_" + base64.b64encode(WEBHOOK_SECRET.encode()).decode())


def wait_for_webhook(api, job_id: str, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        webhook = api.request("GET", f"/v1/jobs/{job_id}").json()["webhook"]
        if webhook["status"] in ("delivered", "failed"):
            return webhook
        time.sleep(0.2)
    raise AssertionError(f"webhook of {job_id} still {webhook}")


def test_webhook_is_posted_once_and_signed(api, s3, jpeg_frames_small, webhook_receiver):
    url, received = webhook_receiver
    prefix = upload_frames(s3, "clips/hook/", jpeg_frames_small)
    job = api.wait(api.submit({"s3_bucket": INPUT_BUCKET, "s3_prefix": prefix, "callback_url": url}))
    webhook = wait_for_webhook(api, job["job_id"])
    assert webhook["status"] == "delivered" and webhook["attempts"] == 1 and len(received) == 1
    headers, body = received[0]
    payload = verifier().verify(body, headers)
    assert payload["job_id"] == job["job_id"] and payload["status"] == job["status"] == "succeeded"
    assert payload["type"] == "job.succeeded" and headers["webhook-id"] == webhook["delivery_id"]


@pytest.mark.parametrize("webhook_receiver", [5], indirect=True)
def test_webhook_is_retried_with_the_same_id_until_delivered(api, s3, jpeg_frames_small, webhook_receiver):
    """A receiver failing 5 times: 6 attempts, each signed and verifiable, all with one webhook-id."""
    url, received = webhook_receiver
    prefix = upload_frames(s3, "clips/hook-retry/", jpeg_frames_small)
    job = api.wait(api.submit({"s3_bucket": INPUT_BUCKET, "s3_prefix": prefix, "callback_url": url}))
    webhook = wait_for_webhook(api, job["job_id"], timeout=60)
    assert webhook == {"status": "delivered", "attempts": 6, "delivery_id": webhook["delivery_id"]}
    assert len(received) == 6
    assert {headers["webhook-id"] for headers, _ in received} == {webhook["delivery_id"]}
    for headers, body in received:
        assert verifier().verify(body, headers)["job_id"] == job["job_id"]
    time.sleep(1.0)
    assert len(received) == 6  # delivered: no further attempt


def test_failed_jobs_send_their_webhook_too(api, webhook_receiver):
    url, received = webhook_receiver
    job = api.wait(api.submit({"s3_bucket": INPUT_BUCKET, "s3_prefix": "nothing/here/", "callback_url": url}))
    assert job["status"] == "failed" and job["error"]["code"] == "input_not_found"
    assert wait_for_webhook(api, job["job_id"])["status"] == "delivered"
    assert verifier().verify(received[0][1], received[0][0])["error"]["code"] == "input_not_found"


def test_submit_is_503_when_the_broker_is_down(monkeypatch):
    from tasks.settings import get_settings

    monkeypatch.setenv("AVSR_REDIS_URL", "redis://127.0.0.1:1/0")
    get_settings.cache_clear()
    try:
        client = create_app().test_client()
        response = client.post("/v1/jobs", json={"s3_bucket": INPUT_BUCKET, "s3_prefix": "a/"})
        assert response.status_code == 503
        assert response.json["error"]["code"] == "broker_unavailable"
    finally:
        get_settings.cache_clear()
