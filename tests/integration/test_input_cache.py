"""A host fetches an input video once for all its preprocessing tasks, and only the version the
job started with (real SeaweedFS S3)."""

from __future__ import annotations

import os
import shutil
import time

import pytest

from tasks import storage
from tasks.errors import JobError
from tasks.settings import get_settings
from tasks.stage_task import as_job_error

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


def test_the_cache_keeps_under_its_size_evicting_the_least_recently_used(s3, s3_settings, monkeypatch):
    monkeypatch.setenv("AVSR_CACHE_MAX_BYTES", "25000")
    get_settings.cache_clear()
    paths = []
    for i in range(3):
        s3.put_object(Bucket=INPUT_BUCKET, Key=f"cache/size-{i}.mp4", Body=bytes([i]) * 10_000)
        paths.append(storage.cached_download(storage.head(INPUT_BUCKET, f"cache/size-{i}.mp4"), INPUT_BUCKET))
        recent = time.time() - 100 + 10 * i  # fetched in this order
        os.utime(paths[-1], (recent, recent))
    assert [p.exists() for p in paths] == [False, True, True]  # 30 kB would be over 25 kB: the oldest went
    storage.cached_download(storage.head(INPUT_BUCKET, "cache/size-1.mp4"), INPUT_BUCKET)  # used again
    partial = s3_settings / ("f" * 64 + ".part")  # another task's download in progress is never removed
    partial.write_bytes(b"p" * 10_000)
    s3.put_object(Bucket=INPUT_BUCKET, Key="cache/size-3.mp4", Body=b"3" * 10_000)
    storage.cached_download(storage.head(INPUT_BUCKET, "cache/size-3.mp4"), INPUT_BUCKET)
    assert [p.exists() for p in paths] == [False, True, False] and partial.exists()
    assert sum(p.stat().st_size for p in s3_settings.iterdir() if "." not in p.name) <= 25_000


def test_a_full_disk_fails_insufficient_storage_and_leaves_no_partial_download(s3, s3_settings):
    s3.put_object(Bucket=INPUT_BUCKET, Key="cache/full.mp4", Body=b"f" * 10_000)
    obj = storage.head(INPUT_BUCKET, "cache/full.mp4")
    partial = storage._cache_path(obj, INPUT_BUCKET).with_suffix(".part")
    partial.symlink_to("/dev/full")  # every write to it fails ENOSPC, as on a full disk
    with pytest.raises(OSError) as info:
        storage.cached_download(obj, INPUT_BUCKET, max_age_s=1e12)  # (/dev/full is older than an hour)
    error = as_job_error(info.value)  # what the stage fails the job with
    assert (error.code, error.retryable) == ("insufficient_storage", True)
    assert str(s3_settings) not in error.message
    assert not partial.exists() and not partial.is_symlink()  # removed: it would keep the disk full
    assert storage.cached_download(obj, INPUT_BUCKET).read_bytes() == b"f" * 10_000  # room again: fetched


def test_copies_are_evicted_to_make_room_on_the_disk_and_an_input_that_cannot_fit_is_not_fetched(
        s3, s3_settings, monkeypatch):
    disk = 30_000  # the cache's disk, whatever else the filesystem holds

    def usage(path):
        used = sum(p.stat().st_size for p in s3_settings.iterdir() if p.is_file())
        return shutil._ntuple_diskusage(disk, used, disk - used)

    monkeypatch.setattr(storage.shutil, "disk_usage", usage)
    paths = []
    for i in range(2):
        s3.put_object(Bucket=INPUT_BUCKET, Key=f"cache/disk-{i}.mp4", Body=bytes([i]) * 10_000)
        paths.append(storage.cached_download(storage.head(INPUT_BUCKET, f"cache/disk-{i}.mp4"), INPUT_BUCKET))
        recent = time.time() - 100 + 10 * i
        os.utime(paths[-1], (recent, recent))
    s3.put_object(Bucket=INPUT_BUCKET, Key="cache/disk-big.mp4", Body=b"b" * 15_000)
    big = storage.cached_download(storage.head(INPUT_BUCKET, "cache/disk-big.mp4"), INPUT_BUCKET)
    assert big.stat().st_size == 15_000 and [p.exists() for p in paths] == [False, True]  # the older made room

    s3.put_object(Bucket=INPUT_BUCKET, Key="cache/disk-huge.mp4", Body=b"h" * 40_000)
    with pytest.raises(JobError) as info:
        storage.cached_download(storage.head(INPUT_BUCKET, "cache/disk-huge.mp4"), INPUT_BUCKET)
    assert info.value.code == "insufficient_storage" and "40000 bytes" in info.value.message
    assert not any(p.name.endswith(".part") for p in s3_settings.iterdir())


def test_listing_a_frame_prefix_stops_past_its_limit(s3, s3_settings):
    for i in range(30):
        s3.put_object(Bucket=INPUT_BUCKET, Key=f"many/frame_{i}.png", Body=b"x")
        s3.put_object(Bucket=INPUT_BUCKET, Key=f"many/notes_{i}.txt", Body=b"x")
    assert len(storage.list_frames(INPUT_BUCKET, "many/", limit=30)) == 30
    for limit in (29, 5):  # too many frames; then too many objects of any kind (over 10 x 5)
        with pytest.raises(JobError) as info:
            storage.list_frames(INPUT_BUCKET, "many/", limit=limit)
        assert info.value.code == "input_too_large" and f"over {limit} objects" in info.value.message


def test_a_frame_job_over_the_frame_limit_is_refused_from_its_listing(s3, s3_settings, monkeypatch):
    from cpu_worker import stages

    monkeypatch.setenv("AVSR_MAX_FRAMES", "10")
    get_settings.cache_clear()
    for i in range(60):
        s3.put_object(Bucket=INPUT_BUCKET, Key=f"long/frame_{i}.png", Body=b"x")
    source = {"type": "frames", "bucket": INPUT_BUCKET, "prefix": "long/", "fps": 50.0}
    with pytest.raises(JobError) as info:
        stages._prepare_frames(source, {"modality": "video"})
    assert info.value.code == "input_too_large" and "over 23 objects" in info.value.message  # ceil((10+1)*50/25)+1
