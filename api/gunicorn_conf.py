"""gunicorn settings of the API (`gunicorn -c python:api.gunicorn_conf "api:create_app()"`).

gunicorn answers a request it cannot parse itself, before Flask sees it — a request line over
`limit_request_line` (414), a header over `limit_request_field_size` or too many headers (431), a
malformed request line or header (400) — and writes those answers as HTML. Here they are written as
the API's JSON error body with a code of `tasks.errors.ERROR_CODES` instead.
"""

from __future__ import annotations

import json
from typing import Any

from gunicorn import util

from tasks.errors import http_status

# The threaded worker, but a connection takes a thread only once its whole request has arrived
# (`api/http_worker.py`: slow clients cannot hold the API's threads).
worker_class = "api.http_worker.RequestBufferingWorker"
limit_request_line = 8190  # bytes of the request line (gunicorn's maximum); longer: 414 uri_too_long
limit_request_field_size = 8190  # bytes of one header; longer: 431 header_too_large
limit_request_fields = 100  # headers; more: 431 header_too_large

_CODES = {414: "uri_too_long", 431: "header_too_large", 500: "internal_error"}
_REASONS = {400: "Bad Request", 414: "URI Too Long", 431: "Request Header Fields Too Large",
            500: "Internal Server Error"}


def json_error(sock: Any, status_int: int, reason: str, mesg: str) -> None:
    """`gunicorn.util.write_error`, answering `{"error": {"code", "message"}}` as JSON."""
    code = _CODES.get(status_int, "internal_error" if status_int >= 500 else "malformed_request")
    status = http_status(code)
    message = {"uri_too_long": "the request line is over 8190 bytes",
               "header_too_large": "a header is over 8190 bytes, or there are over 100 headers",
               "internal_error": "internal server error"}.get(code, "the HTTP request could not be parsed")
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    head = (f"HTTP/1.1 {status} {_REASONS.get(status, reason)}\r\nConnection: close\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode("latin-1")
    util.write_nonblock(sock, head + body)


def post_worker_init(worker: Any) -> None:
    util.write_error = json_error  # gunicorn's worker calls util.write_error at the time of the error
