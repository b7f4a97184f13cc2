"""Standard Webhooks signatures (https://www.standardwebhooks.com), shared by the sender
(`tasks/webhooks.py`) and receivers (`avsr_client.verify_webhook`). Standard library only.

A `whsec_<base64>` secret signs with those bytes, any other secret with its UTF-8 bytes.
"""

from __future__ import annotations

import base64
import hashlib
import hmac


def signing_key(secret: str) -> bytes:
    return base64.b64decode(secret[6:]) if secret.startswith("whsec_") else secret.encode()


def signature(secret: str, delivery_id: str, timestamp: str, body: bytes) -> str:
    """`v1,<base64 HMAC-SHA256(key, "{id}.{timestamp}.{body}")>`."""
    message = f"{delivery_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(signing_key(secret), message, hashlib.sha256).digest()).decode()


def verify(body: bytes, delivery_id: str, timestamp: str, header: str, secret: str) -> bool:
    """True when one of the space-separated signatures in `header` signs (id, timestamp, body)."""
    expected = signature(secret, delivery_id, timestamp, body).encode()
    # as bytes: compare_digest raises on a str that is not ASCII
    return any(hmac.compare_digest(candidate.encode(errors="replace"), expected) for candidate in header.split())
