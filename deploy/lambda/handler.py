"""AWS Lambda: submit avsr-pipeline jobs to the API (`POST {AVSR_API_URL}/v1/jobs`). Stdlib only.

Two kinds of event:

* Direct invocation: ``{"s3_bucket": ..., "s3_key": ...}`` (a video) or
  ``{"s3_bucket": ..., "s3_prefix": ...}`` (image frames), plus optional ``modality``,
  ``beam_size``, ``callback_url``, ``fps`` (frames only), ``output``, ``speaker`` and ``idempotency_key``.
* S3 ``ObjectCreated`` notifications (``Records[].s3``). Keys arrive URL-encoded (``+`` for a
  space) and are decoded with ``urllib.parse.unquote_plus``.
  - a key ending in a video extension (``AVSR_VIDEO_EXTENSIONS``) becomes one ``s3_key`` job;
  - a key whose file name is the marker (``AVSR_PREFIX_MARKER``, default ``_DONE``) becomes one
    ``s3_prefix`` job for the folder that holds it: upload every frame of a clip under
    ``.../clip/``, then an empty ``.../clip/_DONE``. Frames themselves trigger nothing (an event
    per frame would start a job before the clip is complete);
  - anything else is skipped.
  Job options come from ``AVSR_JOB_*`` variables (``AVSR_JOB_FPS`` for frame folders only: the
  API rejects ``fps`` for a video, which carries its own timing).

Every submission carries an ``Idempotency-Key`` derived from the event (bucket, key and the
object's version id, sequencer or ETag; for direct calls the Lambda request id and the payload),
so the handler's own retries and Lambda's retries of the same event do not create a second job.

Errors: 5xx, 429 and connection errors are retried with exponential backoff inside the time left
to the invocation; other 4xx are reported, not retried. The result is
``{"job_ids": [...], "errors": [...], "skipped": [...]}``. For S3 events a retryable failure
that outlived the retries raises ``SubmitError`` after every record was tried, so Lambda retries
the event (already submitted records are de-duplicated by their keys) and finally sends it to the
on-failure destination.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
import random
import time
import urllib.error
import urllib.parse
import urllib.request

log = logging.getLogger("avsr.lambda")
log.setLevel(os.environ.get("AVSR_LOG_LEVEL", "INFO"))

# Every variable the handler reads (the SAM template may set only these; a test checks it).
ENVIRONMENT = {
    "AVSR_API_URL": "base URL of the API, e.g. https://avsr.internal:8000",
    "AVSR_API_KEY": "API key (for tests and quick setups; prefer AVSR_API_KEY_PARAMETER)",
    "AVSR_API_KEY_PARAMETER": "SSM SecureString parameter holding the key, read through the "
                              "AWS Parameters and Secrets Lambda Extension",
    "PARAMETERS_SECRETS_EXTENSION_HTTP_PORT": "port of that extension (its own variable; 2773)",
    "AVSR_VIDEO_EXTENSIONS": "comma list of video extensions submitted as s3_key jobs",
    "AVSR_PREFIX_MARKER": "file name that submits its folder as an s3_prefix job",
    "AVSR_JOB_MODALITY": "modality of event-triggered jobs (empty: the API default)",
    "AVSR_JOB_BEAM_SIZE": "beam size of event-triggered jobs (empty: the API default)",
    "AVSR_JOB_FPS": "frame rate of event-triggered prefix jobs (empty: the API default)",
    "AVSR_JOB_CALLBACK_URL": "callback URL of event-triggered jobs (empty: none)",
    "AVSR_HTTP_TIMEOUT_S": "timeout of one HTTP request to the API",
    "AVSR_SUBMIT_ATTEMPTS": "attempts per job on 5xx/429/connection errors",
    "AVSR_RETRY_BASE_S": "first backoff delay; doubles each retry (with jitter)",
    "AVSR_LOG_LEVEL": "log level",
}
DEFAULT_VIDEO_EXTENSIONS = ".mp4,.mov,.webm,.avi,.mkv,.m4v"
# Forwarded from a direct invocation (the API's request fields; anything else is dropped).
JOB_FIELDS = ("s3_bucket", "s3_key", "s3_prefix", "modality", "beam_size", "callback_url", "fps", "output",
              "speaker")


class SubmitError(RuntimeError):
    """Some job could not be submitted for a reason a later retry may fix (raised for S3 events)."""


def _env(name: str, default: str = "") -> str:
    return os.environ.get(name, default).strip()


def _idempotency_key(*parts: object) -> str:
    return hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).hexdigest()


_key_cache: dict[str, str] = {}


def api_key() -> str:
    """The API key: AVSR_API_KEY, else the SSM parameter through the extension (cached)."""
    direct = _env("AVSR_API_KEY")
    if direct:
        return direct
    name = _env("AVSR_API_KEY_PARAMETER")
    if not name:
        return ""
    if name not in _key_cache:
        port = _env("PARAMETERS_SECRETS_EXTENSION_HTTP_PORT", "2773")
        url = (f"http://localhost:{port}/systemsmanager/parameters/get?"
               + urllib.parse.urlencode({"name": name, "withDecryption": "true"}))
        request = urllib.request.Request(
            url, headers={"X-Aws-Parameters-Secrets-Token": os.environ.get("AWS_SESSION_TOKEN", "")})
        with urllib.request.urlopen(request, timeout=float(_env("AVSR_HTTP_TIMEOUT_S", "5"))) as response:
            _key_cache[name] = json.load(response)["Parameter"]["Value"]
    return _key_cache[name]


def _job_defaults() -> dict:
    options: dict = {}
    if _env("AVSR_JOB_MODALITY"):
        options["modality"] = _env("AVSR_JOB_MODALITY")
    if _env("AVSR_JOB_BEAM_SIZE"):
        options["beam_size"] = int(_env("AVSR_JOB_BEAM_SIZE"))
    if _env("AVSR_JOB_FPS"):
        options["fps"] = float(_env("AVSR_JOB_FPS"))
    if _env("AVSR_JOB_CALLBACK_URL"):
        options["callback_url"] = _env("AVSR_JOB_CALLBACK_URL")
    return options


def jobs_from_direct(event: dict, request_id: str = "") -> tuple[list[tuple[dict, str]], list[dict]]:
    """One job from a direct invocation, or an error describing why not."""
    body = {k: event[k] for k in JOB_FIELDS if event.get(k) not in (None, "")}
    source = {k: body.get(k) for k in ("s3_bucket", "s3_key", "s3_prefix") if k in body}
    if "s3_bucket" not in body or ("s3_key" in body) == ("s3_prefix" in body):
        return [], [{"source": source, "error": "need s3_bucket and exactly one of s3_key, s3_prefix"}]
    key = event.get("idempotency_key") or _idempotency_key(
        "direct", request_id, json.dumps(body, sort_keys=True))
    return [(body, str(key))], []


def jobs_from_s3_records(records: list[dict]) -> tuple[list[tuple[dict, str]], list[dict]]:
    """Jobs from S3 ObjectCreated records: videos by extension, frame folders by their marker."""
    videos = tuple(e.strip().lower() for e in _env("AVSR_VIDEO_EXTENSIONS", DEFAULT_VIDEO_EXTENSIONS).split(",")
                   if e.strip())
    marker = _env("AVSR_PREFIX_MARKER", "_DONE")
    defaults = _job_defaults()
    jobs, skipped, seen = [], [], set()
    for record in records:
        s3 = record.get("s3") or {}
        bucket = (s3.get("bucket") or {}).get("name", "")
        obj = s3.get("object") or {}
        key = urllib.parse.unquote_plus(obj.get("key", ""))
        where = {"s3_bucket": bucket, "s3_key": key}
        if record.get("eventSource") != "aws:s3" or not str(record.get("eventName", "")).startswith(
                "ObjectCreated:"):
            skipped.append({**where, "reason": f"not an ObjectCreated event: {record.get('eventName')}"})
            continue
        if not bucket or not key:
            skipped.append({**where, "reason": "record without bucket or key"})
            continue
        if key.lower().endswith(videos):
            body = {"s3_bucket": bucket, "s3_key": key}
        elif posixpath.basename(key) == marker:
            prefix = key[: len(key) - len(marker)]
            if not prefix:
                skipped.append({**where, "reason": "marker at the bucket root: no folder to submit"})
                continue
            body = {"s3_bucket": bucket, "s3_prefix": prefix}
        else:
            skipped.append({**where, "reason": "neither a video nor the prefix marker"})
            continue
        version = obj.get("versionId") or obj.get("sequencer") or obj.get("eTag") or ""
        idempotency = _idempotency_key("s3", bucket, key, version)
        if idempotency in seen:  # the same record twice in one event
            continue
        seen.add(idempotency)
        options = {k: v for k, v in defaults.items() if k != "fps" or "s3_prefix" in body}
        jobs.append(({**body, **options}, idempotency))
    return jobs, skipped


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """A 3xx answer is an HTTPError, not followed: urllib would send X-API-Key to the other host."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


