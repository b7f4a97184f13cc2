"""Turn a `POST /v1/jobs` body into the job request the pipeline runs, or a 4xx `ApiError`.

The request stored with the job is a `tasks.records.JobRequest`.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlparse

from api.errors import ApiError
from tasks.jobs import is_job_id
from tasks.records import FPS, FramesInput, JobRequest, OutputLocation, UrlInput, VideoInput
from tasks.settings import Settings
from tasks.webhooks import non_global_address

MODALITIES = ("auto", "video", "audio", "audiovisual")
JOB_FIELDS = {"s3_bucket", "s3_prefix", "s3_key", "fps", "modality", "beam_size", "output", "callback_url",
              "upload_id", "url"}
S3_INPUT_FIELDS = ("s3_bucket", "s3_prefix", "s3_key", "fps")
UPLOAD_ID = re.compile(r"^[0-9a-f]{32}$")
MAX_BEAM = 50
_BUCKET = re.compile(r"^(?!\d+\.\d+\.\d+\.\d+$)[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


def bad(code: str, message: str) -> ApiError:
    return ApiError(code, message)


def _string(body: dict, name: str, *, required: bool = False, max_len: int = 1024) -> str | None:
    value = body.get(name)
    if value is None:
        if required:
            raise bad("missing_field", f"'{name}' is required")
        return None
    if not isinstance(value, str):
        raise bad("invalid_field", f"'{name}' must be a string")
    if len(value) > max_len or "\x00" in value:
        raise bad("invalid_field", f"'{name}' is too long or holds a NUL character")
    return value


def _bucket(body: dict, name: str, settings: Settings) -> str:
    bucket = _string(body, name, required=True, max_len=63) or ""
    if not _BUCKET.match(bucket):
        raise bad("invalid_bucket", f"'{bucket}' is not a valid S3 bucket name")
    if settings.allowed_buckets and bucket not in settings.allowed_buckets:
        raise bad("bucket_not_allowed", f"bucket '{bucket}' is not on this service's allow-list")
    return bucket


def _number(body: dict, name: str, default: float, low: float, high: float, integer: bool = False) -> float:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or (integer and not isinstance(value, int)):
        raise bad("invalid_field", f"'{name}' must be {'an integer' if integer else 'a number'}")
    if not low <= value <= high:
        raise bad("invalid_field", f"'{name}' must be between {low:g} and {high:g}")
    return value


def parse_job_request(body: Any, settings: Settings, *, legacy: bool = False) -> JobRequest:
    """Validate a job submission (`legacy`: the `/predict` body, frames only)."""
    if not isinstance(body, dict):
        raise bad("invalid_json", "the body must be a JSON object")
    unknown = sorted(set(body) - JOB_FIELDS)
    if unknown:
        raise bad("unknown_field", f"unknown field(s): {', '.join(unknown)}")
    source = _upload_input(body, settings, legacy) or _url_input(body, settings, legacy) or _s3_input(
        body, settings, legacy)
    modality = body.get("modality", "auto")
    if modality not in MODALITIES:
        raise bad("invalid_field", f"'modality' must be one of {', '.join(MODALITIES)}")
    request: JobRequest = {
        "input": source,
        "modality": modality,
        "beam_size": int(_number(body, "beam_size", settings.beam_size, 1, MAX_BEAM, integer=True)),
        "output": _output(body.get("output"), settings),
        "callback_url": _callback(body.get("callback_url"), settings.callback_allow_private),
    }
    return request


def _s3_input(body: dict, settings: Settings, legacy: bool) -> FramesInput | VideoInput:
    bucket = _bucket(body, "s3_bucket", settings)
    prefix, key = _string(body, "s3_prefix"), _string(body, "s3_key")
    if (prefix is None) == (key is None) or (legacy and key is not None):
        raise bad("invalid_input", "give exactly one of 's3_prefix' (frames) or 's3_key' (a video)"
                  if not legacy else "'/predict' takes 's3_bucket' and 's3_prefix'")
    if key is not None:
        if not key or key.endswith("/"):
            raise bad("invalid_input", "'s3_key' must name an object")
        if "fps" in body:
            raise bad("invalid_field", "'fps' applies to frame sequences; a video carries its own timing")
        return {"type": "video", "bucket": bucket, "key": key}
    return {"type": "frames", "bucket": bucket, "prefix": prefix or "",
            "fps": float(_number(body, "fps", FPS, 1.0, 120.0))}


def _only_input(body: dict, name: str, legacy: bool) -> None:
    """`name` is the job's one input: no S3 fields beside it, and not on `/predict`."""
    others = [f for f in (*S3_INPUT_FIELDS, "upload_id", "url") if f in body and f != name]
    if legacy or others:
        raise bad("invalid_input", f"'{name}' is the job's input: drop {', '.join(others)}" if others
                  else "'/predict' takes 's3_bucket' and 's3_prefix'")


def _upload_input(body: dict, settings: Settings, legacy: bool) -> VideoInput | None:
    """`{"upload_id"}`: a video uploaded through `POST /v1/uploads` (in the work bucket)."""
    if "upload_id" not in body:
        return None
    _only_input(body, "upload_id", legacy)
    upload_id = body["upload_id"]
    if not isinstance(upload_id, str) or not UPLOAD_ID.match(upload_id):
        raise bad("invalid_field", "'upload_id' must be an id returned by POST /v1/uploads")
    return {"type": "video", "bucket": settings.work_bucket, "key": upload_key(upload_id)}


def upload_key(upload_id: str) -> str:
    """Where an upload's bytes go in the work bucket."""
    return f"uploads/{upload_id}/video"


def _url_input(body: dict, settings: Settings, legacy: bool) -> UrlInput | None:
    """`{"url"}`: a video the CPU worker fetches (http(s), global addresses unless AVSR_URL_ALLOW_PRIVATE)."""
    if "url" not in body:
        return None
    _only_input(body, "url", legacy)
    url = _string(body, "url", max_len=2048) or ""
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise bad("url_not_allowed", "'url' must be an http(s) URL")
    if not settings.url_allow_private and (address := non_global_address(url, resolve=False)):
        raise bad("url_not_allowed", f"'url' points at a non-global address ({address})")
    return {"type": "url", "url": url}


def _output(value: Any, settings: Settings) -> OutputLocation | None:
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) - {"s3_bucket", "s3_prefix"}:
        raise bad("invalid_field", "'output' must be {\"s3_bucket\", \"s3_prefix\"}")
    return {"bucket": _bucket(value, "s3_bucket", settings), "prefix": _string(value, "s3_prefix") or ""}


def _callback(value: Any, allow_private: bool) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > 2048:
        raise bad("invalid_field", "'callback_url' must be a URL string")
    parsed = urlparse(value)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise bad("invalid_field", "'callback_url' must be an http(s) URL")
    if not allow_private and (address := non_global_address(value, resolve=False)):
        raise bad("callback_not_allowed", f"'callback_url' points at a non-global address ({address})")
    return value


def check_job_id(job_id: str) -> str:
    if not is_job_id(job_id):
        raise ApiError("job_not_found", f"no job '{job_id}'")
    return job_id


def idempotency_key(value: str | None) -> str | None:
    if value is None:
        return None
    if not 1 <= len(value) <= 255:
        raise bad("invalid_header", "Idempotency-Key must be 1 to 255 characters")
    return value
