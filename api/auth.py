"""API keys: `Authorization: Bearer <key>` or `X-API-Key: <key>`, compared in constant time."""

from __future__ import annotations

import hmac

from flask import request

from api.errors import ApiError


def presented_key() -> str | None:
    header = request.headers.get("Authorization", "")
    if header[:7].lower() == "bearer ":
        return header[7:].strip()
    return request.headers.get("X-API-Key")


def require_api_key(accepted: tuple[str, ...]) -> None:
    """Raise 401 unless a configured key was presented (no keys configured: auth is off)."""
    if not accepted:
        return
    key = presented_key()
    if not key:
        raise ApiError("unauthorized", "missing API key (Authorization: Bearer or X-API-Key)")
    # Compare against every key so timing does not reveal which one (or how much) matched.
    matched = False
    for candidate in accepted:
        matched |= hmac.compare_digest(key.encode(), candidate.encode())
    if not matched:
        raise ApiError("unauthorized", "invalid API key")
