"""The OpenAPI 3.1 description of the HTTP API, served at `/openapi.json`."""

from __future__ import annotations

from api import schema
from tasks.errors import ERROR_CODES
from tasks.jobs import JOB_ID_PATTERN, STAGES, STATUSES
from tasks.subtitles import LINE_CHARS, MAX_LINES


def _error(description: str) -> dict:
    schema = {"$ref": "#/components/schemas/Error"}
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def openapi_spec() -> dict:
    job_ref = {"$ref": "#/components/schemas/Job"}
    job_id = {"name": "job_id", "in": "path", "required": True,
              "schema": {"type": "string", "pattern": JOB_ID_PATTERN}}
    # Answers any route can give: a key missing or unknown, a wrong method, an unparsable request
    # (answered by gunicorn, as JSON too), the queue being down.
    auth_errors = {"400": _error("Malformed request"), "401": _error("Missing or invalid API key"),
                   "405": _error("Method not allowed (see the Allow header)"), "414": _error("Request line too long"),
                   "431": _error("Header too large"), "503": _error("The job queue is unavailable")}
    body_errors = {"400": _error("Invalid request"), "403": _error("Bucket not allowed"),
                   "413": _error("Body too large"), "415": _error("Not JSON")}
    # A failed job's code, with its status, is /predict's answer.
    job_failures = {str(status): _error("The job failed with this status (error.code says why)")
                    for status in sorted({e.status for e in ERROR_CODES.values() if e.job})}
    return {
        "openapi": "3.1.0",
        "info": {"title": "avsr-pipeline", "version": "0.1.0",
                 "description": "Lip reading (audio-visual speech recognition) with AV-HuBERT. Submit a clip "
                                "in S3, poll the job by id, get text, confidence, timed segments, subtitles."},
        "security": [{"bearer": []}, {"apiKey": []}],
        "paths": {
            "/v1/jobs": {"post": {
                "summary": "Submit a job",
                "parameters": [{"name": "Idempotency-Key", "in": "header", "required": False,
                                "schema": schema.IDEMPOTENCY_KEY}],
                "requestBody": {"required": True, "content": {"application/json": {
                    "schema": {"$ref": "#/components/schemas/JobRequest"}}}},
                "responses": {
                    "202": {"description": "Accepted", "content": {"application/json": {"schema": {
                        "$ref": "#/components/schemas/JobAccepted"}}}},
                    "200": {"description": "Same Idempotency-Key and body: the existing job",
                            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/JobAccepted"}}}},
                    **auth_errors, **body_errors, "409": _error("Idempotency-Key reused with another body")}}},
            "/v1/jobs/{job_id}": {
                "get": {"summary": "Job status (and result once succeeded)", "parameters": [job_id],
                        "responses": {"200": {"description": "The job", "content": {"application/json": {
                            "schema": job_ref}}}, **auth_errors, "404": _error("Unknown job")}},
                "delete": {"summary": "Cancel a job", "parameters": [job_id],
                           "responses": {"202": {"description": "Cancelled", "content": {"application/json": {
                               "schema": job_ref}}}, **auth_errors, "404": _error("Unknown job"),
                               "409": _error("Already finished")}}},
            "/v1/jobs/{job_id}/result": {"get": {
                "summary": "The result as JSON, SRT or WebVTT",
                "parameters": [job_id, {"name": "format", "in": "query", "schema": {
                    "type": "string", "enum": ["json", "srt", "vtt"], "default": "json"}},
                    {"name": "line_chars", "in": "query", "description": "subtitle line width (srt, vtt)",
                     "schema": {"type": "integer", "minimum": 10, "maximum": 200, "default": LINE_CHARS}},
                    {"name": "max_lines", "in": "query", "description": "lines per subtitle cue (srt, vtt)",
                     "schema": {"type": "integer", "minimum": 1, "maximum": 6, "default": MAX_LINES}}],
                "responses": {"200": {"description": "The result", "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/Result"}},
                    "application/x-subrip": {"schema": {"type": "string"}},
                    "text/vtt": {"schema": {"type": "string"}}}},
                    **auth_errors, "400": _error("Unknown format"), "404": _error("Unknown job"),
                    "409": _error("Not finished")}}},
            "/predict": {"post": {
                "summary": "Legacy synchronous transcription of a frame sequence (waits, bounded)",
                "requestBody": {"required": True, "content": {"application/json": {"schema": {
                    "$ref": "#/components/schemas/PredictRequest"}}}},
                "responses": {"200": {"description": "Transcript", "content": {"application/json": {"schema": {
                    "type": "object", "required": ["text", "confidence", "num_frames"],
                    "properties": {"text": {"type": "string"}, "confidence": {"type": "number"},
                                   "num_frames": {"type": "integer"}, "job_id": {"type": "string"}}}}}},
                    **auth_errors, **job_failures, **body_errors, "409": _error("The job was cancelled"),
                    "504": _error("Did not finish in time")}}},
            "/v1/uploads": {"post": {
                "summary": "A presigned S3 PUT URL for a local video; submit it as {\"upload_id\"}",
                "requestBody": {"required": True, "content": {"application/json": {
                    "schema": {"$ref": "#/components/schemas/UploadRequest"}}}},
                "responses": {
                    "201": {"description": "PUT the file's bytes to upload_url with these headers",
                            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Upload"}}}},
                    "400": _error("Invalid request"), "413": _error("Over AVSR_MAX_INPUT_BYTES"),
                    **auth_errors}}},
            "/": {"get": {"summary": "The web page: upload a video, follow its job, play it with captions",
                          "security": [], "responses": {"200": {"description": "HTML",
                                                                 "content": {"text/html": {}}}}}},
            "/docs": {"get": {"summary": "This API reference (Swagger UI)", "security": [],
                              "responses": {"200": {"description": "HTML", "content": {"text/html": {}}}}}},
            "/docs/assets/{name}": {"get": {
                "summary": "Swagger UI's scripts and styles", "security": [],
                "parameters": [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}],
                "responses": {"200": {"description": "The asset"}, "404": _error("No such asset")}}},
            "/health": {"get": {"summary": "Model, device, broker and worker state", "security": [],
                                "responses": {"200": {"description": "Broker reachable"},
                                              "503": {"description": "Broker down"}}}},
            "/metrics": {"get": {"summary": "Prometheus metrics", "security": [],
                                 "responses": {"200": {"description": "Prometheus text format"},
                                               "503": _error("The job queue is unavailable")}}},
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"},
                                "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"}},
            "schemas": {
                "Error": {"type": "object", "required": ["error"], "properties": {"error": {
                    "type": "object", "required": ["code", "message"],
                    "properties": {"code": {"$ref": "#/components/schemas/ErrorCode"},
                                   "message": {"type": "string"}}}}},
                "ErrorCode": {"type": "string", "enum": list(ERROR_CODES), "description": (
                    "Machine-readable error codes (HTTP status; `job` = also a failed job's `error.code`):\n"
                    + "\n".join(f"- `{code}` ({e.status}{', job' if e.job else ''}): {e.meaning}"
                                for code, e in ERROR_CODES.items()))},
                "JobRequest": schema.JOB_REQUEST,
                "PredictRequest": schema.PREDICT_REQUEST,
                "UploadRequest": {"type": "object", "required": ["size"], "additionalProperties": False,
                                  "properties": {
                                      "size": {"type": "integer", "minimum": 1, "description": "bytes"},
                                      "content_type": {"type": "string", "default": "application/octet-stream"},
                                      "filename": {"type": "string", "maxLength": 255}}},
                "Upload": {"type": "object", "required": ["upload_id", "method", "upload_url", "headers"],
                           "properties": {
                               "upload_id": {"type": "string"}, "method": {"type": "string", "enum": ["PUT"]},
                               "upload_url": {"type": "string", "format": "uri"},
                               "headers": {"type": "object", "additionalProperties": {"type": "string"}},
                               "size": {"type": "integer"}, "expires_at": {"type": "string"},
                               "max_bytes": {"type": "integer"}}},
                "JobAccepted": {"type": "object", "properties": {
                    "job_id": {"type": "string"}, "status": {"type": "string"}, "links": {"type": "object"}}},
                "Segment": {"type": "object", "properties": {
                    "id": {"type": "integer"}, "start": {"type": "number"}, "end": {"type": "number"},
                    "text": {"type": "string"}, "confidence": {"type": "number"},
                    "words": {"type": "array", "items": {"$ref": "#/components/schemas/Word"}},
                    "track": {"type": "integer", "minimum": 1, "description": "The face track read "
                              "(quality.tracks); labels the subtitles when the segments have several"}}},
                "TrackTranscript": {"type": "object", "properties": {
                    "track": {"type": "integer", "minimum": 1}, "text": {"type": "string"},
                    "confidence": {"type": "number", "minimum": 0, "maximum": 1}}},
                "FaceTrack": {"type": "object", "description": (
                    "A face followed through the clip: seconds [start, end), frames with the face found, and the "
                    "box of its landmarks [t, x0, y0, x1, y1] (seconds, source pixels) about once a second"),
                    "properties": {
                        "id": {"type": "integer", "minimum": 1}, "start": {"type": "number"}, "end": {"type": "number"},
                        "frames": {"type": "integer"},
                        "boxes": {"type": "array", "items": {"type": "array", "items": {"type": "number"},
                                                             "minItems": 5, "maxItems": 5}}}},
                "Word": {"type": "object", "description": (
                    "A word of the segment's text; confidence = exp(mean log-prob of its sentencepiece pieces). "
                    "No times: no audio-visual alignment is computed."), "properties": {
                    "word": {"type": "string"}, "confidence": {"type": "number", "minimum": 0, "maximum": 1},
                    "tokens": {"type": "integer", "minimum": 1}}},
                "PartialSegment": {"type": "object", "required": ["id", "start", "end", "text", "confidence"],
                                   "properties": {
                    "id": {"type": "integer"}, "start": {"type": "number"}, "end": {"type": "number"},
                    "text": {"type": "string"}, "confidence": {"type": "number", "minimum": 0, "maximum": 1},
                    "track": {"type": "integer", "description": "the face track read, when several are"}}},
                "Result": {"type": "object", "properties": {
                    "text": {"type": "string"}, "confidence": {"type": "number", "minimum": 0, "maximum": 1},
                    "num_frames": {"type": "integer"}, "duration_s": {"type": "number"},
                    "segments": {"type": "array", "items": {"$ref": "#/components/schemas/Segment"}},
                    "transcripts": {"type": "array", "items": {"$ref": "#/components/schemas/TrackTranscript"},
                                    "description": "One per face track read, in track order"},
                    "model": {"type": "object"}, "timings": {"type": "object"},
                    "quality": {"type": "object", "properties": {
                        "tracks": {"type": "array", "items": {"$ref": "#/components/schemas/FaceTrack"}},
                        "speaker": {"type": "string", "enum": ["largest", "center", "hint", "speaking", "all"]}}}}},
                "Job": {"type": "object", "properties": {
                    "job_id": {"type": "string"}, "status": {"type": "string", "enum": list(STATUSES)},
                    "stage": {"type": "string", "enum": [*STAGES, "cancelled"]},
                    "progress": {"type": "number"}, "segments_done": {"type": "integer"},
                    "segments_total": {"type": ["integer", "null"]},
                    "partial_segments": {
                        "type": "array", "items": {"$ref": "#/components/schemas/PartialSegment"},
                        "description": ("until the job succeeds: its segments decoded so far, in segment order "
                                        "(the first ones, up to the first not yet decoded); grows during "
                                        "inference and, for a clip over 56 s, already during preprocessing "
                                        "(early inference: those carry no `track` yet); the result's "
                                        "`segments` replace it")},
                    "segments_reused": {"type": "integer",
                                        "description": "segments whose early decode inference reused"},
                    "created_at": {"type": "string"}, "started_at": {"type": ["string", "null"]},
                    "finished_at": {"type": ["string", "null"]}, "updated_at": {"type": ["string", "null"]},
                    "result": {"$ref": "#/components/schemas/Result"},
                    "error": {"type": "object", "properties": {
                        "code": {"$ref": "#/components/schemas/ErrorCode"}, "message": {"type": "string"}}},
                    "links": {"type": "object"},
                    "waiting_for": {"type": "string", "enum": ["cpu worker", "gpu worker"],
                                    "description": "only while no live worker consumes the stage's queue"},
                    "webhook": {"type": "object", "properties": {
                        "status": {"type": "string", "enum": ["waiting", "pending", "delivered", "failed"]},
                        "attempts": {"type": "integer"}, "delivery_id": {"type": ["string", "null"]}}}}},
            },
        },
    }
