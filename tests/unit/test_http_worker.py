"""When the API's worker hands a request to a thread (`api.http_worker.request_ready`)."""

from __future__ import annotations

import pytest

from api.http_worker import MAX_HEAD_BYTES, RequestBuffer, request_ready

GET = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"


def post(framing: bytes, body: bytes = b"") -> bytes:
    return b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\n" + framing + b"\r\n\r\n" + body


CASES = [
    (b"", False),
    (GET[:-2], False),
    (GET, True),
    (b"GET / HTTP/1.0\r\n\r\n", True),
    (b"X" * (MAX_HEAD_BYTES + 1), True),  # no end of head in sight: the parser refuses it
    (post(b"Content-Length: 10", b"12345"), False),
    (post(b"content-length:10", b"1234567890"), True),
    (post(b"Content-Length: 10", b"1234567890" + GET), True),  # pipelined
    (post(b"Content-Length: 99999999"), True),  # over the body limit: the app answers 413 unread
    (post(b"Content-Length: 10\r\nContent-Length: 11"), True),  # the parser answers 400
    (post(b"Content-Length: -1"), True),
    (post(b"Content-Length: 10\r\nExpect: 100-continue"), True),  # waits for gunicorn's 100 Continue
    (post(b"Transfer-Encoding: chunked", b"5\r\nabcde\r\n"), False),
    (post(b"Transfer-Encoding: chunked", b"5\r\nabcde\r\n0\r\n"), False),
    (post(b"Transfer-Encoding: chunked", b"5;ext=1\r\nabcde\r\n0\r\n\r\n"), True),
    (post(b"Transfer-Encoding: chunked", b"5\r\nabcde\r\n0\r\nTrailer: 1\r\n\r\n"), True),
    (post(b"Transfer-Encoding: chunked", b"zz\r\n"), True),  # malformed: the parser answers 400
    (post(b"Transfer-Encoding: chunked", b"10000\r\n"), True),  # over the body limit
    (post(b"Transfer-Encoding: chunked", b"1" * 2000), True),  # a chunk-size line without end
    (post(b"Transfer-Encoding: chunked", b"3\r\nabc\r\n0\r\n" + b"T: x\r\n" * 20000), True),  # endless trailers
]


@pytest.mark.parametrize(("data", "ready"), CASES)
def test_a_request_goes_to_a_thread_once_it_is_whole_or_cannot_be(data, ready):
    assert request_ready(data, max_body=1000) is ready


@pytest.mark.parametrize(("data", "ready"), CASES)
def test_a_request_arriving_a_byte_at_a_time_is_ready_when_its_prefix_is(data, ready):
    buffer = RequestBuffer(max_body=1000)
    became_ready = next((n for n in range(1, len(data) + 1) if buffer.add(data[n - 1:n])), None)
    first_ready = next((n for n in range(1, len(data) + 1) if request_ready(data[:n], max_body=1000)), None)
    assert became_ready == first_ready and (became_ready is not None) is ready
