"""Completion webhooks: POSTed once per job, HMAC-signed, never to private addresses by default.

Receivers verify `X-AVSR-Signature: sha256=HMAC(AVSR_CALLBACK_SECRET, "<X-AVSR-Timestamp>.<body>")`.
A `callback_url` whose host resolves to a loopback, private, link-local (cloud metadata) or other
non-global address is refused unless `AVSR_CALLBACK_ALLOW_PRIVATE` is set: the service must not
become a way to reach its own network (SSRF).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import logging
import socket
import time
from urllib.parse import urlparse

import requests

from tasks import jobs
from tasks.settings import get_settings

log = logging.getLogger(__name__)


def sign(body: bytes, timestamp: str, secret: str) -> str:
    """`sha256=<hex>` HMAC of `<timestamp>.<body>` (what receivers verify)."""
    return "sha256=" + hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()


def non_global_address(url: str, *, resolve: bool = True) -> str | None:
    """The first non-global address `url`'s host is (or, with `resolve`, resolves to), else None."""
    host = urlparse(url).hostname or ""
    try:
        candidates = [ipaddress.ip_address(host)]
    except ValueError:
        if host.lower() == "localhost" or host.lower().endswith(".localhost"):
            return host
        if not resolve:
            return None
        try:
            infos = socket.getaddrinfo(host, None)
        except socket.gaierror:
            return None  # unresolvable: the POST fails on its own
        candidates = [ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos]
    for address in candidates:
        if not address.is_global:
            return str(address)
    return None


def notify(job: dict) -> None:
    """POST the finished job to its `callback_url`, HMAC-signed, once per job; never raises."""
    url = job["request"].get("callback_url")
    if not url or not jobs.once(job["job_id"], "webhook"):
        return
    settings = get_settings()
    blocked = None if settings.callback_allow_private else non_global_address(url)
    if blocked:
        log.warning("webhook refused: %s resolves to non-global address %s", url, blocked)
        return
    payload = {k: job.get(k) for k in ("job_id", "status", "result", "error", "created_at", "finished_at")}
    body = json.dumps(payload).encode()
    timestamp = str(int(time.time()))
    headers = {"Content-Type": "application/json", "X-AVSR-Timestamp": timestamp, "X-AVSR-Job-Id": job["job_id"]}
    if settings.callback_secret:
        headers["X-AVSR-Signature"] = sign(body, timestamp, settings.callback_secret)
    for attempt in range(3):
        try:
            response = requests.post(url, data=body, headers=headers, timeout=10, allow_redirects=False)
            if response.status_code < 500:
                return
        except requests.RequestException as exc:
            log.warning("webhook attempt %d failed: %s", attempt + 1, exc)
        time.sleep(2 ** attempt)
    log.error("webhook %s gave up after 3 attempts", url)
