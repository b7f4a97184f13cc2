"""Turn a `POST /v1/jobs` body into the job request the pipeline runs, or a 4xx `ApiError`.

The request stored with the job is a `tasks.records.JobRequest`.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Any, cast
from urllib.parse import urlparse

from flask import request

from api import schema
from api.errors import ApiError
from tasks.jobs import is_job_id
from tasks.pinned_http import non_global_address, url_host
from tasks.records import (
    FPS,
    FramesInput,
    JobRequest,
    OutputLocation,
    SpeakerHint,
    SpeakerMode,
    UrlInput,
    VideoInput,
)
from tasks.settings import Settings, Tenant

MODALITIES, JOB_FIELDS = schema.MODALITIES, schema.JOB_FIELDS
S3_INPUT_FIELDS = ("s3_bucket", "s3_prefix", "s3_key", "fps")
UPLOAD_ID = re.compile(schema.UPLOAD_ID["pattern"])
MAX_BEAM = schema.BEAM_RANGE[1]
_BUCKET = re.compile(schema.BUCKET_PATTERN)
_IPV4 = re.compile(r"^\d+\.\d+\.\d+\.\d+$")


def bad(code: str, message: str) -> ApiError:
    return ApiError(code, message)


def _encodable(value: Any, where: str = "body") -> None:
    """Every string of a parsed JSON body (keys too) must encode as UTF-8: a lone surrogate is refused."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise bad("invalid_field", f"{where} holds a string that is not valid Unicode (lone surrogate)") from None
    elif isinstance(value, dict):
        for key, item in value.items():
            _encodable(key, where)
            _encodable(item, f"'{key}'" if isinstance(key, str) and key.isidentifier() else where)
    elif isinstance(value, list):
        for item in value:
            _encodable(item, where)


def _string(body: dict, name: str, *, required: bool = False, max_len: int = schema.MAX_PATH_BYTES) -> str | None:
    value = body.get(name)
    if value is None:
        if required:
            raise bad("missing_field", f"'{name}' is required")
        return None
    if not isinstance(value, str):
        raise bad("invalid_field", f"'{name}' must be a string")
    if len(value.encode("utf-8")) > max_len or any(unicodedata.category(c) == "Cc" for c in value):
        raise bad("invalid_field", f"'{name}' is too long or holds a control character")
    return value


def s3_path(value: str, name: str) -> str:
    """An S3 key or prefix as given, refused unless plain: no leading `/`, no empty (`//`), `.` or `..` segment."""
    segments = value.removesuffix("/").split("/")  # a prefix may end with one slash
    if value and (value.startswith("/") or any(s in ("", ".", "..") for s in segments)):
        raise bad("invalid_field", f"'{name}' must be a relative S3 path without '.', '..' or empty segments")
    return value


def _bucket(body: dict, name: str, tenant: Tenant, settings: Settings, *, write: bool = False) -> str:
    bucket = _string(body, name, required=True, max_len=63) or ""
    if not _BUCKET.match(bucket) or _IPV4.match(bucket):
        raise bad("invalid_bucket", f"'{bucket}' is not a valid S3 bucket name")
    # Writing: only listed buckets (none listed: results stay in the work bucket). Reading: the listed
    # buckets, or with none listed any bucket but the work bucket (other jobs' arrays and results) and
    # the buckets other tenants list (theirs, not this tenant's)
    allowed = tenant.write_buckets if write else tenant.read_buckets
    permitted = bucket in allowed if write or allowed else (
        bucket != settings.work_bucket and bucket not in settings.claimed_buckets(tenant.id))
    if not permitted:
        what = "written to" if write else "read from"
        raise bad("bucket_not_allowed", f"bucket '{bucket}' may not be {what} with this API key")
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


