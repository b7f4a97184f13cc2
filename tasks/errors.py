"""Every error code the service can answer or end a job with, its HTTP status, and what it means.

`ERROR_CODES` is the one table: `ApiError` (a refused request) and `JobError` (a failed job) take
their status from it and refuse a code that is not in it, so the README and the OpenAPI
description — both checked against this table by the tests — list every code a client can see.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass


@dataclass(frozen=True)
class ErrorCode:
    status: int
    meaning: str
    job: bool = False  # a failed job can carry it (else only an HTTP answer does)


ERROR_CODES: dict[str, ErrorCode] = {
    # Refused requests.
    "invalid_json": ErrorCode(400, "the body is not a JSON object"),
    "missing_field": ErrorCode(400, "a required field is missing"),
    "invalid_field": ErrorCode(400, "a field has the wrong type, range or form"),
    "invalid_input": ErrorCode(400, "the input names neither or both of a frame prefix and a video key"),
    "unknown_field": ErrorCode(400, "the body holds a field the API does not know"),
    "invalid_bucket": ErrorCode(400, "not a valid S3 bucket name"),
    "invalid_format": ErrorCode(400, "unknown result format (json, srt or vtt)"),
    "invalid_header": ErrorCode(400, "a header has the wrong form (e.g. Idempotency-Key)"),
    "callback_not_allowed": ErrorCode(400, "the callback URL points at a non-global address, or no webhook "
                                            "secret is configured for the API key"),
    "unauthorized": ErrorCode(401, "missing or unknown API key"),
    "bucket_not_allowed": ErrorCode(403, "the bucket is not on this service's allow-list"),
    "job_not_found": ErrorCode(404, "no such job"),
    "not_found": ErrorCode(404, "no such route"),
    "method_not_allowed": ErrorCode(405, "the route does not take this method (see the Allow header)"),
    "job_not_finished": ErrorCode(409, "the job has no result yet"),
    "job_finished": ErrorCode(409, "the job is already finished"),
    "job_cancelled": ErrorCode(409, "the job was cancelled while /predict waited for it"),
    "idempotency_key_conflict": ErrorCode(409, "the Idempotency-Key was used for another request"),
    "request_entity_too_large": ErrorCode(413, "the request body is over AVSR_MAX_REQUEST_BYTES"),
    "unsupported_media_type": ErrorCode(415, "the body is not of a media type the route takes"),
    "broker_unavailable": ErrorCode(503, "the job queue (Redis) does not answer; retry later"),
    "rate_limited": ErrorCode(429, "over AVSR_RATE_LIMIT or AVSR_AUTH_FAIL_LIMIT; retry after Retry-After"),
    "predict_busy": ErrorCode(503, "too many POST /predict calls are waiting; retry after Retry-After"),
    # Failed jobs (also the HTTP status of `/predict` when its job fails so).
    "input_not_found": ErrorCode(404, "no input object at the given location", job=True),
    "access_denied": ErrorCode(403, "the service's credentials may not read the input", job=True),
    "input_too_large": ErrorCode(413, "the input is over AVSR_MAX_INPUT_BYTES or AVSR_MAX_FRAMES", job=True),
    "input_changed": ErrorCode(409, "the input object changed while the job ran", job=True),
    "no_audio": ErrorCode(400, "the modality needs sound and the input has none", job=True),
    "bad_media": ErrorCode(422, "the input cannot be decoded as video or images", job=True),
    "no_frames": ErrorCode(422, "the input decodes to no usable frames", job=True),
    "no_face_detected": ErrorCode(422, "no face was found in any frame", job=True),
    "speaker_not_found": ErrorCode(422, "no face near the speaker hint's point and time", job=True),
    "s3_error": ErrorCode(502, "S3 refused a request for another reason", job=True),
    "transient_error": ErrorCode(503, "S3 or the network failed after every retry", job=True),
    "model_unavailable": ErrorCode(503, "the GPU worker has no model loaded", job=True),
    "timeout": ErrorCode(504, "a stage ran past its time limit, or /predict stopped waiting", job=True),
    "internal_error": ErrorCode(500, "an unexpected failure (logged with the job id)", job=True),
    "worker_lost": ErrorCode(503, "a stage's worker died AVSR_MAX_DELIVERIES times running it", job=True),
    "insufficient_storage": ErrorCode(507, "a worker's disk had no room for the job, after every retry", job=True),
    "output_not_found": ErrorCode(404, "the output bucket does not exist (the service never creates one)",
                                  job=True),
    "malformed_request": ErrorCode(400, "the HTTP request itself could not be parsed (request line, headers)"),
    "header_too_large": ErrorCode(431, "a request header is over the server's limit"),
    "uri_too_long": ErrorCode(414, "the request URI is over the server's limit"),
    "request_timeout": ErrorCode(408, "the request did not arrive in full within AVSR_REQUEST_READ_TIMEOUT_S"),
    "url_not_allowed": ErrorCode(400, "the input URL is not http(s) or points at a non-global address", job=True),
    "url_fetch_failed": ErrorCode(502, "the input URL answered an error, could not be reached or was too slow",
                                  job=True),
    "url_not_video": ErrorCode(415, "the input URL's content type is not video/* or application/octet-stream",
                               job=True),
}


def http_status(code: str) -> int:
    """The HTTP status of `code` (KeyError for a code not in `ERROR_CODES`)."""
    return ERROR_CODES[code].status


class JobError(Exception):
    """A job failure with a stable machine-readable `code` (what clients switch on)."""

    def __init__(self, code: str, message: str, retryable: bool = False):
        if code not in ERROR_CODES or not ERROR_CODES[code].job:
            raise ValueError(f"{code!r} is not a job error code of tasks.errors.ERROR_CODES")
        super().__init__(code, message)  # both in args: Celery rebuilds exceptions from args
        self.code = code
        self.message = message
        self.retryable = retryable

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"

    def to_dict(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


def input_not_found(what: str) -> JobError:
    return JobError("input_not_found", f"no input found at {what}")


def access_denied(what: str) -> JobError:
    return JobError("access_denied", f"access denied to {what}")


def input_too_large(message: str) -> JobError:
    return JobError("input_too_large", message)


def transient(message: str) -> JobError:
    """A failure worth retrying (network, throttling, 5xx)."""
    return JobError("transient_error", message, retryable=True)


DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})  # an OSError's errno when a disk has no room


def disk_full(needed: int | None = None) -> JobError:
    """The worker's disk has no room (for `needed` more bytes): retried, in case room is made or
    another worker takes the stage; no path in the message."""
    room = f" for {needed} bytes" if needed is not None else ""
    return JobError("insufficient_storage", f"the worker's disk has no room{room}", retryable=True)


def public_model_error(error: str) -> str:
    """What a customer or an unauthenticated caller sees of the GPU worker's model load error
    (``"Type: message"``): its type, not its message, which names paths and endpoints of the service."""
    return error.split(":", 1)[0] + " (details in the GPU worker's log)"
