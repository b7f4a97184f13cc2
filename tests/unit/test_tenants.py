"""Tenants: AVSR_TENANTS and AVSR_API_KEYS parsed into tenants; a key resolves to its tenant."""

from __future__ import annotations

import hashlib

import pytest
from flask import Flask

from api.auth import resolve_tenant
from api.errors import ApiError
from tasks.settings import Settings

TENANTS = ('{"acme": {"keys": ["acme-key", "sha256:' + hashlib.sha256(b"acme-2").hexdigest() + '"], '
           '"read_buckets": ["acme-in"], "write_buckets": ["acme-out"], "callback_secret": "acme-s"}, '
           '"globex": {"keys": ["globex-key"]}}')


def test_tenants_from_both_settings():
    settings = Settings(tenants_json=TENANTS, api_keys=("plain-1", "plain-2"), allowed_buckets=("in",),
                        output_buckets=("out",), callback_secret="global-s")
    ids = [t.id for t in settings.tenants]
    assert ids[:2] == ["acme", "globex"] and len(ids) == 4 and ids[2] != ids[3]
    acme, globex, plain = settings.tenant("acme"), settings.tenant("globex"), settings.tenants[2]
    assert (acme.read_buckets, acme.write_buckets, acme.callback_secret) == (("acme-in",), ("acme-out",), "acme-s")
    assert (globex.read_buckets, globex.write_buckets, globex.callback_secret) == (("in",), ("out",), "global-s")
    assert (plain.read_buckets, plain.write_buckets) == (("in",), ("out",))
    assert plain.id == Settings(api_keys=("plain-1",)).tenants[0].id  # stable: job records name it


def test_a_key_resolves_to_its_tenant():
    settings = Settings(tenants_json=TENANTS, api_keys=("plain-1",))
    with Flask(__name__).test_request_context():
        assert resolve_tenant(settings, "acme-key").id == "acme"
        assert resolve_tenant(settings, "acme-2").id == "acme"  # configured by its hash
        assert resolve_tenant(settings, "globex-key").id == "globex"
        assert resolve_tenant(settings, "plain-1").id.startswith("key-")
        for bad in (None, "", "acme-key ", "nope", "\ud800"):
            with pytest.raises(ApiError) as info:
                resolve_tenant(settings, bad)
            assert info.value.code == "unauthorized"
    assert resolve_tenant(Settings(), None).id == "default"  # no keys at all: auth off


@pytest.mark.parametrize("raw", ['[1]', '{"a": {}}', '{"a": {"keys": []}}', '{"a": {"keys": ["k"], "x": 1}}',
                                 '{"a": {"keys": [""]}}', "{not json"])
def test_malformed_tenants_fail_at_start_up(raw):
    with pytest.raises(ValueError):
        Settings(tenants_json=raw)


def test_predict_slots_keep_room_for_other_tenants():
    from api.jobs import PredictSlots

    slots = PredictSlots(limit=4, per_tenant=2)
    assert [slots.acquire("a") for _ in range(3)] == [True, True, False]  # a's share is full
    assert [slots.acquire("b") for _ in range(3)] == [True, True, False]
    assert not slots.acquire("c")  # all four held
    slots.release("a")
    assert not slots.acquire("b") and slots.acquire("c")
    for tenant in ("a", "b", "b", "c"):
        slots.release(tenant)
    assert [slots.acquire("a") for _ in range(3)] == [True, True, False]


def test_health_shows_no_model_path_or_error_message():
    from api.ops import _public

    shown = _public({"checkpoint": "s3://acme-models/private/avsr/finetune.pt", "kind": "seq2seq",
                     "model_error": "FileNotFoundError: [Errno 2] No such file: '/srv/secret/finetune.pt'"})
    assert shown["checkpoint"] == "finetune.pt" and shown["kind"] == "seq2seq"
    assert shown["model_error"].startswith("FileNotFoundError") and "/srv" not in shown["model_error"]
    assert _public({"checkpoint": None, "model_error": None}) == {"checkpoint": None, "model_error": None}


def test_an_open_tenant_cannot_read_or_write_another_tenants_buckets():
    from api.validation import parse_job_request

    settings = Settings(tenants_json=TENANTS)  # globex lists no buckets: it reads any other bucket
    acme, globex = settings.tenant("acme"), settings.tenant("globex")

    def submit(tenant, bucket, output=None):
        body = {"s3_bucket": bucket, "s3_key": "talk.mp4", **({"output": output} if output else {})}
        return parse_job_request(body, settings, tenant=tenant)

    assert submit(acme, "acme-in")["input"]["bucket"] == "acme-in"
    assert submit(globex, "globex-media")["input"]["bucket"] == "globex-media"
    for bucket in ("acme-in", "acme-out", settings.work_bucket):  # acme's (read or write) and the work bucket
        with pytest.raises(ApiError) as info:
            submit(globex, bucket)
        assert info.value.code == "bucket_not_allowed"
    with pytest.raises(ApiError) as info:
        submit(globex, "globex-media", {"s3_bucket": "acme-out", "s3_prefix": "x/"})
    assert info.value.code == "bucket_not_allowed"
    with pytest.raises(ApiError) as info:  # a listed tenant reads only its list
        submit(acme, "globex-media")
    assert info.value.code == "bucket_not_allowed"
