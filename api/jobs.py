"""`/v1/jobs` (submit, poll, cancel, fetch result) and the legacy synchronous `/predict`."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from flask import Blueprint, Response, current_app, jsonify, request, url_for

from api.auth import authenticate, current_tenant
from api.errors import ApiError, error_response
from api.validation import check_job_id, idempotency_key, parse_job_request
from tasks import chain, jobs, webhooks
from tasks.subtitles import render_result

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
    if job.get("error"):
        view["error"] = job["error"]
    if job["request"].get("callback_url"):
        delivery = webhooks.state(job_id)
        view["webhook"] = ({k: delivery.get(k) for k in ("status", "attempts", "delivery_id")} if delivery
                           else {"status": "waiting", "attempts": 0, "delivery_id": None})
    return view


def _load(job_id: str) -> jobs.Job:
    """The caller's job: another tenant's job is answered exactly like a missing one."""
    job = jobs.get(check_job_id(job_id))
    if job is None or job.get("tenant", "") != current_tenant().id:
        raise ApiError("job_not_found", f"no job '{job_id}'")
    return job


def submit(body: object, *, legacy: bool = False) -> tuple[jobs.Job, bool]:
    """Validate, create and enqueue a job; honours `Idempotency-Key`. Returns (job, created)."""
    tenant = current_tenant()
    job_request = parse_job_request(body, current_app.config["AVSR_SETTINGS"], tenant=tenant, legacy=legacy)
    key = idempotency_key(request.headers.get("Idempotency-Key"))
    job_id = jobs.new_job_id()
    if key is not None:
        bound_id, same = jobs.claim_idempotency_key(key, job_request, job_id, namespace=tenant.id)
        if not same:
            raise ApiError("idempotency_key_conflict", "this Idempotency-Key was used for another request")
        if bound_id != job_id:
            existing = jobs.get(bound_id)
            if existing is not None:
                return existing, False
    job = jobs.create(job_request, job_id=job_id, tenant=tenant.id)
    chain.submit(job_id)
    current_app.logger.info("job submitted", extra={"job_id": job_id, "tenant": tenant.id,
                                                    "input_type": job_request["input"]["type"]})
    return job, True


def json_body() -> object:
    """The parsed JSON body (None if it is not JSON); nesting deep enough to exhaust the parser is invalid_json."""
    try:
        return request.get_json(silent=True)
    except RecursionError:
        raise ApiError("invalid_json", "the body is nested too deeply") from None


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
    try:
        body, mimetype = render_result(job["result"], fmt)
    except ValueError as exc:
        raise ApiError("invalid_format", str(exc)) from exc
    return Response(body, mimetype=mimetype)


@bp.post("/predict")
def predict():
    """The old single-server contract: frames in, waits for the transcript (bounded)."""
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
