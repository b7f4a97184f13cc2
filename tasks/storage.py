"""S3 access: inputs (frames or a video), intermediate arrays by reference, results.

Every boto3 error is turned into a `JobError`: permanent ones (missing key, access denied)
are not retried, transient ones (network, throttling, 5xx) are marked `retryable`.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import re
import shutil
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import boto3
import numpy as np
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, ConnectionClosedError, ConnectTimeoutError, ReadTimeoutError
from botocore.exceptions import ConnectionError as BotoConnectionError

from tasks.errors import JobError, access_denied, disk_full, input_not_found, input_too_large, transient
from tasks.settings import Settings, get_settings

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")

_NOT_FOUND = {"NoSuchKey", "NoSuchBucket", "404", "NotFound"}
_DENIED = {"AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AllAccessDisabled"}


@dataclass(frozen=True)
class S3Object:
    key: str
    size: int
    etag: str = ""


def work_bucket() -> str:
    """The bucket of intermediate arrays and default results (AVSR_WORK_BUCKET)."""
    return get_settings().work_bucket


def work_key(job_id: str, name: str) -> str:
    """`<work prefix><job id>/<name>`: where a job's intermediate arrays and default results live.

    Under it: `input_plan.json` (prepare), `audio.npz` (`features` float32[T_audio, 104],
    `energy_db` float32[T_audio]), `chunks/NNNN.npz` (`rois` uint8[n, 96, 96], `landmarks`
    float32[n, 68, 2], `detected` bool[n]), `features.npz` (the stitched clip: `rois` uint8[T, 96, 96],
    `audio` float32[T_audio, 104] when it has sound), `result.json/.srt/.vtt`.
    """
    return f"{get_settings().work_prefix}{job_id}/{name}"


def natural_key(text: str) -> list[str | int]:
    """Sort key that orders `frame_2` before `frame_10`: the digit runs (every odd part of the split,
    decimal digits of any script) as numbers, the text between them lower-cased ('²' stays text)."""
    return [int(part) if i % 2 else part.lower() for i, part in enumerate(re.split(r"(\d+)", text))]


@lru_cache(maxsize=4)
def _client(endpoint: str, region: str, key_id: str, secret: str, max_pool: int):
    config = Config(
        retries={"max_attempts": 4, "mode": "standard"},
        max_pool_connections=max(10, max_pool),
        connect_timeout=5,
        read_timeout=60,
        s3={"addressing_style": "path"},
    )
    return boto3.client(
        "s3",
        endpoint_url=endpoint or None,
        region_name=region,
        aws_access_key_id=key_id or None,
        aws_secret_access_key=secret or None,
        config=config,
    )


def s3_client(settings: Settings | None = None):
    """A shared, thread-safe boto3 S3 client for the configured endpoint."""
    s = settings or get_settings()
    return _client(s.s3_endpoint_url, s.s3_region, s.s3_access_key_id, s.s3_secret_access_key,
                   s.s3_max_concurrency)


def classify(error: Exception, what: str) -> JobError:
    """Map a boto3/botocore error onto a permanent or retryable `JobError`."""
    if isinstance(error, JobError):
        return error
    if isinstance(error, ClientError):
        code = str(error.response.get("Error", {}).get("Code", ""))
        status = int(error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        if code in _NOT_FOUND or status == 404:
            return input_not_found(what)
        if code in _DENIED or status == 403:
            return access_denied(what)
        if status >= 500 or code in {"SlowDown", "RequestTimeout", "Throttling", "InternalError"}:
            return transient(f"S3 {code or status} on {what}")
        return JobError("s3_error", f"S3 {code or status} on {what}")
    if isinstance(error, BotoCoreError | ConnectionError | TimeoutError):
        return transient(f"S3 unreachable for {what}: {_unreachable_reason(error)}")
    raise error


def _unreachable_reason(error: Exception) -> str:
    """Why S3 could not be reached, without botocore's message: it names the endpoint URL, an address of
    the service's own network that a job's error must not show its customer."""
    if isinstance(error, ConnectTimeoutError | ReadTimeoutError | TimeoutError):
        return "timed out"
    if isinstance(error, BotoConnectionError | ConnectionClosedError | ConnectionError):
        return "could not connect"
    return type(error).__name__


def list_objects(bucket: str, prefix: str, keep: Callable[[str], bool] | None = None,
                 limit: int | None = None) -> list[S3Object]:
    """Every object under `prefix` whose key `keep` accepts, in natural key order. With `limit`, the
    listing stops with `input_too_large` past `limit` kept objects or `10 * limit` listed ones: a prefix
    of millions of keys would otherwise be listed whole into the worker's memory first."""
    client = s3_client()
    found: list[S3Object] = []
    listed = 0
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            contents = page.get("Contents", [])
            listed += len(contents)
            found.extend(S3Object(o["Key"], int(o["Size"])) for o in contents if keep is None or keep(o["Key"]))
            if limit is not None and (len(found) > limit or listed > 10 * limit):
                raise input_too_large(f"s3://{bucket}/{prefix} holds over {limit} objects, the most an input "
                                      f"within AVSR_MAX_FRAMES can have")
    except Exception as exc:
        raise classify(exc, f"s3://{bucket}/{prefix}") from exc
    return sorted(found, key=lambda o: natural_key(o.key))


