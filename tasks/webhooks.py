"""Completion webhooks: a task of their own (`avsr.deliver_webhook`), retried, signed, SSRF-guarded.

A finished job with a `callback_url` gets one delivery (`enqueue`, once per job): a delivery id and
up to AVSR_WEBHOOK_MAX_ATTEMPTS POSTs of the same body, the n-th retry after about
AVSR_WEBHOOK_BACKOFF_S × 2^(n-1) seconds (±50 % jitter; 10 attempts at 30 s span about 4 hours).
Any 2xx answer is delivered; anything else (or no whole answer within ATTEMPT_S) is retried; redirects
are not followed.

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

import json
import logging
import random
import time
import uuid
from typing import Any

import urllib3

from tasks import jobs, pinned_http
from tasks.settings import get_settings
from tasks.signing import signature

log = logging.getLogger(__name__)

PENDING, DELIVERED, FAILED = "pending", "delivered", "failed"
TIMEOUT_S = 10.0  # connect and each read
ATTEMPT_S = 30.0  # a whole attempt: a receiver that trickles its answer is cut off here
_STATE_KEY = "avsr:job:{}:webhook"


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
    timestamp = str(int(time.time()))
    headers = {"Content-Type": "application/json", "User-Agent": "avsr-pipeline-webhook", "webhook-id": delivery_id,
               "webhook-timestamp": timestamp, "webhook-signature": signature(secret, delivery_id, timestamp, body)}
    with pinned_http.Deadline(ATTEMPT_S) as deadline:
        try:
            response = pinned_http.request("POST", url, host=pinned_http.url_host(url),
                                           allow_private=allow_private, headers=headers, body=body,
                                           timeout=deadline.timeout(5.0, TIMEOUT_S), deadline=deadline)
        except (OSError, urllib3.exceptions.HTTPError) as exc:
            if deadline.left() == 0:  # the deadline shut the socket: that broke the answer
                raise TimeoutError(f"no whole answer within {ATTEMPT_S:g} s") from exc
            raise
        if deadline.left() == 0:  # the deadline shut the socket: that ended the answer
            raise TimeoutError(f"no whole answer within {ATTEMPT_S:g} s")
    return int(response.status)
