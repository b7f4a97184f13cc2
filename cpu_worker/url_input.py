"""URL inputs: a video fetched over http(s) by `prepare`, with the webhooks' SSRF guard.

Every hop (redirects are followed by hand, at most 5) must resolve to global addresses unless
AVSR_URL_ALLOW_PRIVATE; the body is streamed to disk with a byte cap (AVSR_MAX_INPUT_BYTES) and a
wall-clock limit (AVSR_URL_TIMEOUT_S; 30 s without a byte); the content type must be video/* or
application/octet-stream (or absent). Failures are the documented job codes `url_not_allowed`,
`url_fetch_failed` (retried when the server or network failed), `url_not_video`, `input_too_large`.
"""

from __future__ import annotations

import time
from pathlib import Path
from urllib.parse import urljoin, urlparse

import requests

from tasks.errors import JobError, input_too_large
from tasks.webhooks import non_global_address

MAX_REDIRECTS = 5
CONNECT_TIMEOUT_S, READ_TIMEOUT_S = 10.0, 30.0


def _check(url: str, allow_private: bool) -> None:
    if urlparse(url).scheme not in ("http", "https"):
        raise JobError("url_not_allowed", f"{url} is not an http(s) URL")
    if not allow_private and (address := non_global_address(url)):
        raise JobError("url_not_allowed", f"{url} resolves to a non-global address ({address})")


def _open(url: str, allow_private: bool) -> requests.Response:
    """The final response of `url`, redirects followed by hand (each target checked)."""
    for _ in range(MAX_REDIRECTS + 1):
        _check(url, allow_private)
        try:
            response = requests.get(url, stream=True, allow_redirects=False,
                                    timeout=(CONNECT_TIMEOUT_S, READ_TIMEOUT_S),
                                    headers={"Accept": "video/*, application/octet-stream"})
        except requests.RequestException as exc:
            raise JobError("url_fetch_failed", f"{url}: {type(exc).__name__}: {exc}", retryable=True) from exc
        if response.is_redirect and "Location" in response.headers:
            response.close()
            url = urljoin(url, response.headers["Location"])
            continue
        return response
    raise JobError("url_fetch_failed", f"more than {MAX_REDIRECTS} redirects")


def fetch(url: str, dest: Path, *, max_bytes: int, timeout_s: float, allow_private: bool) -> int:
    """Stream the video at `url` into `dest`; its size in bytes."""
    deadline = time.monotonic() + timeout_s
    with _open(url, allow_private) as response:
        if response.status_code >= 400:
            raise JobError("url_fetch_failed", f"{url} answered HTTP {response.status_code}",
                           retryable=response.status_code >= 500 or response.status_code == 429)
        content_type = response.headers.get("Content-Type", "application/octet-stream").split(";")[0].strip().lower()
        if not (content_type.startswith("video/") or content_type == "application/octet-stream"):
            raise JobError("url_not_video", f"{url} is {content_type}, not video/* or application/octet-stream")
        declared = response.headers.get("Content-Length", "")
        if declared.isdigit() and int(declared) > max_bytes:
            raise input_too_large(f"{url} is {declared} bytes, limit {max_bytes}")
        size = 0
        try:
            with open(dest, "wb") as out:
                for block in response.iter_content(1 << 20):
                    size += len(block)
                    if size > max_bytes:
                        raise input_too_large(f"{url} is over the limit of {max_bytes} bytes")
                    if time.monotonic() > deadline:
                        raise JobError("url_fetch_failed", f"{url} took longer than {timeout_s:g} s")
                    out.write(block)
        except requests.RequestException as exc:
            raise JobError("url_fetch_failed", f"{url}: {type(exc).__name__}: {exc}", retryable=True) from exc
    return size