def parse_job_request(body: Any, settings: Settings, *, tenant: Tenant | None = None,
                      legacy: bool = False) -> JobRequest:
    """Validate a job submission of `tenant` (default: the global allow-lists; `legacy`: the `/predict`
    body, frames only)."""
    tenant = tenant or settings.default_tenant()
    if not isinstance(body, dict):
        raise bad("invalid_json", "the body must be a JSON object")
    _encodable(body)
    unknown = sorted(set(body) - JOB_FIELDS)
    if unknown:
        raise bad("unknown_field", f"unknown field(s): {', '.join(unknown)}")
    source = (_upload_input(body, tenant, settings, legacy) or _url_input(body, settings, legacy)
              or _s3_input(body, tenant, settings, legacy))
    modality = body.get("modality", "auto")
    if modality not in MODALITIES:
        raise bad("invalid_field", f"'modality' must be one of {', '.join(MODALITIES)}")
    request: JobRequest = {
        "input": source,
        "modality": modality,
        "beam_size": int(_number(body, "beam_size", settings.beam_size, *schema.BEAM_RANGE, integer=True)),
        "output": _output(body.get("output"), tenant, settings),
        "callback_url": _callback(body.get("callback_url"), tenant, settings.callback_allow_private),
        "speaker": speaker(body.get("speaker")),
    }
    return request


def speaker(value: Any) -> SpeakerMode | SpeakerHint:
    """The `speaker` field: a mode (absent: "largest") or a hint `{t, x, y}` of finite numbers in the schema's
    bounds (as floats), else 400 `invalid_field`."""
    if value is None:
        return "largest"
    if isinstance(value, str):
        if value not in schema.SPEAKER_MODES:
            raise bad("invalid_field", f"'speaker' must be one of {', '.join(schema.SPEAKER_MODES)} or {{t, x, y}}")
        return cast(SpeakerMode, value)
    fields = schema.SPEAKER_HINT["properties"]
    if not isinstance(value, dict) or set(value) != set(fields):
        raise bad("invalid_field", "'speaker' must be a mode or an object {\"t\", \"x\", \"y\"} (numbers)")
    hint = {}
    for name, rule in fields.items():
        number = value[name]
        if (isinstance(number, bool) or not isinstance(number, int | float)
                or not rule["minimum"] <= number <= rule["maximum"]):  # NaN fails the comparison too
            raise bad("invalid_field", f"'speaker.{name}' must be a number from {rule['minimum']:g} to "
                                       f"{rule['maximum']:g}")
        hint[name] = float(number)
    return {"t": hint["t"], "x": hint["x"], "y": hint["y"]}


def _s3_input(body: dict, tenant: Tenant, settings: Settings, legacy: bool) -> FramesInput | VideoInput:
    bucket = _bucket(body, "s3_bucket", tenant, settings)
    prefix, key = _string(body, "s3_prefix"), _string(body, "s3_key")
    if prefix is not None:
        s3_path(prefix, "s3_prefix")
    if key is not None and key and not key.endswith("/"):
        s3_path(key, "s3_key")
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
            "fps": float(_number(body, "fps", FPS, *schema.FPS_RANGE))}


def _only_input(body: dict, name: str, legacy: bool) -> None:
    """`name` is the job's one input: no S3 fields beside it, and not on `/predict`."""
    others = [f for f in (*S3_INPUT_FIELDS, "upload_id", "url") if f in body and f != name]
    if legacy or others:
        raise bad("invalid_input", f"'{name}' is the job's input: drop {', '.join(others)}" if others
                  else "'/predict' takes 's3_bucket' and 's3_prefix'")


def _upload_input(body: dict, tenant: Tenant, settings: Settings, legacy: bool) -> VideoInput | None:
    """`{"upload_id"}`: a video uploaded through `POST /v1/uploads` (in the work bucket)."""
    if "upload_id" not in body:
        return None
    _only_input(body, "upload_id", legacy)
    upload_id = body["upload_id"]
    if not isinstance(upload_id, str) or not UPLOAD_ID.match(upload_id):
        raise bad("invalid_field", "'upload_id' must be an id returned by POST /v1/uploads")
    return {"type": "video", "bucket": settings.work_bucket, "key": upload_key(upload_id, tenant.id)}


