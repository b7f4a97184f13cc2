"""Settings: read from the environment in one place, documented in the README table."""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

from tasks.settings import Settings

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_table_lists_every_setting_with_its_default():
    text = README.read_text()
    table = text[text.index("<!-- settings-table:start -->"):text.index("<!-- settings-table:end -->")]
    rows = dict(re.findall(r"^\| `([A-Z0-9_]+)` \| `([^`]*)` \|", table, flags=re.M))
    expected = {}
    for f in fields(Settings):
        default = ",".join(f.default) if isinstance(f.default, tuple) else str(f.default)
        expected[f.metadata["env"]] = default
    assert rows == expected


def test_from_env_parses_each_kind(monkeypatch):
    monkeypatch.setenv("AVSR_ALLOWED_BUCKETS", " a, b ,,c ")
    monkeypatch.setenv("AVSR_MAX_FRAMES", "42")
    monkeypatch.setenv("AVSR_PREDICT_TIMEOUT_S", "1.5")
    monkeypatch.setenv("AVSR_LOG_JSON", "no")
    monkeypatch.setenv("AVHUBERT_MODEL_PATH", "/m.pt")
    s = Settings.from_env()
    assert s.allowed_buckets == ("a", "b", "c")
    assert (s.max_frames, s.predict_timeout_s, s.log_json, s.model_path) == (42, 1.5, False, "/m.pt")


def test_defaults_without_environment(monkeypatch):
    for env in Settings.environment_variables():
        monkeypatch.delenv(env, raising=False)
    assert Settings.from_env() == Settings()