_OPENER = urllib.request.build_opener(_NoRedirects)


def _retryable(status: int) -> bool:
    return status >= 500 or status == 429


def submit(body: dict, idempotency: str, deadline: float | None = None) -> dict:
    """POST one job; returns {"job_id"} or {"error", "status", "retryable"}. Never raises."""
    url = _env("AVSR_API_URL").rstrip("/") + "/v1/jobs"
    timeout = float(_env("AVSR_HTTP_TIMEOUT_S", "5"))
    attempts = max(1, int(_env("AVSR_SUBMIT_ATTEMPTS", "4")))
    base = float(_env("AVSR_RETRY_BASE_S", "0.5"))
    try:
        key = api_key()
    except (OSError, ValueError, KeyError) as exc:
        return {"error": f"cannot read the API key: {exc}", "status": None, "retryable": True}
    headers = {"Content-Type": "application/json", "Idempotency-Key": idempotency}
    if key:
        headers["X-API-Key"] = key
    data = json.dumps(body).encode()
    outcome: dict = {}
    for attempt in range(1, attempts + 1):
        request = urllib.request.Request(url, data=data, headers=headers, method="POST")
        try:
            with _OPENER.open(request, timeout=timeout) as response:
                answer = json.loads(response.read() or b"{}")
            job_id = answer.get("job_id") or answer.get("id")
            if job_id:
                return {"job_id": job_id}
            outcome = {"error": f"answer without job_id: {answer}", "status": response.status,
                       "retryable": False}
            return outcome
        except urllib.error.HTTPError as exc:
            detail = exc.read()[:500].decode("utf-8", "replace")
            outcome = {"error": f"HTTP {exc.code}: {detail}", "status": exc.code,
                       "retryable": _retryable(exc.code)}
            if not outcome["retryable"]:
                return outcome
        except (urllib.error.URLError, OSError, ValueError) as exc:  # refused, reset, timeout, bad JSON
            outcome = {"error": f"{type(exc).__name__}: {getattr(exc, 'reason', exc)}", "status": None,
                       "retryable": True}
        if attempt == attempts:
            break
        delay = base * 2 ** (attempt - 1) * random.uniform(0.8, 1.2)
        if deadline is not None and time.monotonic() + delay + timeout > deadline:
            break  # no time left for another attempt: let Lambda retry the event
        log.warning("attempt %d/%d for %s failed (%s); retrying in %.2fs",
                    attempt, attempts, idempotency[:12], outcome["error"], delay)
        time.sleep(delay)
    return outcome