def upload_key(upload_id: str, tenant_id: str) -> str:
    """Where an upload's bytes go in the work bucket: under its tenant, so no other tenant can name it."""
    return f"uploads/{tenant_id or '_'}/{upload_id}/video"


def _url_input(body: dict, settings: Settings, legacy: bool) -> UrlInput | None:
    """`{"url"}`: a video the CPU worker fetches (http(s), global addresses unless AVSR_URL_ALLOW_PRIVATE)."""
    if "url" not in body:
        return None
    _only_input(body, "url", legacy)
    url = _string(body, "url", max_len=schema.MAX_URL_LENGTH) or ""
    try:
        scheme, host = urlparse(url).scheme, url_host(url)
    except ValueError:
        raise bad("url_not_allowed", "'url' must be an http(s) URL with a valid host and port") from None
    if scheme not in ("http", "https") or not host:
        raise bad("url_not_allowed", "'url' must be an http(s) URL")
    if not settings.url_allow_private and (address := non_global_address(url, resolve=False)):
        raise bad("url_not_allowed", f"'url' points at a non-global address ({address})")
    return {"type": "url", "url": url}


def _output(value: Any, tenant: Tenant, settings: Settings) -> OutputLocation | None:
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) - {"s3_bucket", "s3_prefix"}:
        raise bad("invalid_field", "'output' must be {\"s3_bucket\", \"s3_prefix\"}")
    bucket = _bucket(value, "s3_bucket", tenant, settings, write=True)
    return {"bucket": bucket, "prefix": s3_path(_string(value, "s3_prefix") or "", "output.s3_prefix")}


def _callback(value: Any, tenant: Tenant, allow_private: bool) -> str | None:
    if value is None:
        return None
    if (not isinstance(value, str) or len(value) > schema.MAX_URL_LENGTH
            or any(unicodedata.category(c) == "Cc" for c in value)):
        raise bad("invalid_field", "'callback_url' must be a URL string")
    try:
        parsed, host = urlparse(value), url_host(value)
    except ValueError:
        raise bad("invalid_field", "'callback_url' must be an http(s) URL") from None
    if parsed.scheme not in ("http", "https") or not host or parsed.username is not None:
        raise bad("invalid_field", "'callback_url' must be an http(s) URL without credentials")
    if not tenant.callback_secret:
        raise bad("callback_not_allowed", "webhooks are signed and no webhook secret is configured for this "
                                          "API key (AVSR_CALLBACK_SECRET or the tenant's callback_secret)")
    if not allow_private and (address := non_global_address(value, resolve=False)):
        raise bad("callback_not_allowed", f"'callback_url' points at a non-global address ({address})")
    return value


def json_body() -> object:
    """The parsed JSON body of the current request (None if it is not JSON); nesting deep enough to
    exhaust the parser is `invalid_json`."""
    try:
        return request.get_json(silent=True)
    except RecursionError:
        raise ApiError("invalid_json", "the body is nested too deeply") from None


def query_int(name: str, default: int, low: int, high: int) -> int:
    """An integer query parameter of the current request in [low, high], else 400 `invalid_field`.
    Only ASCII digits count (``str.isdigit`` also takes '²', which ``int`` refuses), at most 9 of them."""
    raw = request.args.get(name)
    if raw is None:
        return default
    if not re.fullmatch(r"[0-9]{1,9}", raw) or not low <= int(raw) <= high:
        raise bad("invalid_field", f"'{name}' must be an integer from {low} to {high}")
    return int(raw)


def check_job_id(job_id: str) -> str:
    if not is_job_id(job_id):
        raise ApiError("job_not_found", f"no job '{job_id}'")
    return job_id


def idempotency_key(value: str | None) -> str | None:
    if value is None:
        return None
    if not 1 <= len(value) <= 255 or not all(" " <= c <= "~" for c in value):
        raise bad("invalid_header", "Idempotency-Key must be 1 to 255 printable ASCII characters")
    return value
