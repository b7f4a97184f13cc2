"""Completion webhooks: a task of their own (`avsr.deliver_webhook`), retried, signed, SSRF-guarded.

A finished job with a `callback_url` gets one delivery (`enqueue`, once per job): a delivery id and
up to AVSR_WEBHOOK_MAX_ATTEMPTS POSTs of the same body, the n-th retry after about
AVSR_WEBHOOK_BACKOFF_S × 2^(n-1) seconds (±50 % jitter; 10 attempts at 30 s span about 4 hours).
Any 2xx answer is delivered; anything else (or no answer) is retried; redirects are not followed.

Every POST carries the Standard Webhooks headers (https://www.standardwebhooks.com): `webhook-id`
(the delivery id, the same on every attempt), `webhook-timestamp` and `webhook-signature:
v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`. The key is the tenant's `callback_secret`
or AVSR_CALLBACK_SECRET: a `whsec_<base64>` secret is those bytes, any other its UTF-8 bytes, so
receivers verify with `standardwebhooks.Webhook("whsec_" + base64(secret))`.

SSRF guard: the host is canonicalised (every IPv4 spelling a resolver accepts — `2130706433`,
`127.1`, `0x7f.1` — and IPv6, IPv4-mapped included) and refused at submit when it is not a global
address; at delivery the name is resolved once, every address checked, and the connection goes
to that checked address (Host header and TLS SNI of the name), unless AVSR_CALLBACK_ALLOW_PRIVATE.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import random
import re
import socket
import time
import uuid
from typing import Any
from urllib.parse import urlparse

import urllib3

from tasks import jobs
from tasks.settings import get_settings
from tasks.signing import signature

log = logging.getLogger(__name__)

PENDING, DELIVERED, FAILED = "pending", "delivered", "failed"
TIMEOUT_S = 10.0
_STATE_KEY = "avsr:job:{}:webhook"
_NUMERIC_IPV4 = re.compile(r"^(0x[0-9a-f]*|[0-9]+)(\.(0x[0-9a-f]*|[0-9]+)){0,3}$")


# --- addresses -------------------------------------------------------------------------------

def canonical_host(host: str) -> str:
    """The host as a resolver reads it: IP literals in canonical form (ValueError for a numeric host
    that is no address), names lower-cased without a trailing dot."""
    host = host.strip().lower().rstrip(".")
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    if _NUMERIC_IPV4.match(host):  # inet_aton semantics: what getaddrinfo accepts as an IPv4 literal
        try:
            return socket.inet_ntoa(socket.inet_aton(host))
        except OSError:
            raise ValueError(f"{host!r} is not an IPv4 address") from None
    return host


def _non_global(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return not ip.is_global


def non_global_address(url: str, *, resolve: bool = True) -> str | None:
    """The first non-global address `url`'s host is (or, with `resolve`, resolves to), else None."""
    try:
        host = canonical_host(urlparse(url).hostname or "")
    except ValueError:
        return urlparse(url).hostname
    if host == "localhost" or host.endswith(".localhost"):
        return host
    try:
        return host if _non_global(host) else None
    except ValueError:
        pass
    if not resolve:
        return None
    try:
        addresses = resolve_host(host, 0)
    except OSError:
        return None  # unresolvable: the POST fails on its own
    return next((a for a in addresses if _non_global(a)), None)


def resolve_host(host: str, port: int) -> list[str]:
    """Every address `host` resolves to (an IP literal: itself)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


def state(job_id: str) -> dict[str, Any] | None:
    """`{"status": pending|delivered|failed, "attempts", "delivery_id", ...}` of the job's webhook."""
    raw = jobs.connection().get(_STATE_KEY.format(job_id))
    return json.loads(raw) if raw else None


def _save(job_id: str, value: dict[str, Any]) -> None:
    jobs.connection().set(_STATE_KEY.format(job_id), json.dumps(value), ex=get_settings().job_ttl_s)


def enqueue(job: jobs.Job) -> None:
    """Start the delivery of a finished job's webhook (once per job; no callback_url: nothing)."""
    from tasks import chain

    if not job["request"].get("callback_url") or not jobs.once(job["job_id"], "webhook"):
        return
    _save(job["job_id"], {"status": PENDING, "attempts": 0, "delivery_id": f"msg_{uuid.uuid4().hex}"})
    chain.deliver_webhook(job["job_id"], 1)


