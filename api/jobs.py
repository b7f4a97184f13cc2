"""`/v1/jobs` (submit, poll, cancel, fetch result) and the legacy synchronous `/predict`."""

from __future__ import annotations

import contextlib
import threading
import time
from datetime import UTC, datetime
from typing import Any

from flask import Blueprint, Response, current_app, jsonify, request, url_for

from api.auth import authenticate, current_tenant
from api.errors import ApiError, error_response
from api.validation import check_job_id, idempotency_key, json_body, parse_job_request, query_int
from tasks import chain, heartbeat, jobs, webhooks
from tasks.celery_app import CPU_QUEUE, GPU_QUEUE
from tasks.records import JobRequest
from tasks.subtitles import LINE_CHARS, MAX_LINES, render_result

bp = Blueprint("jobs", __name__)

@bp.before_request
def _authenticate() -> None:
    authenticate(current_app.config["AVSR_SETTINGS"])


def _iso(ts: float | None) -> str | None:
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z") if ts else None


def job_view(job: jobs.Job) -> dict[str, Any]:
    """The public shape of a job record."""
    job_id = job["job_id"]
    view = {
        "job_id": job_id,
        "status": job["status"],
        "stage": job["stage"],
        "progress": job["progress"],
        "segments_done": job.get("segments_done", 0),
        "segments_total": job.get("segments_total"),
        "segments_reused": job.get("segments_reused", 0),
        "created_at": _iso(job["created_at"]),
        "started_at": _iso(job.get("started_at")),
        "finished_at": _iso(job.get("finished_at")),
        "updated_at": _iso(job.get("updated_at")),
        "links": {"self": url_for("jobs.get_job", job_id=job_id),
                  "result": url_for("jobs.get_result", job_id=job_id)},
    }
    if job["status"] == jobs.SUCCEEDED:
        view["result"] = job["result"]
        view["result_location"] = job.get("result_location")
    else:  # text as it comes (a succeeded job has all of it in `result.segments`)
        view["partial_segments"] = job.get("partial_segments") or []
    if job.get("error"):
        view["error"] = job["error"]
    if job["status"] not in jobs.TERMINAL:
        queue = GPU_QUEUE if job["stage"] == "inference" else CPU_QUEUE
        if queue not in _live_roles():
            view["waiting_for"] = f"{queue} worker"
    if job["request"].get("callback_url"):
        delivery = webhooks.state(job_id)
        view["webhook"] = ({k: delivery.get(k) for k in ("status", "attempts", "delivery_id")} if delivery
                           else {"status": "waiting", "attempts": 0, "delivery_id": None})
    return view


_roles_seen: tuple[float, frozenset[str]] = (0.0, frozenset())


def _live_roles(max_age_s: float = 2.0) -> frozenset[str]:
    """The queues with a live worker heartbeat (cached briefly: it is a scan of Redis)."""
    global _roles_seen
    if time.monotonic() - _roles_seen[0] > max_age_s:
        _roles_seen = (time.monotonic(), frozenset(w["role"] for w in heartbeat.heartbeats()))
    return _roles_seen[1]


def _load(job_id: str) -> jobs.Job:
    """The caller's job: another tenant's job is answered exactly like a missing one."""
    job = jobs.get(check_job_id(job_id))
    if job is None or job.get("tenant", "") != current_tenant().id:
        raise ApiError("job_not_found", f"no job '{job_id}'")
    return job


def _claim(key: str, job_request: JobRequest, job_id: str, namespace: str) -> jobs.Job | None:
    """Bind `key` to `job_id`: None when this request owns it, else the job it is bound to.

    A racing request with the same key waits (briefly) for the winner's record; a claim whose
    submission failed frees the key within `jobs.CLAIM_TTL_S`, and this request takes it over.
    """
    deadline = time.monotonic() + jobs.CLAIM_TTL_S + 1
    while True:
        bound_id, same = jobs.claim_idempotency_key(key, job_request, job_id, namespace)
        if not same:
            raise ApiError("idempotency_key_conflict", "this Idempotency-Key was used for another request")
        if bound_id == job_id:
            return None
        existing = jobs.get(bound_id)
        if existing is not None:
            return existing
        if time.monotonic() > deadline:
            raise ApiError("broker_unavailable", "a submission with this Idempotency-Key is in progress; retry later")
        time.sleep(0.05)


def submit(body: object, *, legacy: bool = False) -> tuple[jobs.Job, bool]:
    """Validate, publish and store a job of the caller's tenant; honours `Idempotency-Key` (in the
    tenant's namespace). Returns (job, created).

    The first task is published before the record is stored (its worker waits for the record), so
    a publish failure leaves nothing behind: 503 `broker_unavailable`, and the key is free again.
    """
    tenant = current_tenant()
    namespace = tenant.id
    job_request = parse_job_request(body, current_app.config["AVSR_SETTINGS"], tenant=tenant, legacy=legacy)
    key = idempotency_key(request.headers.get("Idempotency-Key"))
    job_id = jobs.new_job_id()
    if key is not None and (existing := _claim(key, job_request, job_id, namespace)) is not None:
        return existing, False
    try:
        chain.submit(job_id)
    except Exception as exc:  # kombu/redis errors after the bounded publish retries
        current_app.logger.error("publish failed: %s: %s", type(exc).__name__, exc, extra={"job_id": job_id})
        if key is not None:
            with contextlib.suppress(Exception):  # else the claim expires by itself
                jobs.release_idempotency_key(key, job_request, job_id, namespace)
        raise ApiError("broker_unavailable", "the job queue is unavailable; retry later") from exc
    try:
        job = jobs.create(job_request, job_id=job_id, tenant=tenant.id, idempotency_key=key, namespace=namespace)
    except jobs.ClaimLost as exc:  # the claim expired during a slow publish and another request took it
        raise ApiError("broker_unavailable", "the job queue was too slow; retry later") from exc
    current_app.logger.info("job submitted", extra={"job_id": job_id, "tenant": tenant.id,
                                                    "input_type": job_request["input"]["type"]})
    return job, True


