"""`POST /v1/uploads`: somewhere to put a local video — a presigned S3 PUT URL in the work bucket.

The bytes go straight from the client to S3, never through the API's memory or Redis. The size
is declared up front: over AVSR_MAX_INPUT_BYTES is refused here (413), and the URL signs that
exact Content-Length, so S3 refuses a body of any other size. The job then names the upload
(`{"upload_id"}`); a file that is not a video fails the job with `bad_media`.
"""

from __future__ import annotations

import re
import time
import uuid
from datetime import UTC, datetime

from flask import Blueprint, current_app, jsonify

from api.auth import authenticate, current_tenant
from api.errors import ApiError
from api.validation import json_body, upload_key
from tasks import storage

bp = Blueprint("uploads", __name__)

# What the signed PUT must carry: video/<RFC 6838 subtype name> or application/octet-stream (ASCII only:
# the value goes into the signature and a header)
CONTENT_TYPE = re.compile(r"application/octet-stream|video/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,93}")


@bp.before_request
def _authenticate() -> None:
    authenticate(current_app.config["AVSR_SETTINGS"])


@bp.post("/v1/uploads")
def create_upload():
    settings = current_app.config["AVSR_SETTINGS"]
    body = json_body()
    if not isinstance(body, dict):
        raise ApiError("invalid_json", "the body must be a JSON object")
    unknown = sorted(set(body) - {"filename", "size", "content_type"})
    if unknown:
        raise ApiError("unknown_field", f"unknown field(s): {', '.join(unknown)}")
    size = body.get("size")
    if isinstance(size, bool) or not isinstance(size, int):
        raise ApiError("missing_field" if size is None else "invalid_field", "'size' (bytes, an integer) is required")
    if size <= 0:
        raise ApiError("invalid_field", "'size' must be positive")
    if size > settings.max_input_bytes:
        raise ApiError("input_too_large", f"{size} bytes is over the limit of {settings.max_input_bytes}")
    content_type = body.get("content_type") or "application/octet-stream"
    if not isinstance(content_type, str) or not CONTENT_TYPE.fullmatch(content_type):
        raise ApiError("invalid_field", "'content_type' must be video/* or application/octet-stream")
    filename = body.get("filename")
    if filename is not None and (not isinstance(filename, str) or len(filename) > 255):
        raise ApiError("invalid_field", "'filename' must be a string of at most 255 characters")
    upload_id = uuid.uuid4().hex
    expires_s = settings.upload_expiry_s
    tenant = current_tenant()  # resolved once, in before_request
    url = storage.presign_put(settings.work_bucket, upload_key(upload_id, tenant.id), content_type=content_type,
                              content_length=size, expires_s=expires_s)
    expires_at = datetime.fromtimestamp(time.time() + expires_s, UTC).isoformat().replace("+00:00", "Z")
    current_app.logger.info("upload granted", extra={"upload_id": upload_id, "size": size})
    return jsonify({"upload_id": upload_id, "method": "PUT", "upload_url": url,
                    "headers": {"Content-Type": content_type}, "size": size, "expires_at": expires_at,
                    "max_bytes": settings.max_input_bytes}), 201
