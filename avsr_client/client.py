"""`Client`: submit, poll, fetch results and upload videos over the service's HTTP API."""

from __future__ import annotations

import mimetypes
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal, overload

import requests

from tasks import signing
from tasks.records import JobResult, SpeakerHint, SpeakerMode

TERMINAL = ("succeeded", "failed", "cancelled")
Job = dict[str, Any]
"""A job as `GET /v1/jobs/<id>` returns it: job_id, status, stage, progress, segments_done/total, result, error."""


class AvsrError(Exception):
    """The API refused a request: `code` is its `error.code`, `status` the HTTP status."""

    def __init__(self, code: str, message: str, status: int = 0):
        super().__init__(f"{code}: {message}")
        self.code, self.message, self.status = code, message, status


class JobFailed(AvsrError):
    """The job ended failed or cancelled; `job` is its last state."""

    def __init__(self, job: Job):
        error = job.get("error") or {"code": "job_cancelled", "message": f"the job was {job['status']}"}
        super().__init__(error["code"], error["message"])
        self.job = job


class Client:
    """The avsr-pipeline HTTP API (`url`, e.g. http://127.0.0.1:8000; `api_key` sent as X-API-Key)."""

    def __init__(self, url: str, api_key: str | None = None, *, timeout: float = 30.0,
                 session: requests.Session | None = None):
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.session = session or requests.Session()
        if api_key:
            self.session.headers["X-API-Key"] = api_key

    def _request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        kwargs.setdefault("timeout", self.timeout)
        try:  # redirects are not followed: requests would send the X-API-Key header to the other host
            response = self.session.request(method, self.url + path, allow_redirects=False, **kwargs)
        except requests.RequestException as exc:
            raise AvsrError("unreachable", f"{self.url}: {exc}") from exc
        if response.is_redirect:
            raise AvsrError("redirected", f"{self.url}{path} redirects to {response.headers.get('Location')!r}; the "
                            "client does not follow redirects (its API key would go along): use the final URL",
                            response.status_code)
        if response.status_code >= 400:
            try:
                error = response.json()["error"]
                code, message = error["code"], error["message"]
            except (ValueError, KeyError, TypeError):
                code, message = f"http_{response.status_code}", response.text[:200]
            raise AvsrError(code, message, response.status_code)
        return response

    # --- jobs ----------------------------------------------------------------------------------

    def submit(self, *, s3_bucket: str | None = None, s3_key: str | None = None, s3_prefix: str | None = None,
               upload_id: str | None = None, url: str | None = None, fps: float | None = None,
               modality: str | None = None, beam_size: int | None = None, output: Mapping[str, str] | None = None,
               callback_url: str | None = None, idempotency_key: str | None = None,
               speaker: SpeakerMode | SpeakerHint | None = None) -> Job:
        """Submit a job on one input (an S3 video or frame prefix, an upload or a URL); returns
        `{"job_id", "status", "links"}`. `speaker`: whom to read (a mode, or `{"t", "x", "y"}` in source
        pixels; default "largest")."""
        fields = {"s3_bucket": s3_bucket, "s3_key": s3_key, "s3_prefix": s3_prefix, "upload_id": upload_id,
                  "url": url, "fps": fps, "modality": modality, "beam_size": beam_size,
                  "output": dict(output) if output else None, "callback_url": callback_url, "speaker": speaker}
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        body = {k: v for k, v in fields.items() if v is not None}
        return self._request("POST", "/v1/jobs", json=body, headers=headers).json()

    def status(self, job_id: str) -> Job:
        return self._request("GET", f"/v1/jobs/{job_id}").json()

    def cancel(self, job_id: str) -> Job:
        return self._request("DELETE", f"/v1/jobs/{job_id}").json()

    def wait(self, job_id: str, timeout: float | None = 600.0, *, poll_s: float = 0.25, max_poll_s: float = 5.0,
             on_update: Callable[[Job], None] | None = None) -> Job:
        """Poll until the job is finished (back-off from `poll_s` to `max_poll_s`); its last state.
        `TimeoutError` after `timeout` seconds (None: no limit)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = poll_s
        while True:
            job = self.status(job_id)
            if on_update is not None:
                on_update(job)
            if job["status"] in TERMINAL:
                return job
            if deadline is not None and time.monotonic() + delay > deadline:
                raise TimeoutError(f"job {job_id} is still {job['status']} after {timeout:g} s")
            time.sleep(delay)
            delay = min(max_poll_s, delay * 1.5)

    @overload
    def result(self, job_id: str, format: Literal["json"] = "json") -> JobResult: ...
    @overload
    def result(self, job_id: str, format: Literal["srt", "vtt"]) -> str: ...

    def result(self, job_id: str, format: str = "json") -> JobResult | str:
        """A succeeded job's result: the `JobResult` record, or its SRT / WebVTT subtitles."""
        response = self._request("GET", f"/v1/jobs/{job_id}/result", params={"format": format})
        return response.json() if format == "json" else response.text

    # --- uploads -------------------------------------------------------------------------------

    def upload(self, path: str | os.PathLike[str], content_type: str | None = None) -> str:
        """Upload a local video (`POST /v1/uploads`, then a PUT of the file to the presigned URL it
        gives); returns the `upload_id` to submit."""
        path = Path(path)
        size = path.stat().st_size
        content_type = content_type or mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        if not (content_type.startswith("video/") or content_type == "application/octet-stream"):
            content_type = "application/octet-stream"
        grant = self._request("POST", "/v1/uploads",
                              json={"filename": path.name, "size": size, "content_type": content_type}).json()
        with open(path, "rb") as body:
            try:
                response = requests.request(grant["method"], grant["upload_url"], data=body,
                                            headers=grant["headers"], timeout=max(self.timeout, 600))
            except requests.RequestException as exc:
                raise AvsrError("upload_failed", f"PUT to the upload URL failed: {exc}") from exc
        if response.status_code >= 300:
            raise AvsrError("upload_failed", f"the upload URL answered {response.status_code}: {response.text[:200]}",
                            response.status_code)
        return grant["upload_id"]

    def transcribe_file(self, path: str | os.PathLike[str], *, timeout: float | None = 3600.0,
                        on_update: Callable[[Job], None] | None = None, **options: Any) -> JobResult:
        """Upload `path`, submit it (`options`: modality, beam_size, speaker, ...), wait and return its result;
        `JobFailed` if the job fails."""
        job = self.submit(upload_id=self.upload(path), **options)
        done = self.wait(job["job_id"], timeout=timeout, on_update=on_update)
        if done["status"] != "succeeded":
            raise JobFailed(done)
        return done["result"]


