"""Webhook signatures are Standard Webhooks: the `standardwebhooks` library verifies them."""

from __future__ import annotations

import base64
import time

import pytest
from standardwebhooks import Webhook, WebhookVerificationError

from tasks.pinned_http import canonical_host
from tasks.signing import signature


@pytest.mark.parametrize("secret", ["webhook-secret", "whsec_" + base64.b64encode(b"\x00raw key bytes").decode()])
def test_signatures_verify_with_the_standard_library(secret):
    body, delivery_id, timestamp = b'{"job_id": "abc", "status": "succeeded"}', "msg_1", str(int(time.time()))
    headers = {"webhook-id": delivery_id, "webhook-timestamp": timestamp,
               "webhook-signature": signature(secret, delivery_id, timestamp, body)}
    receiver_secret = secret if secret.startswith("whsec_") else "whsec_" + base64.b64encode(secret.encode()).decode()
    verifier = Webhook(receiver_secret)
    assert verifier.verify(body, headers) == {"job_id": "abc", "status": "succeeded"}
    with pytest.raises(WebhookVerificationError):
        verifier.verify(body + b" ", headers)


@pytest.mark.parametrize(("host", "canonical"), [
    ("2130706433", "127.0.0.1"), ("127.1", "127.0.0.1"), ("0x7f.1", "127.0.0.1"), ("0177.0.0.01", "127.0.0.1"),
    ("::ffff:127.0.0.1", "::ffff:7f00:1"), ("Example.ORG.", "example.org"), ("8.8.8.8", "8.8.8.8"),
])
def test_hosts_are_canonicalised_as_a_resolver_reads_them(host, canonical):
    assert canonical_host(host) == canonical
