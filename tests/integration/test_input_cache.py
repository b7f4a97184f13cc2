"""A host fetches an input video once for all its preprocessing tasks, and only the version the
job started with (real SeaweedFS S3)."""

from __future__ import annotations

import os
import time

import pytest

from tasks import storage
from tasks.errors import JobError
from tasks.settings import get_settings

from .conftest import INPUT_BUCKET

pytestmark = pytest.mark.integration


@pytest.fixture
def s3_settings(stack, monkeypatch, tmp_path):
    for name, value in stack.config.env().items():
        if name.startswith(("AVSR_", "AWS_")):
            monkeypatch.setenv(name, value)
    monkeypatch.setenv("AVSR_CACHE_DIR", str(tmp_path))
    get_settings.cache_clear()
    storage._client.cache_clear()
    yield tmp_path / "avsr-input-cache"
    get_settings.cache_clear()


def test_one_fetch_per_version_and_eviction(s3, s3_settings):
    s3.put_object(Bucket=INPUT_BUCKET, Key="cache/talk.mp4", Body=b"version one" * 1000)
    first = storage.head(INPUT_BUCKET, "cache/talk.mp4")
    path = storage.cached_download(first, INPUT_BUCKET)
    inode = path.stat().st_ino
    assert path.read_bytes() == b"version one" * 1000
    assert storage.cached_download(first, INPUT_BUCKET).stat().st_ino == inode  # not fetched again

    s3.put_object(Bucket=INPUT_BUCKET, Key="cache/talk.mp4", Body=b"version two" * 1000)
    path.unlink()  # force a fetch of the old version: S3 must refuse it
    with pytest.raises(JobError) as info:
        storage.cached_download(first, INPUT_BUCKET)
    assert info.value.code == "input_changed"

    second = storage.head(INPUT_BUCKET, "cache/talk.mp4")
    newer = storage.cached_download(second, INPUT_BUCKET)
    assert newer.read_bytes() == b"version two" * 1000
    old = time.time() - 7200
    os.utime(newer, (old, old))
    s3.put_object(Bucket=INPUT_BUCKET, Key="cache/other.mp4", Body=b"x")
    storage.cached_download(storage.head(INPUT_BUCKET, "cache/other.mp4"), INPUT_BUCKET)
    assert not newer.exists()  # unused for an hour: evicted when another copy was fetched