def result_text(result: JobResult) -> str:
    """A result as plain text: its text, or one `track-N: text` line per face track when several were read."""
    transcripts = result.get("transcripts") or []
    if len(transcripts) > 1:
        return "\n".join(f"track-{t['track']}: {t['text']}" for t in transcripts)
    return result["text"]


def verify_webhook(body: bytes, headers: Mapping[str, str], secret: str, *, tolerance_s: float = 300.0,
                   now: float | None = None) -> bool:
    """True when a webhook POST is the service's: its Standard Webhooks headers (`webhook-id`,
    `webhook-timestamp`, `webhook-signature`) sign `body` with `secret`, and the timestamp is within
    `tolerance_s` of now (older deliveries refused; a receiver that must refuse a replay inside that window
    remembers the `webhook-id`s it took). The `standardwebhooks` package verifies the same headers."""
    lowered = {k.lower(): v for k, v in headers.items()}
    delivery_id, timestamp = lowered.get("webhook-id", ""), lowered.get("webhook-timestamp", "")
    if not secret or not delivery_id or not (timestamp.isascii() and timestamp.isdigit() and len(timestamp) <= 12):
        return False  # no secret would sign with an empty key; '²' is isdigit() but no number
    if abs((time.time() if now is None else now) - int(timestamp)) > tolerance_s:
        return False
    try:
        return signing.verify(body, delivery_id, timestamp, lowered.get("webhook-signature", ""), secret)
    except ValueError:  # a header that does not encode (lone surrogates): not the service's
        return False
