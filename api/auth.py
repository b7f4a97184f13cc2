"""API keys and tenants: `Authorization: Bearer <key>` or `X-API-Key: <key>` names the tenant.

Keys are known by their SHA-256 digests (`tasks.settings.Tenant`) and compared in constant time
against every configured digest, so timing reveals neither which key matched nor how much of it.
"""

from __future__ import annotations

import hmac

from flask import g, request

from api.errors import ApiError
from tasks.settings import Settings, Tenant, key_hash


def presented_key() -> str | None:
    header = request.headers.get("Authorization", "")
    if header[:7].lower() == "bearer ":
        return header[7:].strip()
    return request.headers.get("X-API-Key")


def resolve_tenant(settings: Settings, key: str | None) -> Tenant:
    """The tenant whose key is `key` (no tenants configured: auth is off, the default tenant); else 401."""
    if not settings.tenants:
        return settings.default_tenant()
    if not key:
        raise ApiError("unauthorized", "missing API key (Authorization: Bearer or X-API-Key)")
    digest = key_hash(key).encode()
    found: Tenant | None = None
    for tenant in settings.tenants:  # every digest is compared: no early exit
        for candidate in tenant.key_hashes:
            if hmac.compare_digest(digest, candidate.encode()) and found is None:
                found = tenant
    if found is None:
        raise ApiError("unauthorized", "invalid API key")
    return found


def authenticate(settings: Settings) -> Tenant:
    """Resolve the request's tenant into `flask.g.tenant` (401 unless a configured key was presented)."""
    g.tenant = resolve_tenant(settings, presented_key())
    return g.tenant


def current_tenant() -> Tenant:
    return g.tenant
