"""Hostile input against the live API: every one gets a documented 4xx JSON error, never a 5xx."""

from __future__ import annotations

import http.client
import socket
from urllib.parse import urlparse

import pytest
import requests

from tasks.errors import ERROR_CODES

from .conftest import INPUT_BUCKET

pytestmark = pytest.mark.integration

BASE = {"s3_bucket": INPUT_BUCKET, "s3_prefix": "a/"}
BODIES = [
    {"s3_bucket": INPUT_BUCKET, "s3_prefix": "\ud800"},
    {"s3_bucket": INPUT_BUCKET, "s3_key": "v\udfff.mp4"},
    {"s3_bucket": "\ud800", "s3_prefix": "a/"},
    {**BASE, "modality": "\ud800"},
    {**BASE, "\ud800": 1},
    {**BASE, "output": {"s3_bucket": "avsr-test-outputs", "s3_prefix": "\ud800"}},
    {**BASE, "callback_url": "https://example.org/\ud800"},
    {"s3_bucket": INPUT_BUCKET, "s3_prefix": "../etc/"},
    {"s3_bucket": INPUT_BUCKET, "s3_prefix": "a//b/"},
    {"s3_bucket": INPUT_BUCKET, "s3_prefix": "/root/"},
    {"s3_bucket": INPUT_BUCKET, "s3_key": "a/../../b.mp4"},
    {"s3_bucket": INPUT_BUCKET, "s3_key": "a\r\nX-Injected: 1"},
    {"s3_bucket": INPUT_BUCKET, "s3_prefix": "a\x00b/"},
    {**BASE, "output": {"s3_bucket": "avsr-test-outputs", "s3_prefix": "../x"}},
    {**BASE, "callback_url": "http://2130706433:99999/"},
    {**BASE, "callback_url": "http://u:p@example.org/"},
    {"url": "http://[::1/a.mp4"}, {"url": "http://[example.com]/"}, {"url": "http://example.com:99999/v.mp4"},
    {"url": "http://a..b/v.mp4"},
    {**BASE, "fps": 0}, {**BASE, "beam_size": 0}, {**BASE, "beam_size": 10**30}, {**BASE, "fps": -1e308},
    {**BASE, "output": []}, {**BASE, "modality": ["video"]}, [], "text", 7, None,
]


# JSON that Python's parser takes but no JSON encoder writes.
RAW = ['{"s3_bucket": "avsr-test-inputs", "s3_prefix": "a/", "fps": NaN}',
       '{"s3_bucket": "avsr-test-inputs", "s3_prefix": "a/", "fps": Infinity}',
       '{"s3_bucket": "avsr-test-inputs", "s3_prefix": "a/", "beam_size": 1e999}',
       '{"s3_bucket": "avsr-test-inputs", "s3_prefix": "a/", "s3_prefix": "\\ud800"}',
       '{"s3_bucket": "avsr-test-inputs", "s3_prefix": "\udcff"}', '{"a": ' * 5000]


@pytest.mark.parametrize("path", ["/v1/jobs", "/predict", "/v1/uploads"])
@pytest.mark.parametrize("body", BODIES + [{"raw": raw} for raw in RAW])
def test_hostile_bodies_get_documented_4xx(api, path, body):
    if isinstance(body, dict) and set(body) == {"raw"}:
        response = api.request("POST", path, data=body["raw"].encode("utf-8", "surrogateescape"),
                               headers={"Content-Type": "application/json"})
    else:
        response = api.request("POST", path, json=body)
    assert 400 <= response.status_code < 500, response.text
    code = response.json()["error"]["code"]
    assert ERROR_CODES[code].status == response.status_code


def _raw(api, request: bytes) -> tuple[int, dict[str, str], bytes]:
    url = urlparse(api.base)
    with socket.create_connection((url.hostname, url.port), timeout=10) as sock:
        sock.sendall(request)
        response = http.client.HTTPResponse(sock)
        response.begin()
        return response.status, dict(response.getheaders()), response.read()


@pytest.mark.parametrize("header", [b"Idempotency-Key: \xed\xa0\x80", b"Idempotency-Key: a\x01b",
                                    b"X-API-Key: \xed\xa0\x80", b"Authorization: Bearer \xff\xfe"])
def test_undecodable_headers_get_4xx(api, header):
    body = b'{"s3_bucket": "avsr-test-inputs", "s3_prefix": "a/"}'
    key = b"" if b"API-Key" in header or b"Authorization" in header else b"X-API-Key: " + api.key.encode() + b"\r\n"
    for path in (b"/v1/jobs", b"/predict"):
        status, headers, raw = _raw(api, b"POST " + path + b" HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                                    + key + header + b"\r\nContent-Length: " + str(len(body)).encode()
                                    + b"\r\nConnection: close\r\n\r\n" + body)
        assert 400 <= status < 500 and headers["Content-Type"].startswith("application/json"), raw


@pytest.mark.parametrize(("request_bytes", "status", "code"), [
    (b"GET /" + b"a" * 10_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414, "uri_too_long"),
    (b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 10_000 + b"\r\n\r\n", 431, "header_too_large"),
    (b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(200)) + b"\r\n", 431,
     "header_too_large"),
    (b"GET /health HTTP/9.9\r\nHost: x\r\n\r\n", 400, "malformed_request"),
    (b"G@T /health HTTP/1.1\r\nHost: x\r\n\r\n", 400, "malformed_request"),
])
def test_errors_gunicorn_answers_itself_are_json(api, request_bytes, status, code):
    got, headers, raw = _raw(api, request_bytes)
    assert got == status and headers["Content-Type"] == "application/json", raw
    assert requests.models.complexjson.loads(raw)["error"]["code"] == code


def test_405_says_which_methods_are_allowed(api):
    response = api.request("PUT", "/v1/jobs")
    assert response.status_code == 405 and response.json()["error"]["code"] == "method_not_allowed"
    assert set(response.headers["Allow"].replace(" ", "").split(",")) >= {"POST"}
    job = api.request("PATCH", "/v1/jobs/" + "0" * 32)
    assert job.status_code == 405 and {"GET", "DELETE"} <= set(job.headers["Allow"].replace(" ", "").split(","))