def backoff(attempt: int) -> float:
    """Seconds before attempt `attempt + 1`: exponential, ±50 % jitter."""
    return get_settings().webhook_backoff_s * 2 ** (attempt - 1) * random.uniform(0.5, 1.5)


def deliver(job_id: str, attempt: int) -> float | None:
    """Make attempt `attempt` of the job's delivery; returns the delay before the next one, or None
    when it is over (delivered, failed for good, or this attempt was already made: a re-delivery)."""
    current = state(job_id)
    job = jobs.get(job_id)
    if current is None or current["status"] != PENDING or current["attempts"] >= attempt or job is None:
        return None
    settings = get_settings()
    secret = settings.tenant(job.get("tenant", "")).callback_secret
    outcome: dict[str, Any] = {"attempts": attempt, "last_attempt_at": time.time()}
    permanent = False
    if not secret:
        outcome["last_error"], permanent = "no webhook secret is configured", True
    else:
        try:
            outcome["last_status"] = post(job["request"]["callback_url"], payload(job), current["delivery_id"],
                                          secret, settings.callback_allow_private)
        except PermissionError as exc:
            outcome["last_error"], permanent = str(exc), True
        except (OSError, urllib3.exceptions.HTTPError, ValueError) as exc:
            outcome["last_error"] = f"{type(exc).__name__}: {exc}"
    ok = 200 <= outcome.get("last_status", 0) < 300
    final = ok or permanent or attempt >= settings.webhook_max_attempts
    outcome["status"] = DELIVERED if ok else FAILED if final else PENDING
    _save(job_id, {**current, **outcome})
    log.log(logging.INFO if ok else logging.WARNING, "webhook attempt %d: %s", attempt, outcome["status"],
            extra={"job_id": job_id, "http_status": outcome.get("last_status"), "error": outcome.get("last_error")})
    return None if final else backoff(attempt)


def payload(job: jobs.Job) -> bytes:
    body = {"type": f"job.{job['status']}",
            **{k: job.get(k) for k in ("job_id", "status", "result", "error", "created_at", "finished_at")}}
    return json.dumps(body).encode()


def post(url: str, body: bytes, delivery_id: str, secret: str, allow_private: bool) -> int:
    """POST `body` signed to `url`, connecting only to the addresses resolved and checked here; the HTTP status.

    PermissionError when the host is (or resolves to) a non-global address and that is not allowed.
    """
    parsed = urlparse(url)
    host = canonical_host(parsed.hostname or "")
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    addresses = resolve_host(host, port)
    blocked = [a for a in addresses if _non_global(a)]
    if blocked and not allow_private:
        raise PermissionError(f"the callback host resolves to a non-global address ({blocked[0]})")
    timestamp = str(int(time.time()))
    headers = {"Content-Type": "application/json", "Host": parsed.netloc.rsplit("@", 1)[-1],
               "User-Agent": "avsr-pipeline-webhook", "webhook-id": delivery_id, "webhook-timestamp": timestamp,
               "webhook-signature": signature(secret, delivery_id, timestamp, body)}
    path = (parsed.path or "/") + (f"?{parsed.query}" if parsed.query else "")
    for number, address in enumerate(addresses, 1):  # every one was checked; the next if one does not connect
        try:
            return _post_to(address, port, parsed.scheme == "https", host, path, body, headers)
        except urllib3.exceptions.NewConnectionError:
            if number == len(addresses):
                raise
    raise OSError(f"{host} resolves to no address")


def _post_to(address: str, port: int, tls: bool, host: str, path: str, body: bytes, headers: dict[str, str]) -> int:
    """POST to `address` itself (TLS: SNI and certificate check of `host`); the HTTP status."""
    timeout = urllib3.Timeout(connect=5.0, read=TIMEOUT_S)
    pool: urllib3.HTTPConnectionPool
    if tls:
        pool = urllib3.HTTPSConnectionPool(address, port, server_hostname=host, assert_hostname=host,
                                           timeout=timeout, retries=False)
    else:
        pool = urllib3.HTTPConnectionPool(address, port, timeout=timeout, retries=False)
    with pool:
        response = pool.urlopen("POST", path, body=body, headers=headers, redirect=False, retries=False,
                                assert_same_host=False)
        return int(response.status)