def lambda_handler(event: dict, context=None) -> dict:
    """Entry point (Handler: handler.lambda_handler)."""
    if not _env("AVSR_API_URL"):
        raise RuntimeError("AVSR_API_URL is not set")
    if not isinstance(event, dict):
        return {"job_ids": [], "errors": [{"error": "the event must be a JSON object"}], "skipped": []}
    deadline = None
    if context is not None and hasattr(context, "get_remaining_time_in_millis"):
        deadline = time.monotonic() + context.get_remaining_time_in_millis() / 1000 - 1.0
    is_s3 = isinstance(event.get("Records"), list)
    if is_s3:
        jobs, skipped = jobs_from_s3_records(event["Records"])
        invalid: list[dict] = []
    elif event.get("Event") == "s3:TestEvent":  # sent once when the notification is configured
        return {"job_ids": [], "errors": [], "skipped": [{"reason": "s3:TestEvent"}]}
    else:
        jobs, invalid = jobs_from_direct(event, getattr(context, "aws_request_id", ""))
        skipped = []
    job_ids, errors = [], list(invalid)
    for body, idempotency in jobs:
        outcome = submit(body, idempotency, deadline)
        source = {k: body[k] for k in ("s3_bucket", "s3_key", "s3_prefix") if k in body}
        if "job_id" in outcome:
            job_ids.append(outcome["job_id"])
            log.info(json.dumps({"submitted": outcome["job_id"], **source}))
        else:
            errors.append({"source": source, **outcome})
            log.error(json.dumps({"not_submitted": source, **outcome}))
    result = {"job_ids": job_ids, "errors": errors, "skipped": skipped}
    if is_s3 and any(e.get("retryable") for e in errors):
        raise SubmitError(json.dumps(result))
    return result
