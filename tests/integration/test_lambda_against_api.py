"""The Lambda handler (deploy/lambda/handler.py) against the running API, with real event shapes."""

from __future__ import annotations

import importlib.util
import urllib.parse

import pytest

from deploy.local.stack import ROOT

from .conftest import INPUT_BUCKET, upload_frames

pytestmark = pytest.mark.integration


@pytest.fixture
def handler(stack, monkeypatch):
    monkeypatch.setenv("AVSR_API_URL", stack.config.api_url)
    monkeypatch.setenv("AVSR_API_KEY", stack.config.api_key)
    spec = importlib.util.spec_from_file_location("avsr_lambda_handler", ROOT / "deploy" / "lambda" / "handler.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def s3_event(bucket: str, key: str, etag: str, sequencer: str) -> dict:
    """An S3 ObjectCreated:Put notification as AWS delivers it (key URL-encoded, + for spaces)."""
    return {"Records": [{
        "eventVersion": "2.1", "eventSource": "aws:s3", "awsRegion": "us-east-1",
        "eventTime": "2026-11-25T08:00:00.000Z", "eventName": "ObjectCreated:Put",
        "userIdentity": {"principalId": "AWS:EXAMPLE"}, "requestParameters": {"sourceIPAddress": "127.0.0.1"},
        "responseElements": {"x-amz-request-id": "C3D13FE58DE4C810", "x-amz-id-2": "FMyUVURIY8/IgAtTv8xRjskZQpcIZ9"},
        "s3": {"s3SchemaVersion": "1.0", "configurationId": "avsr-trigger",
               "bucket": {"name": bucket, "ownerIdentity": {"principalId": "A3NL1KOZZKExample"},
                          "arn": f"arn:aws:s3:::{bucket}"},
               "object": {"key": urllib.parse.quote_plus(key, safe="/"), "size": 1024, "eTag": etag,
                          "sequencer": sequencer}}}]}


def test_s3_event_for_a_frame_folder_runs_a_job(handler, api, s3, jpeg_frames_small):
    prefix = upload_frames(s3, "lambda/my clip/", jpeg_frames_small)
    s3.put_object(Bucket=INPUT_BUCKET, Key=prefix + "_DONE", Body=b"")
    event = s3_event(INPUT_BUCKET, prefix + "_DONE", "d41d8cd98f00b204e9800998ecf8427e", "0055AED6DCD90281E5")
    out = handler.lambda_handler(event, None)
    assert out["errors"] == [] and len(out["job_ids"]) == 1
    again = handler.lambda_handler(event, None)  # Lambda retries the same event: same job
    assert again["job_ids"] == out["job_ids"]
    job = api.wait(out["job_ids"][0])
    assert job["status"] == "succeeded", job
    assert job["result"]["num_frames"] == len(jpeg_frames_small)


def test_direct_invocation_and_api_errors_are_reported(handler, api):
    bad = handler.lambda_handler({"s3_bucket": "avsr-test-forbidden", "s3_prefix": "x/"}, None)
    assert bad["job_ids"] == [] and "bucket_not_allowed" in str(bad["errors"])
    ok = handler.lambda_handler({"s3_bucket": INPUT_BUCKET, "s3_prefix": "nothing/here/"}, None)
    assert len(ok["job_ids"]) == 1
    job = api.wait(ok["job_ids"][0])
    assert job["status"] == "failed" and job["error"]["code"] == "input_not_found"
