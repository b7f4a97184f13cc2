"""Request validation: every bad input is a 4xx with a machine-readable code."""

from __future__ import annotations

import pytest

from api.errors import ApiError
from api.validation import check_job_id, idempotency_key, parse_job_request
from tasks.settings import Settings

SETTINGS = Settings(allowed_buckets=("clips", "results"))


def error_of(body, settings=SETTINGS, **kwargs) -> ApiError:
    with pytest.raises(ApiError) as info:
        parse_job_request(body, settings, **kwargs)
    return info.value


def test_frames_request_is_normalised():
    request = parse_job_request({"s3_bucket": "clips", "s3_prefix": "talk/", "fps": 30}, SETTINGS)
    assert request == {
        "input": {"type": "frames", "bucket": "clips", "prefix": "talk/", "fps": 30.0},
        "modality": "auto", "beam_size": SETTINGS.beam_size, "output": None, "callback_url": None,
    }


def test_video_request_with_options():
    request = parse_job_request({
        "s3_bucket": "clips", "s3_key": "a/talk.mp4", "modality": "audiovisual", "beam_size": 8,
        "output": {"s3_bucket": "results", "s3_prefix": "out"}, "callback_url": "https://example.org/hook",
    }, SETTINGS)
    assert request["input"] == {"type": "video", "bucket": "clips", "key": "a/talk.mp4"}
    assert request["beam_size"] == 8
    assert request["output"] == {"bucket": "results", "prefix": "out"}


@pytest.mark.parametrize(("body", "code", "status"), [
    (None, "invalid_json", 400),
    ([], "invalid_json", 400),
    ({"s3_prefix": "x/"}, "missing_field", 400),
    ({"s3_bucket": "clips"}, "invalid_input", 400),
    ({"s3_bucket": "clips", "s3_prefix": "a/", "s3_key": "b.mp4"}, "invalid_input", 400),
    ({"s3_bucket": "clips", "s3_key": "dir/"}, "invalid_input", 400),
    ({"s3_bucket": "Bad_Bucket!", "s3_prefix": "a/"}, "invalid_bucket", 400),
    ({"s3_bucket": "elsewhere", "s3_prefix": "a/"}, "bucket_not_allowed", 403),
    ({"s3_bucket": "clips", "s3_prefix": 7}, "invalid_field", 400),
    ({"s3_bucket": "clips", "s3_prefix": "a/", "fps": 0}, "invalid_field", 400),
    ({"s3_bucket": "clips", "s3_prefix": "a/", "fps": "25"}, "invalid_field", 400),
    ({"s3_bucket": "clips", "s3_key": "a.mp4", "fps": 25}, "invalid_field", 400),
    ({"s3_bucket": "clips", "s3_prefix": "a/", "beam_size": 0}, "invalid_field", 400),
    ({"s3_bucket": "clips", "s3_prefix": "a/", "beam_size": 2.5}, "invalid_field", 400),
    ({"s3_bucket": "clips", "s3_prefix": "a/", "beam_size": True}, "invalid_field", 400),
    ({"s3_bucket": "clips", "s3_prefix": "a/", "modality": "smell"}, "invalid_field", 400),
    ({"s3_bucket": "clips", "s3_prefix": "a/", "callback_url": "ftp://x/y"}, "invalid_field", 400),
    ({"s3_bucket": "clips", "s3_prefix": "a/", "output": {"s3_bucket": "nope"}}, "bucket_not_allowed", 403),
    ({"s3_bucket": "clips", "s3_prefix": "a/", "output": "s3://x"}, "invalid_field", 400),
    ({"s3_bucket": "clips", "s3_prefix": "a/", "surprise": 1}, "unknown_field", 400),
    ({"s3_bucket": "clips", "s3_prefix": "a" * 2000}, "invalid_field", 400),
])
def test_bad_requests_have_codes(body, code, status):
    error = error_of(body)
    assert (error.code, error.status) == (code, status)


def test_empty_allow_list_accepts_any_bucket():
    request = parse_job_request({"s3_bucket": "anything-goes", "s3_prefix": ""}, Settings())
    assert request["input"]["bucket"] == "anything-goes"


def test_legacy_predict_takes_frames_only():
    assert error_of({"s3_bucket": "clips", "s3_key": "a.mp4"}, legacy=True).code == "invalid_input"
    assert parse_job_request({"s3_bucket": "clips", "s3_prefix": "p/"}, SETTINGS, legacy=True)["input"]["type"] \
        == "frames"


def test_job_ids_and_idempotency_keys():
    assert check_job_id("0" * 32) == "0" * 32
    with pytest.raises(ApiError) as info:
        check_job_id("../../etc/passwd")
    assert info.value.status == 404
    assert idempotency_key(None) is None
    with pytest.raises(ApiError):
        idempotency_key("k" * 300)


@pytest.mark.parametrize("url", ["http://127.0.0.1:9/hook", "http://169.254.169.254/latest/meta-data",
                                 "https://10.0.0.8/x", "http://[::1]/x", "http://localhost:8080/", "http://192.168.1.2/"])
def test_callbacks_to_private_addresses_are_refused_by_default(url):
    body = {"s3_bucket": "clips", "s3_prefix": "a/", "callback_url": url}
    error = error_of(body)
    assert (error.code, error.status) == ("callback_not_allowed", 400)
    allowed = Settings(allowed_buckets=("clips",), callback_allow_private=True)
    assert parse_job_request(body, allowed)["callback_url"] == url


def test_webhook_target_check_resolves_names():
    from tasks.webhooks import non_global_address

    assert non_global_address("https://example.org/hook", resolve=False) is None
    assert non_global_address("http://8.8.8.8/hook") is None
    assert non_global_address("http://localhost/hook", resolve=False) == "localhost"
    assert non_global_address("http://127.0.0.1/hook") == "127.0.0.1"
