"""URL inputs: a video fetched over http(s) by `prepare`, with the webhooks' SSRF guard.

Every hop (redirects are followed by hand, at most 5) must resolve to global addresses unless
AVSR_URL_ALLOW_PRIVATE, and is fetched from the addresses that were checked (`tasks.pinned_http`: no
DNS rebinding between the check and the connection); the body is streamed to disk with a byte cap
(AVSR_MAX_INPUT_BYTES) and a wall-clock limit on the whole fetch, connecting, redirects and headers
included (AVSR_URL_TIMEOUT_S, `pinned_http.Deadline`; 30 s without a byte); the content
type must be video/* or application/octet-stream (or absent). Failures are the documented job codes `url_not_allowed`,
`url_fetch_failed` (retried when the server or network failed), `url_not_video`, `input_too_large`.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urljoin, urlparse

import urllib3

from tasks import pinned_http
from tasks.errors import JobError, input_too_large

MAX_REDIRECTS = 5
CONNECT_TIMEOUT_S, READ_TIMEOUT_S = 10.0, 30.0
PIECE_BYTES = 1 << 16


REDIRECTS = (301, 302, 303, 307, 308)


def _check(url: str, allow_private: bool) -> str:
    """The canonical host of `url`, if it may be fetched (at submit the name is not resolved yet)."""
    try:
        scheme, host = urlparse(url).scheme, pinned_http.url_host(url)
    except ValueError as exc:
        raise JobError("url_not_allowed", f"{url} is no valid URL: {exc}") from exc
    if scheme not in ("http", "https") or not host:
        raise JobError("url_not_allowed", f"{url} is not an http(s) URL")
    if not allow_private and (address := pinned_http.non_global_address(url, resolve=False)):
        raise JobError("url_not_allowed", f"{url} points at a non-global address ({address})")
    return host


def _too_slow(url: str, deadline: pinned_http.Deadline) -> JobError:
    return JobError("url_fetch_failed", f"{url} took longer than {deadline.seconds:g} s")


def _open(url: str, allow_private: bool, deadline: pinned_http.Deadline) -> urllib3.BaseHTTPResponse:
    """The final response of `url`, redirects followed by hand (each target checked, then connected to)."""
    for _ in range(MAX_REDIRECTS + 1):
        host = _check(url, allow_private)
        if deadline.left() == 0:
            raise _too_slow(url, deadline)
        try:
            response = pinned_http.request("GET", url, host=host, allow_private=allow_private,
                                           timeout=deadline.timeout(CONNECT_TIMEOUT_S, READ_TIMEOUT_S),
                                           headers={"Accept": "video/*, application/octet-stream"}, stream=True,
                                           deadline=deadline)
        except PermissionError as exc:
            raise JobError("url_not_allowed", f"{url}: {exc}") from exc
        except (OSError, urllib3.exceptions.HTTPError) as exc:
            if deadline.left() == 0:
                raise _too_slow(url, deadline) from exc
            raise JobError("url_fetch_failed", f"{url}: {type(exc).__name__}: {exc}", retryable=True) from exc
        if deadline.left() == 0:  # the deadline cut the headers short
            response.release_conn()
            raise _too_slow(url, deadline)
        location = response.headers.get("Location")
        if response.status in REDIRECTS and location:
            response.release_conn()
            try:
                url = urljoin(url, location)
            except ValueError as exc:
                raise JobError("url_not_allowed", f"{url} redirects to no valid URL: {exc}") from exc
            continue
        return response
    raise JobError("url_fetch_failed", f"more than {MAX_REDIRECTS} redirects")


def fetch(url: str, dest: Path, *, max_bytes: int, timeout_s: float, allow_private: bool) -> int:
    """Stream the video at `url` into `dest`; its size in bytes. Connecting, redirects, headers and body
    together are cut off after `timeout_s`."""
    with pinned_http.Deadline(timeout_s) as deadline:
        response = _open(url, allow_private, deadline)
        try:
            return _save(url, response, dest, max_bytes, deadline)
        finally:
            response.release_conn()


def _save(url: str, response: urllib3.BaseHTTPResponse, dest: Path, max_bytes: int,
          deadline: pinned_http.Deadline) -> int:
    """Check `response`, then write its body into `dest` piece by piece; its size in bytes."""
    if response.status >= 400:
        raise JobError("url_fetch_failed", f"{url} answered HTTP {response.status}",
                       retryable=response.status >= 500 or response.status == 429)
    content_type = response.headers.get("Content-Type", "application/octet-stream").split(";")[0].strip().lower()
    if not (content_type.startswith("video/") or content_type == "application/octet-stream"):
        raise JobError("url_not_video", f"{url} is {content_type}, not video/* or application/octet-stream")
    declared = response.headers.get("Content-Length", "")
    if declared.isascii() and declared.isdigit() and int(declared) > max_bytes:  # '²' is isdigit(), no number
        raise input_too_large(f"{url} is {declared} bytes, limit {max_bytes}")
    size = 0
    try:
        with open(dest, "wb") as out:
            while block := response.read1(PIECE_BYTES):  # what has arrived: a trickle cannot hide the deadline
                size += len(block)
                if size > max_bytes:
                    raise input_too_large(f"{url} is over the limit of {max_bytes} bytes")
                if deadline.left() == 0:
                    raise _too_slow(url, deadline)
                out.write(block)
    except (OSError, urllib3.exceptions.HTTPError) as exc:
        if deadline.left() == 0:
            raise _too_slow(url, deadline) from exc
        raise JobError("url_fetch_failed", f"{url}: {type(exc).__name__}: {exc}", retryable=True) from exc
    if deadline.left() == 0:  # the deadline shut the socket: that ended the body
        raise _too_slow(url, deadline)
    return size