@bp.post("/v1/jobs")
def create_job():
    job, created = submit(json_body())
    response = jsonify({"job_id": job["job_id"], "status": job["status"],
                        "links": job_view(job)["links"]})
    response.headers["Location"] = url_for("jobs.get_job", job_id=job["job_id"])
    return response, 202 if created else 200


@bp.get("/v1/jobs/<job_id>")
def get_job(job_id: str):
    return jsonify(job_view(_load(job_id)))


@bp.delete("/v1/jobs/<job_id>")
def cancel_job(job_id: str):
    job = _load(job_id)
    if job["status"] in jobs.TERMINAL:
        raise ApiError("job_finished", f"job is already {job['status']}")
    return jsonify(job_view(chain.cancel(job_id) or job)), 202


@bp.get("/v1/jobs/<job_id>/result")
def get_result(job_id: str):
    job = _load(job_id)
    if job["status"] != jobs.SUCCEEDED:
        raise ApiError("job_not_finished", f"job is {job['status']}", job_status=job["status"])
    fmt = request.args.get("format", "json")
    width = query_int("line_chars", LINE_CHARS, 10, 200)
    max_lines = query_int("max_lines", MAX_LINES, 1, 6)
    try:
        body, mimetype = render_result(job["result"], fmt, width, max_lines)
    except ValueError as exc:
        raise ApiError("invalid_format", str(exc)) from exc
    return Response(body, mimetype=mimetype)


class PredictSlots:
    """Slots for /predict callers waiting on their job: `limit` in all, at most `per_tenant` held by
    one tenant (so one tenant's burst cannot refuse every other tenant)."""

    def __init__(self, limit: int, per_tenant: int) -> None:
        self.limit, self.per_tenant = limit, per_tenant
        self._held: dict[str, int] = {}
        self._lock = threading.Lock()

    def acquire(self, tenant: str) -> bool:
        with self._lock:
            if sum(self._held.values()) >= self.limit or self._held.get(tenant, 0) >= self.per_tenant:
                return False
            self._held[tenant] = self._held.get(tenant, 0) + 1
            return True

    def release(self, tenant: str) -> None:
        with self._lock:
            self._held[tenant] -= 1
            if not self._held[tenant]:
                del self._held[tenant]


def _predict_slots() -> PredictSlots:
    """This API process's /predict slots: AVSR_PREDICT_MAX_WAITERS, of which one tenant holds at most
    half when several tenants are configured."""
    settings = current_app.config["AVSR_SETTINGS"]
    limit = settings.predict_max_waiters
    per_tenant = limit if len(settings.tenants) <= 1 else max(1, limit // 2)
    return current_app.extensions.setdefault("avsr_predict_slots", PredictSlots(limit, per_tenant))


PREDICT_RETRY_AFTER_S = 5


@bp.post("/predict")
def predict():
    """The old single-server contract: frames in, waits for the transcript (bounded).

    A waiting caller holds a server thread, so at most AVSR_PREDICT_MAX_WAITERS wait per API process
    (fewer than its threads: /health and the job routes always find one), one tenant at most half of
    them when there are several; the next is refused with 503 `predict_busy` and Retry-After before
    any job is made.
    """
    slots, tenant = _predict_slots(), current_tenant().id
    if not slots.acquire(tenant):
        response, status = error_response("predict_busy", "too many /predict calls are waiting; retry later, "
                                          "or submit with POST /v1/jobs and poll")
        response.headers["Retry-After"] = str(PREDICT_RETRY_AFTER_S)
        return response, status
    try:
        return _predict()
    finally:
        slots.release(tenant)


def _predict():
    job, _ = submit(json_body(), legacy=True)
    deadline = time.monotonic() + current_app.config["AVSR_SETTINGS"].predict_timeout_s
    delay = 0.05
    while time.monotonic() < deadline:
        job = jobs.get(job["job_id"]) or job
        if job["status"] == jobs.SUCCEEDED:
            result = job["result"]
            return jsonify({"text": result["text"], "confidence": result["confidence"],
                            "num_frames": result["num_frames"], "job_id": job["job_id"]})
        if job["status"] in jobs.TERMINAL:
            error = job.get("error") or {"code": "job_cancelled", "message": "the job was cancelled"}
            return error_response(error["code"], error["message"], job_id=job["job_id"])
        time.sleep(delay)
        delay = min(0.5, delay * 1.5)
    return error_response("timeout", "the job did not finish in time; poll it by id", job_id=job["job_id"])