def list_frames(bucket: str, prefix: str, limit: int | None = None) -> list[S3Object]:
    """The image objects under `prefix` (frames of a clip), `frame_2` before `frame_10`; at most
    `limit` (see `list_objects`)."""
    return list_objects(bucket, prefix, keep=lambda key: key.lower().endswith(IMAGE_SUFFIXES), limit=limit)


def head(bucket: str, key: str) -> S3Object:
    try:
        meta = s3_client().head_object(Bucket=bucket, Key=key)
    except Exception as exc:
        raise classify(exc, f"s3://{bucket}/{key}") from exc
    return S3Object(key, int(meta["ContentLength"]), meta.get("ETag", ""))


def get_bytes(bucket: str, key: str) -> bytes:
    try:
        return s3_client().get_object(Bucket=bucket, Key=key)["Body"].read()
    except Exception as exc:
        raise classify(exc, f"s3://{bucket}/{key}") from exc


def get_many(bucket: str, keys: list[str], max_workers: int | None = None) -> Iterator[bytes]:
    """Fetch `keys` concurrently, yielding bodies in the order of `keys` (a bounded window in flight)."""
    workers = max_workers or get_settings().s3_max_concurrency
    window = 4 * workers
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="s3get") as pool:
        pending: list[Future[bytes] | None] = [pool.submit(get_bytes, bucket, k) for k in keys[:window]]
        for i in range(len(keys)):
            body = pending[i].result()  # type: ignore[union-attr]  # set to None only after this
            pending[i] = None  # let finished bodies be collected
            if i + window < len(keys):
                pending.append(pool.submit(get_bytes, bucket, keys[i + window]))
            yield body


def download_file(bucket: str, key: str, path: Path, etag: str = "") -> Path:
    """Stream an object to `path`; with `etag`, only that version of it (else `input_changed`)."""
    try:
        response = s3_client().get_object(Bucket=bucket, Key=key, **({"IfMatch": etag} if etag else {}))
        with open(path, "wb") as out:
            shutil.copyfileobj(response["Body"], out, length=1 << 20)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("PreconditionFailed", "412"):
            raise JobError("input_changed", f"s3://{bucket}/{key} changed while the job ran") from exc
        raise classify(exc, f"s3://{bucket}/{key}") from exc
    except Exception as exc:
        raise classify(exc, f"s3://{bucket}/{key}") from exc
    return path


def cached_download(obj: S3Object, bucket: str, max_age_s: float = 3600.0) -> Path:
    """A local copy of one version of an object, shared by the tasks of this host.

    A long video is cut into many preprocessing tasks; each used to fetch the whole file. The
    copy lives in `AVSR_CACHE_DIR` under a name derived from bucket, key and ETag, is fetched
    once under a file lock (prefork children share it), and when a new one is fetched, copies unused
    for `max_age_s` are evicted, then the least recently used until it fits under AVSR_CACHE_MAX_BYTES.
    """
    path = _cache_path(obj, bucket)
    root, name = path.parent, path.name
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not path.exists():
            _evict(root, max_age_s, room=obj.size)
            if shutil.disk_usage(root).free < obj.size:
                raise disk_full(obj.size)
            partial = root / f"{name}.part"
            try:
                download_file(bucket, obj.key, partial, obj.etag)
            except BaseException:
                partial.unlink(missing_ok=True)  # a disk left full would fail every job of this host
                raise
            partial.rename(path)
        path.touch()  # recently used: not evicted while jobs read it
    return path


def _cache_path(obj: S3Object, bucket: str) -> Path:
    root = Path(get_settings().cache_dir or tempfile.gettempdir()) / "avsr-input-cache"
    root.mkdir(parents=True, exist_ok=True)
    return root / hashlib.sha256(f"{bucket}\n{obj.key}\n{obj.etag}".encode()).hexdigest()


