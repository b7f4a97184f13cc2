"""Rate limits (Flask-Limiter, counters in the same Redis): AVSR_RATE_LIMIT per API key on the job
and upload routes, and AVSR_AUTH_FAIL_LIMIT failed authentications per client address. Over a limit: 429
`rate_limited` with Retry-After."""

from __future__ import annotations

import hashlib

from flask import Blueprint, Flask, Response
from flask_limiter import Limiter, RateLimitExceeded
from flask_limiter.util import get_remote_address

from api.auth import presented_key
from api.errors import error_response
from tasks.settings import Settings, redis_sentinel

# A limit check that waits longer is not worth it: past 2 s the request goes on unlimited (swallow_errors).
_TIMEOUTS: dict[str, str | int] = {"socket_connect_timeout": 2, "socket_timeout": 2}


def _client() -> str:
    """The API key presented (hashed), else the client address."""
    key = presented_key()
    return "key:" + hashlib.sha256(key.encode()).hexdigest()[:32] if key else "addr:" + get_remote_address()


def storage_uri(settings: Settings) -> str:
    """The `limits` storage URI of AVSR_REDIS_URL (its `redis+sentinel://h1:p1,h2:p2/master` form)."""
    sentinel = redis_sentinel(settings.redis_url, settings.redis_sentinel_master)
    if sentinel is None:
        return settings.redis_url
    hosts = ",".join(f"{host}:{port}" for host, port in sentinel.sentinels)
    return f"redis+sentinel://{hosts}/{sentinel.master_name}"


def init_limits(app: Flask, settings: Settings, *limited: Blueprint) -> Limiter:
    """Limit the routes of the `limited` blueprints and answer a breach with the service's error shape."""
    limiter = Limiter(_client, app=app, storage_uri=storage_uri(settings), storage_options=dict(_TIMEOUTS),
                      strategy="fixed-window", headers_enabled=True, swallow_errors=True, key_prefix="avsr")
    # Shared: one counter per client across every route of every limited blueprint.
    requests = limiter.shared_limit(settings.rate_limit, scope="requests")
    auth_failures = limiter.shared_limit(settings.auth_fail_limit, key_func=get_remote_address, scope="auth-failures",
                                         deduct_when=lambda response: response.status_code == 401)
    for blueprint in limited:
        requests(blueprint)
        auth_failures(blueprint)

    @app.errorhandler(RateLimitExceeded)
    def _rate_limited(exc: RateLimitExceeded) -> tuple[Response, int]:
        return error_response("rate_limited", f"rate limit exceeded ({exc.description}); retry later")

    return limiter
