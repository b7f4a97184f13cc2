"""`make up` takes its API keys and tenants from the environment (two tenants locally)."""

from __future__ import annotations

from deploy.local.stack import StackConfig, config_from_env
from tasks.settings import Settings


def test_make_up_honours_api_keys_and_tenants(monkeypatch):
    monkeypatch.setenv("AVSR_API_KEYS", "key-a,key-b")
    monkeypatch.setenv("AVSR_TENANTS", '{"acme": {"keys": ["acme-key"]}}')
    env = config_from_env().env()
    assert (env["AVSR_API_KEYS"], env["AVSR_TENANTS"]) == ("key-a,key-b", '{"acme": {"keys": ["acme-key"]}}')
    for name in ("AVSR_API_KEYS", "AVSR_TENANTS"):
        monkeypatch.setenv(name, env[name])
    assert len(Settings.from_env().tenants) == 3


def test_make_up_defaults_to_the_local_dev_key(monkeypatch):
    monkeypatch.delenv("AVSR_API_KEYS", raising=False)
    monkeypatch.delenv("AVSR_TENANTS", raising=False)
    env = config_from_env().env()
    assert env["AVSR_API_KEYS"] == StackConfig.api_key == "local-dev-key" and env["AVSR_TENANTS"] == ""
