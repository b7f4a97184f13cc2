"""Two live tenants: one key never sees, cancels or reuses another's work; buckets per tenant."""

from __future__ import annotations

import time

import pytest
import requests
from botocore.exceptions import ClientError

from .conftest import INPUT_BUCKET, MISSING_BUCKET, OUTPUT_BUCKET, upload_frames

pytestmark = pytest.mark.integration


def test_another_tenant_gets_404_on_read_cancel_and_result(api, other_api, frames_job_done):
    job_id = frames_job_done["job_id"]
    assert api.request("GET", f"/v1/jobs/{job_id}/result", params={"format": "srt"}).status_code == 200
    for method, path in [("GET", f"/v1/jobs/{job_id}"), ("GET", f"/v1/jobs/{job_id}/result"),
                         ("GET", f"/v1/jobs/{job_id}/result?format=srt"), ("DELETE", f"/v1/jobs/{job_id}")]:
        response = other_api.request(method, path)
        assert response.status_code == 404 and response.json()["error"]["code"] == "job_not_found", (method, path)


def test_a_running_job_cannot_be_cancelled_by_another_tenant(api, other_api):
    job_id = other_api.submit({"s3_bucket": INPUT_BUCKET, "s3_prefix": "not/there/"})
    assert api.request("DELETE", f"/v1/jobs/{job_id}").status_code == 404
    assert api.request("GET", f"/v1/jobs/{job_id}").status_code == 404
    job = other_api.wait(job_id)
    assert job["status"] == "failed" and job["error"]["code"] == "input_not_found"  # not cancelled by the other


def test_idempotency_keys_live_in_each_tenants_namespace(api, other_api):
    body = {"s3_bucket": INPUT_BUCKET, "s3_prefix": "idem-tenants/"}
    headers = {"Idempotency-Key": f"shared-{time.time()}"}
    mine = api.request("POST", "/v1/jobs", json=body, headers=dict(headers))
    theirs = other_api.request("POST", "/v1/jobs", json=body, headers=dict(headers))
    assert mine.status_code == 202 and theirs.status_code == 202
    assert mine.json()["job_id"] != theirs.json()["job_id"]
    again = other_api.request("POST", "/v1/jobs", json=body, headers=dict(headers))
    assert again.status_code == 200 and again.json()["job_id"] == theirs.json()["job_id"]


def test_health_and_metrics_list_no_jobs(api, other_api, frames_job_done):
    other_id = other_api.submit({"s3_bucket": INPUT_BUCKET, "s3_prefix": "not/there/either/"})
    for path in ("/health", "/metrics"):
        for client in (api, other_api):
            text = client.request("GET", path, auth=False).text
            assert frames_job_done["job_id"] not in text and other_id not in text, path
            assert "tenant" not in text and "other" not in text.replace("other_", "")


def test_unknown_and_missing_keys_are_401(api):
    for headers in ({}, {"X-API-Key": "nope"}, {"Authorization": "Bearer " + api.key + "x"}):
        response = requests.get(api.base + "/v1/jobs/" + "0" * 32, headers=headers, timeout=10)
        assert response.status_code == 401 and response.json()["error"]["code"] == "unauthorized"


@pytest.mark.parametrize(("client", "body", "code"), [
    # read-only input bucket as output, for the tenant that may write the output bucket
    ("api", {"output": {"s3_bucket": INPUT_BUCKET, "s3_prefix": "r/"}}, "bucket_not_allowed"),
    # the work bucket is no one's input nor output
    ("api", {"s3_bucket": "avsr-test-work", "s3_prefix": "jobs/"}, "bucket_not_allowed"),
    ("api", {"output": {"s3_bucket": "avsr-test-work", "s3_prefix": "jobs/"}}, "bucket_not_allowed"),
    # the second tenant writes nowhere and reads only the input bucket
    ("other_api", {"output": {"s3_bucket": OUTPUT_BUCKET, "s3_prefix": "r/"}}, "bucket_not_allowed"),
    ("other_api", {"s3_bucket": OUTPUT_BUCKET, "s3_prefix": "a/"}, "bucket_not_allowed"),
    ("api", {"output": {"s3_bucket": OUTPUT_BUCKET, "s3_prefix": "../x"}}, "invalid_field"),
    ("api", {"output": {"s3_bucket": OUTPUT_BUCKET, "s3_prefix": "/abs"}}, "invalid_field"),
])
def test_buckets_per_tenant_and_direction(request, client, body, code):
    response = request.getfixturevalue(client).request(
        "POST", "/v1/jobs", json={"s3_bucket": INPUT_BUCKET, "s3_prefix": "a/", **body})
    assert response.json()["error"]["code"] == code
    assert response.status_code == (403 if code == "bucket_not_allowed" else 400)


def test_results_are_never_written_into_a_bucket_that_does_not_exist(api, s3, jpeg_frames_small):
    prefix = upload_frames(s3, "clips/missing-out/", jpeg_frames_small)
    job = api.wait(api.submit({"s3_bucket": INPUT_BUCKET, "s3_prefix": prefix,
                               "output": {"s3_bucket": MISSING_BUCKET, "s3_prefix": "r"}}))
    assert job["status"] == "failed" and job["error"]["code"] == "output_not_found"
    with pytest.raises(ClientError):
        s3.head_bucket(Bucket=MISSING_BUCKET)
