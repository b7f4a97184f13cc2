"""The request bodies as JSON Schema: the one definition the OpenAPI description serves and
`api/validation.py` enforces (its field names, types, lengths, enums and bounds are read from here).

What JSON Schema cannot say is checked in `api/validation.py` and stated in the descriptions
below: exactly one of `s3_prefix`/`s3_key`, `fps` only with frames, S3 paths without `.`/`..`/empty
segments or a leading `/`, no control characters, valid Unicode, the tenant's bucket allow-lists, and
the webhook rules (http(s), global address, a configured secret).
"""

from __future__ import annotations

from typing import Any, get_args

from tasks.records import SOURCE_FPS_RANGE, SpeakerMode

MODALITIES = ("auto", "video", "audio", "audiovisual")
FPS_RANGE = SOURCE_FPS_RANGE
BEAM_RANGE = (1, 50)
MAX_PATH_BYTES = 1024  # an S3 key's limit (UTF-8 bytes)
MAX_URL_LENGTH = 2048
SPEAKER_MODES: tuple[str, ...] = get_args(SpeakerMode)
MAX_HINT_T = 86_400.0  # seconds: a day of video
MAX_HINT_XY = 16_384.0  # source-video pixels
BUCKET_PATTERN = "^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$"  # (not an IPv4 address either)

_PATH_RULES = ("relative: no leading '/', no '.', '..' or empty ('//') segment, no control characters, "
               f"at most {MAX_PATH_BYTES} UTF-8 bytes")

_NO_CONTROL = "^[^\\x00-\\x1f\\x7f-\\x9f]*$"
IDEMPOTENCY_KEY: dict[str, Any] = {"type": "string", "minLength": 1, "maxLength": 255, "pattern": "^[ -~]+$",
                                   "description": "Printable ASCII; the same key and body give the same job"}
BUCKET: dict[str, Any] = {"type": "string", "minLength": 3, "maxLength": 63, "pattern": BUCKET_PATTERN,
                          "description": "An S3 bucket name the API key may read (or, for output, write)"}
PREFIX: dict[str, Any] = {"type": "string", "maxLength": MAX_PATH_BYTES, "pattern": _NO_CONTROL,
                          "description": f"Frames (JPEG/PNG) under this key prefix, natural order; {_PATH_RULES}"}
KEY: dict[str, Any] = {"type": "string", "minLength": 1, "maxLength": MAX_PATH_BYTES, "pattern": _NO_CONTROL,
                       "description": f"A video file (with its audio); {_PATH_RULES}"}
FPS: dict[str, Any] = {"type": "number", "minimum": FPS_RANGE[0], "maximum": FPS_RANGE[1], "default": 25,
                       "description": "Frame rate of a frame sequence (not with s3_key)"}
BEAM: dict[str, Any] = {"type": "integer", "minimum": BEAM_RANGE[0], "maximum": BEAM_RANGE[1]}
MODALITY: dict[str, Any] = {"type": "string", "enum": list(MODALITIES), "default": "auto"}
OUTPUT: dict[str, Any] = {
    "type": "object", "required": ["s3_bucket"], "additionalProperties": False,
    "description": "Where result.json/.srt/.vtt go (a bucket on the key's write list); default: the work bucket",
    "properties": {"s3_bucket": BUCKET, "s3_prefix": PREFIX}}
CALLBACK: dict[str, Any] = {
    "type": "string", "format": "uri", "pattern": "^https?://[^/@:?#]+(:[0-9]{1,5})?(/|$)", "maxLength": MAX_URL_LENGTH,
    "description": "http(s) URL POSTed when the job ends (Standard Webhooks signature); a global address, "
                   "no credentials; needs a webhook secret for the API key"}
SPEAKER_HINT: dict[str, Any] = {
    "type": "object", "required": ["t", "x", "y"], "additionalProperties": False,
    "description": "The face under pixel (x, y) of the source video (its own pixels, not as displayed) at t seconds",
    "properties": {"t": {"type": "number", "minimum": 0, "maximum": MAX_HINT_T},
                   "x": {"type": "number", "minimum": 0, "maximum": MAX_HINT_XY},
                   "y": {"type": "number", "minimum": 0, "maximum": MAX_HINT_XY}}}
SPEAKER: dict[str, Any] = {
    "default": "largest",
    "description": "Whom to read when several faces are visible (not used with modality 'audio'): the 'largest' "
                   "face, the face nearest the 'center', the face 'speaking' (audio-visual synchrony; 'largest' "
                   "without audio), 'all' (one transcript per face), or a point {t, x, y} on the face",
    "oneOf": [{"type": "string", "enum": list(SPEAKER_MODES)}, SPEAKER_HINT]}

UPLOAD_ID: dict[str, Any] = {"type": "string", "pattern": "^[0-9a-f]{32}$",
                             "description": "A video uploaded via POST /v1/uploads (by the same API key's tenant)"}
URL: dict[str, Any] = {
    "type": "string", "format": "uri", "pattern": "^https?://", "maxLength": MAX_URL_LENGTH,
    "description": "An http(s) URL of a video the service fetches (global addresses only, size cap, timeout, "
                   "video/* or application/octet-stream)"}


def _one_input(required: list[str], forbidden: list[str]) -> dict[str, Any]:
    return {"required": required, "not": {"anyOf": [{"required": [name]} for name in forbidden]}}


JOB_REQUEST: dict[str, Any] = {
    "type": "object", "additionalProperties": False,
    "description": "One input: s3_bucket with exactly one of s3_prefix (frames) or s3_key (a video), or upload_id, "
                   "or url; fps only with s3_prefix",
    "oneOf": [_one_input(["s3_bucket", "s3_prefix"], ["s3_key", "upload_id", "url"]),
              _one_input(["s3_bucket", "s3_key"], ["s3_prefix", "fps", "upload_id", "url"]),
              _one_input(["upload_id"], ["s3_bucket", "s3_prefix", "s3_key", "fps", "url"]),
              _one_input(["url"], ["s3_bucket", "s3_prefix", "s3_key", "fps", "upload_id"])],
    "properties": {"s3_bucket": BUCKET, "s3_prefix": PREFIX, "s3_key": KEY, "fps": FPS, "upload_id": UPLOAD_ID,
                   "url": URL, "modality": MODALITY, "beam_size": BEAM, "output": OUTPUT, "callback_url": CALLBACK,
                   "speaker": SPEAKER}}
PREDICT_REQUEST: dict[str, Any] = {  # frames only: no s3_key, upload_id or url, so no oneOf
    "type": "object", "required": ["s3_bucket", "s3_prefix"], "additionalProperties": False,
    "description": "A frame sequence only",
    "properties": {k: v for k, v in JOB_REQUEST["properties"].items() if k not in ("s3_key", "upload_id", "url")}}

JOB_FIELDS = frozenset(JOB_REQUEST["properties"])
