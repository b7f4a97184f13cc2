"""Slow and idle clients against real gunicorn: they cannot hold the API's threads (`api/http_worker.py`)."""

from __future__ import annotations

import contextlib
import json
import socket
import time
from collections.abc import Iterator
from urllib.parse import urlparse

import pytest
import requests

from .conftest import PORT_BASE
from .extra_api import extra_api

pytestmark = pytest.mark.integration

HEAD = b"GET /health HTTP/1.1\r\nHost: x\r\n"


@contextlib.contextmanager
def connections(base: str, count: int, first_bytes: bytes) -> Iterator[list[socket.socket]]:
    """`count` connections to the API at `base`, each having sent `first_bytes` and nothing more."""
    url = urlparse(base)
    socks = []
    try:
        for _ in range(count):
            sock = socket.create_connection((url.hostname, url.port), timeout=10)
            if first_bytes:
                sock.sendall(first_bytes)
            socks.append(sock)
        yield socks
    finally:
        for sock in socks:
            sock.close()


def read_answer(sock: socket.socket) -> bytes:
    sock.settimeout(30)
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def job_head(api, length: int, chunked: bool = False) -> bytes:
    framing = b"Transfer-Encoding: chunked" if chunked else b"Content-Length: %d" % length
    return (b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nX-API-Key: " + api.key.encode() +
            b"\r\nContent-Type: application/json\r\nConnection: close\r\n" + framing + b"\r\n\r\n")


@pytest.mark.parametrize("first_bytes", [HEAD, b"", None], ids=["half a head", "nothing", "half a body"])
def test_more_slow_clients_than_threads_leave_the_api_answering(api, first_bytes):
    # The stack's API has 2 x 32 threads: 150 clients that never finish their requests would hold
    # all of them under gunicorn's own threaded worker; here /health answers at once.
    body_start = job_head(api, 1000) + b'{"s3_bucket": '
    with connections(api.base, 150, body_start if first_bytes is None else first_bytes) as socks:
        for _ in range(3):
            for sock in socks:
                if first_bytes is not None:
                    sock.sendall(b"X-Slow: 1\r\n" if first_bytes else b"")
            health = requests.get(api.base + "/health", timeout=10)
            assert health.status_code == 200, health.text
            time.sleep(0.5)


def test_a_request_that_does_not_arrive_in_time_is_answered_408_and_an_idle_one_closed(stack):
    with extra_api(stack, PORT_BASE + 26, {"AVSR_REQUEST_READ_TIMEOUT_S": "1"}, "api-read-timeout") as api, \
            connections(api.base, 1, HEAD) as (partial,), connections(api.base, 1, b"") as (idle,), \
            connections(api.base, 1, HEAD + b"\r\n" + HEAD) as (pipelined,), \
            connections(api.base, 1, job_head(api, 100).replace(b"\r\n\r\n", b"\r\nExpect: 100-continue\r\n\r\n")
                        ) as (expecting,):
        partial.sendall(b"X-Slow: 1\r\n")
        answer = read_answer(partial)
        status, _, body = answer.partition(b"\r\n\r\n")
        assert status.startswith(b"HTTP/1.1 408 "), answer
        assert json.loads(body)["error"]["code"] == "request_timeout"
        assert read_answer(idle) == b""  # closed without an answer
        # a whole request, then half of the next one on the same connection: the first is answered,
        # the second times out in the event loop like any other
        first, _, rest = read_answer(pipelined).partition(b"HTTP/1.1 408 ")
        assert first.startswith(b"HTTP/1.1 200 ") and b"request_timeout" in rest
        # a body a thread reads itself (after 100 Continue), trickled: the thread's reads end too
        assert expecting.recv(100).startswith(b"HTTP/1.1 100 Continue")
        cut = False
        try:
            for _ in range(20):  # 4 s of a byte every 0.2 s: the connection is closed on its sender
                expecting.sendall(b" ")
                time.sleep(0.2)
        except OSError:
            cut = True
        assert cut
        assert requests.get(api.base + "/health", timeout=10).status_code == 200


def test_past_its_share_of_connections_a_worker_closes_the_longest_waiting(stack):
    # worker_connections 40: at most 20 may wait for their requests; the 21st closes the first.
    with extra_api(stack, PORT_BASE + 27, {}, "api-few-connections", ("--worker-connections", "40")) as api, \
            connections(api.base, 60, HEAD) as socks:
        assert read_answer(socks[0]) == b""
        assert requests.get(api.base + "/health", timeout=10).status_code == 200
        socks[-1].sendall(b"Connection: close\r\n\r\n")  # the newest still gets its answer
        assert read_answer(socks[-1]).startswith(b"HTTP/1.1 200 ")


@pytest.mark.parametrize("framing", ["a byte at a time", "chunked", "pipelined", "Expect: 100-continue"])
def test_requests_that_arrive_in_pieces_are_answered_as_usual(api, framing):
    body = json.dumps({"s3_bucket": "", "s3_prefix": "a/"}).encode()  # a 400 without touching the broker
    url = urlparse(api.base)
    with socket.create_connection((url.hostname, url.port), timeout=10) as sock:
        if framing == "a byte at a time":
            for byte in job_head(api, len(body)) + body:
                sock.send(bytes([byte]))
        elif framing == "chunked":
            sock.sendall(job_head(api, 0, chunked=True) + b"%x\r\n" % 5 + body[:5] + b"\r\n")
            time.sleep(0.3)
            sock.sendall(b"%x\r\n" % (len(body) - 5) + body[5:] + b"\r\n0\r\n\r\n")
        elif framing == "pipelined":
            sock.sendall(HEAD + b"\r\n" + job_head(api, len(body)) + body)
        else:
            sock.sendall(job_head(api, len(body)).replace(b"\r\n\r\n", b"\r\nExpect: 100-continue\r\n\r\n"))
            assert sock.recv(100).startswith(b"HTTP/1.1 100 Continue")
            sock.sendall(body)
        answer = read_answer(sock)
    if framing == "pipelined":
        assert answer.startswith(b"HTTP/1.1 200 "), answer
        answer = answer[answer.index(b"HTTP/1.1 ", 1):]
    status, _, rest = answer.partition(b"\r\n\r\n")
    assert status.startswith(b"HTTP/1.1 400 "), answer
    assert json.loads(rest)["error"]["code"] == "invalid_bucket"