def upload_to_cache(local: Path, bucket: str, key: str) -> S3Object:
    """Upload a local file (streamed) and keep it as this host's cached copy of the new object
    (so `cached_download` of it does not fetch it back)."""
    try:
        s3_client().upload_file(str(local), bucket, key)
    except Exception as exc:
        raise classify(exc, f"s3://{bucket}/{key}") from exc
    obj = head(bucket, key)
    local.replace(_cache_path(obj, bucket))
    return obj


def _evict(root: Path, max_age_s: float, room: int) -> None:
    """Remove what is unused for `max_age_s`, then the least recently used copies until `room` more bytes
    fit under AVSR_CACHE_MAX_BYTES and on the disk (never another task's `.part` download or a `.lock`)."""
    cutoff = time.time() - max_age_s
    copies: list[tuple[float, int, Path]] = []
    for entry in root.iterdir():
        with contextlib.suppress(FileNotFoundError):
            stat = entry.stat()
            if stat.st_mtime < cutoff:
                entry.unlink()
            elif "." not in entry.name:  # a whole copy (its name is a bare hash)
                copies.append((stat.st_mtime, stat.st_size, entry))
    held = sum(size for _, size, _ in copies)
    excess = max(held + room - get_settings().cache_max_bytes, room - shutil.disk_usage(root).free)
    for _, size, entry in sorted(copies, key=lambda c: c[0]):
        if excess <= 0:
            break
        with contextlib.suppress(FileNotFoundError):
            entry.unlink()
        excess -= size


def require_bucket(bucket: str) -> None:
    """`output_not_found` unless `bucket` exists: results are never written to a bucket that is not there
    (some S3 servers, SeaweedFS among them, would create it on the first PUT)."""
    try:
        s3_client().head_bucket(Bucket=bucket)
    except ClientError as exc:
        if classify(exc, f"s3://{bucket}").code == "input_not_found":
            raise JobError("output_not_found", f"the output bucket '{bucket}' does not exist") from exc
        raise classify(exc, f"s3://{bucket}") from exc
    except Exception as exc:
        raise classify(exc, f"s3://{bucket}") from exc


def put_bytes(bucket: str, key: str, body: bytes, content_type: str = "application/octet-stream") -> None:
    try:
        s3_client().put_object(Bucket=bucket, Key=key, Body=body, ContentType=content_type)
    except Exception as exc:
        raise classify(exc, f"s3://{bucket}/{key}") from exc


def put_arrays(bucket: str, key: str, **arrays: np.ndarray) -> None:
    """Store named arrays as one uncompressed `.npz` object (what `np.savez` writes; no pickled objects).
    Deflate, even at level 1, kept a third of the bytes of mouth ROIs (5.8 against 8.3 MB an
    800-frame chunk) for 155 ms of CPU writing it and 55 reading it, where storing takes 6 and 4: on a
    long clip, whose chunks are written once and read two to four times (early inference, `assemble`,
    `infer`), that was about a tenth of the CPU worker's time."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as archive:
        for name, array in arrays.items():
            with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asanyarray(array), allow_pickle=False)
    put_bytes(bucket, key, buf.getvalue())


def get_arrays(bucket: str, key: str) -> dict[str, np.ndarray]:
    """Load the arrays stored by `put_arrays` (no pickled objects allowed)."""
    with np.load(io.BytesIO(get_bytes(bucket, key)), allow_pickle=False) as data:
        return {name: data[name] for name in data.files}


def put_json(bucket: str, key: str, value: object) -> None:
    put_bytes(bucket, key, json.dumps(value, indent=2).encode(), "application/json")


def get_json(bucket: str, key: str) -> Any:
    return json.loads(get_bytes(bucket, key))


@lru_cache(maxsize=2)
def _presigner(endpoint: str, region: str, key_id: str, secret: str):
    config = Config(signature_version="s3v4", s3={"addressing_style": "path"})
    return boto3.client("s3", endpoint_url=endpoint or None, region_name=region, aws_access_key_id=key_id or None,
                        aws_secret_access_key=secret or None, config=config)


def presign_put(bucket: str, key: str, *, content_type: str, content_length: int, expires_s: int) -> str:
    """A presigned (SigV4) PUT URL for exactly `content_length` bytes of `content_type` (both signed: S3
    refuses any other length), on the endpoint clients reach (AVSR_S3_PUBLIC_URL, else AVSR_S3_ENDPOINT_URL)."""
    s = get_settings()
    client = _presigner(s.s3_public_url or s.s3_endpoint_url, s.s3_region, s.s3_access_key_id,
                        s.s3_secret_access_key)
    return client.generate_presigned_url(
        "put_object", ExpiresIn=expires_s, HttpMethod="PUT",
        Params={"Bucket": bucket, "Key": key, "ContentType": content_type, "ContentLength": content_length})
