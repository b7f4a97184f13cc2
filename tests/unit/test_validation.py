"""Request validation: every bad input is a 4xx with a machine-readable code."""

from __future__ import annotations

import pytest

from api.errors import ApiError
from api.validation import check_job_id, idempotency_key, parse_job_request, query_int
from tasks.settings import Settings

SETTINGS = Settings(allowed_buckets=("clips", "results"), output_buckets=("results",), callback_secret="s")


def error_of(body, settings=SETTINGS, **kwargs) -> ApiError:
    with pytest.raises(ApiError) as info:
        parse_job_request(body, settings, **kwargs)
    return info.value


def test_frames_request_is_normalised():
    request = parse_job_request({"s3_bucket": "clips", "s3_prefix": "talk/", "fps": 30}, SETTINGS)
    assert request == {
        "input": {"type": "frames", "bucket": "clips", "prefix": "talk/", "fps": 30.0},
        "modality": "auto", "beam_size": SETTINGS.beam_size, "output": None, "callback_url": None,
        "speaker": "largest",
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


FRAMES = {"s3_bucket": "clips", "s3_prefix": "a/"}


@pytest.mark.parametrize("mode", ["largest", "center", "speaking", "all"])
def test_speaker_modes_are_stored(mode):
    assert parse_job_request({**FRAMES, "speaker": mode}, SETTINGS)["speaker"] == mode


def test_speaker_is_normalised_so_equal_requests_are_equal():
    # the Idempotency-Key fingerprint is of the stored request: the default given or not, 1 or 1.0, is one job
    assert parse_job_request(FRAMES, SETTINGS) == parse_job_request({**FRAMES, "speaker": "largest"}, SETTINGS)
    assert parse_job_request({**FRAMES, "speaker": None}, SETTINGS)["speaker"] == "largest"  # null: absent
    assert (parse_job_request({**FRAMES, "speaker": {"t": 1, "x": 2, "y": 3}}, SETTINGS)
            == parse_job_request({**FRAMES, "speaker": {"y": 3.0, "x": 2.0, "t": 1.0}}, SETTINGS))


def test_speaker_hint_is_stored_as_floats():
    request = parse_job_request({**FRAMES, "speaker": {"t": 1, "x": 640.5, "y": 0}}, SETTINGS)
    assert request["speaker"] == {"t": 1.0, "x": 640.5, "y": 0.0}
    assert all(type(v) is float for v in request["speaker"].values())
    legacy = parse_job_request({**FRAMES, "speaker": "center"}, SETTINGS, legacy=True)  # /predict too
    assert legacy["speaker"] == "center"


@pytest.mark.parametrize("value", [
    "loudest", "", "ALL", True, 0, 1.5, [], ["all"], {}, {"t": 1, "x": 2}, {"t": 1, "x": 2, "y": 3, "z": 4},
    {"t": -0.1, "x": 1, "y": 1}, {"t": 1, "x": 16385, "y": 1}, {"t": 1, "x": 1, "y": 1e300},
    {"t": 86401, "x": 1, "y": 1}, {"t": 10**400, "x": 1, "y": 1}, {"t": float("nan"), "x": 1, "y": 1},
    {"t": float("inf"), "x": 1, "y": 1}, {"t": True, "x": 1, "y": 1}, {"t": "1", "x": 1, "y": 1},
    {"t": None, "x": 1, "y": 1}, {"t": {"t": 1}, "x": 1, "y": 1}, {"t": [1], "x": 1, "y": 1},
])
def test_bad_speaker_is_invalid_field(value):
    error = error_of({**FRAMES, "speaker": value})
    assert (error.code, error.status) == ("invalid_field", 400)
    assert "speaker" in error.message


def test_speaker_field_matches_the_schema():
    from typing import get_args

    from api import schema
    from tasks.records import SpeakerMode

    modes, hint = schema.SPEAKER["oneOf"]
    assert modes["enum"] == list(get_args(SpeakerMode)) and hint is schema.SPEAKER_HINT
    assert "speaker" in schema.PREDICT_REQUEST["properties"]


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
    allowed = Settings(allowed_buckets=("clips",), callback_allow_private=True, callback_secret="s")
    assert parse_job_request(body, allowed)["callback_url"] == url


def test_webhook_target_check_resolves_names():
    from tasks.pinned_http import non_global_address

    assert non_global_address("https://example.org/hook", resolve=False) is None
    assert non_global_address("http://8.8.8.8/hook") is None
    assert non_global_address("http://localhost/hook", resolve=False) == "localhost"
    assert non_global_address("http://127.0.0.1/hook") == "127.0.0.1"


@pytest.mark.parametrize("url", ["http://2130706433/", "http://127.1/", "http://0x7f.1/", "http://0177.0.0.1/",
                                 "http://[::ffff:127.0.0.1]/", "http://[::ffff:7f00:1]/", "http://0/",
                                 "http://[::]/", "http://169.254.169.254./", "http://LOCALHOST./",
                                 "http://10.1/", "http://0xa9fea9fe/", "http://[fe80::1%25eth0]/"])
def test_every_spelling_of_a_private_address_is_refused(url):
    error = error_of({"s3_bucket": "clips", "s3_prefix": "a/", "callback_url": url})
    assert (error.code, error.status) == ("callback_not_allowed", 400)


@pytest.mark.parametrize("url", ["http://999999999999/", "http://user:pw@example.org/", "http://example.org:99999/",
                                 "http://exa mple.org/\n", "http://a..b.example/", f"http://{'x' * 64}.example/"])
def test_malformed_callback_urls_are_invalid_fields(url):
    assert error_of({"s3_bucket": "clips", "s3_prefix": "a/", "callback_url": url}).code == "invalid_field"


def test_callback_without_a_secret_is_refused():
    error = error_of({"s3_bucket": "clips", "s3_prefix": "a/", "callback_url": "https://example.org/h"},
                     Settings(allowed_buckets=("clips",)))
    assert error.code == "callback_not_allowed" and "secret" in error.message


@pytest.mark.parametrize("field", ["s3_prefix", "s3_key"])
@pytest.mark.parametrize("value", ["../x", "a/../b", "/abs", "a//b", "./a", "a/./b", "a\nb", "a\x7fb", "a\x1b[2J",
                                   "a\ud800b"])
def test_hostile_keys_and_prefixes_are_invalid_fields(field, value):
    error = error_of({"s3_bucket": "clips", field: value})
    assert (error.code, error.status) == ("invalid_field", 400)


@pytest.mark.parametrize("body", [
    {"s3_bucket": "clips", "s3_prefix": "a/", "output": {"s3_bucket": "results", "s3_prefix": "../x"}},
    {"s3_bucket": "clips", "s3_prefix": "a/", "output": {"s3_bucket": "results", "s3_prefix": "//x"}},
    {"s3_bucket": "clips", "s3_prefix": "a/", "modality": "\udfff"},
    {"s3_bucket": "clips\ud800", "s3_prefix": "a/"},
    {"s3_bucket": "clips", "s3_prefix": "a/", "\ud800": 1},
    {"s3_bucket": "clips", "s3_prefix": "a/", "callback_url": "https://example.org/\ud800"},
])
def test_hostile_strings_anywhere_are_invalid_fields(body):
    assert error_of(body).code == "invalid_field"


def test_unicode_keys_that_encode_are_kept_as_given():
    request = parse_job_request({"s3_bucket": "clips", "s3_key": "vidéos/entretien 1.mp4"}, SETTINGS)
    assert request["input"]["key"] == "vidéos/entretien 1.mp4"


def test_read_and_write_allow_lists_are_separate():
    # reading from "results" is allowed, writing into the input bucket is not
    assert parse_job_request({"s3_bucket": "results", "s3_prefix": "a/"}, SETTINGS)["input"]["bucket"] == "results"
    error = error_of({"s3_bucket": "clips", "s3_prefix": "a/", "output": {"s3_bucket": "clips"}})
    assert (error.code, error.status) == ("bucket_not_allowed", 403)
    # no write list: no output location at all (results stay in the work bucket)
    error = error_of({"s3_bucket": "x-bucket", "s3_prefix": "a/", "output": {"s3_bucket": "y-bucket"}}, Settings())
    assert error.code == "bucket_not_allowed"
    # no read list: any bucket but the work bucket
    assert error_of({"s3_bucket": Settings().work_bucket, "s3_prefix": "jobs/"}, Settings()).code \
        == "bucket_not_allowed"


def test_a_tenant_has_its_own_buckets():
    settings = Settings(tenants_json='{"acme": {"keys": ["k"], "read_buckets": ["acme-in"], '
                                     '"write_buckets": ["acme-out"]}}')
    acme = settings.tenant("acme")
    body = {"s3_bucket": "acme-in", "s3_prefix": "a/", "output": {"s3_bucket": "acme-out", "s3_prefix": "r"}}
    assert parse_job_request(body, settings, tenant=acme)["output"] == {"bucket": "acme-out", "prefix": "r"}
    assert error_of({"s3_bucket": "clips", "s3_prefix": "a/"}, settings, tenant=acme).code == "bucket_not_allowed"


def test_idempotency_keys_are_printable_ascii():
    for value in ("k\x00", "k\nx", "ké"):
        with pytest.raises(ApiError) as info:
            idempotency_key(value)
        assert info.value.code == "invalid_header"


@pytest.mark.parametrize("raw", ['{"t": NaN, "x": 1, "y": 2}', '{"t": 1e999, "x": 1, "y": 2}', '"all "',
                                 '{"t": 1, "x": 1, "y": {"t": 1, "x": 1, "y": 1}}'])
def test_bad_speaker_over_http_is_400(raw):
    from api import create_app

    client = create_app(Settings(api_keys=("k",))).test_client()
    response = client.post("/v1/jobs", data=f'{{"upload_id": "{"0" * 32}", "speaker": {raw}}}',
                           headers={"X-API-Key": "k", "Content-Type": "application/json"})
    assert response.status_code == 400 and response.get_json()["error"]["code"] == "invalid_field"


@pytest.mark.parametrize("raw", ["\u00b2", "\u0663", "9" * 5000, "-1", "+5", " 5", "5.0", "", "0x10", "1e2", "99"])
def test_query_int_refuses_anything_but_ascii_digits_in_range(raw):
    from flask import Flask

    with Flask(__name__).test_request_context("/", query_string={"line_chars": raw}), pytest.raises(ApiError) as info:
        query_int("line_chars", 42, 10, 80)
    assert (info.value.code, info.value.status) == ("invalid_field", 400)


def test_query_int_reads_its_range_and_default():
    from flask import Flask

    with Flask(__name__).test_request_context("/", query_string={"line_chars": "016"}):
        assert query_int("line_chars", 42, 10, 80) == 16
        assert query_int("max_lines", 2, 1, 6) == 2
