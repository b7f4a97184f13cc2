"""Job records in Redis: one JSON document per job, updated atomically.

A job moves `queued → running → succeeded | failed | cancelled`. Once terminal it never
changes again (`update` refuses), which makes re-delivered tasks harmless: a late
`running` update or a second `finalize` cannot undo a cancellation or rewrite a result.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
import uuid
from collections.abc import Callable
from functools import lru_cache
from typing import Any

import redis
import redis.sentinel

from tasks.records import JobRequest
from tasks.settings import get_settings, redis_sentinel

Job = dict[str, Any]
"""A job record: `job_id`, `status`, `stage`, `progress`, timestamps, `request` (a `JobRequest`),
`timings`, segment counters, `tenant` (the id of the tenant that made it), and `result` (a `JobResult`)
or `error` once finished."""

JOB_ID_PATTERN = "^[0-9a-f]{32}$"  # what `new_job_id` makes

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "queued", "running", "succeeded", "failed", "cancelled"
TERMINAL = (SUCCEEDED, FAILED, CANCELLED)
STATUSES = (QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED)
STAGES = ("queued", "downloading", "preprocessing", "inference", "finalizing", "done")

_JOB_KEY = "avsr:job:{}"
_IDEMPOTENCY_KEY = "avsr:idempotency:{}"
STATS_KEY = "avsr:stats"  # hash: jobs_<status> counters, stage_<name>_seconds_sum/_count


_TIMEOUTS = {"socket_timeout": 5, "socket_connect_timeout": 3}  # a hung Redis: a 503 or a retry, not a hang


@lru_cache(maxsize=4)
def _redis(url: str, sentinel_master: str = "") -> redis.Redis:
    sentinel = redis_sentinel(url, sentinel_master)
    if sentinel is None:
        return redis.Redis.from_url(url, decode_responses=True, health_check_interval=30, **_TIMEOUTS)
    # The client asks the Sentinels for the current master on every (re)connection, so it follows a failover.
    return redis.sentinel.Sentinel(
        list(sentinel.sentinels), sentinel_kwargs=dict(_TIMEOUTS), db=sentinel.db, username=sentinel.username,
        password=sentinel.password, health_check_interval=30, **_TIMEOUTS,
    ).master_for(sentinel.master_name, decode_responses=True)


def connection(url: str | None = None) -> redis.Redis:
    """The shared Redis client for job records (same server as the broker), or for `url`.

    A `sentinel://` URL gives a client of the master named by AVSR_REDIS_SENTINEL_MASTER.
    """
    return _redis(url or get_settings().redis_url, get_settings().redis_sentinel_master)


def new_job_id() -> str:
    return uuid.uuid4().hex


def is_job_id(text: str) -> bool:
    return re.fullmatch(JOB_ID_PATTERN.strip("^$"), text) is not None


class ClaimLost(Exception):
    """The Idempotency-Key this submission claimed was taken over before its job was stored."""


def create(request: JobRequest, job_id: str | None = None, *, tenant: str = "", idempotency_key: str | None = None,
           namespace: str = "") -> Job:
    """Store a new `queued` job of `tenant` for a validated request and return it.

    With `idempotency_key` (claimed by `claim_idempotency_key` for this job id) the record and the
    key's final binding are written in one transaction, or neither (`ClaimLost`).
    """
    now = time.time()
    job = {
        "job_id": job_id or new_job_id(),
        "tenant": tenant,
        "status": QUEUED,
        "stage": "queued",
        "progress": 0.0,
        "created_at": now,
        "updated_at": now,
        "started_at": None,
        "finished_at": None,
        "request": request,
        "timings": {},
        "segments_done": 0,
        "segments_total": None,
    }
    ttl = get_settings().job_ttl_s
    with connection().pipeline() as pipe:
        if idempotency_key is not None:
            redis_key = _idempotency_redis_key(idempotency_key, namespace)
            pipe.watch(redis_key)
            bound = pipe.get(redis_key)
            if bound is None or json.loads(bound)["job_id"] != job["job_id"]:
                pipe.reset()
                raise ClaimLost(job["job_id"])
            pipe.multi()
            pipe.set(redis_key, json.dumps({**json.loads(bound), "stored": True}), ex=ttl)
        pipe.set(_JOB_KEY.format(job["job_id"]), json.dumps(job), ex=ttl)
        pipe.hincrby(STATS_KEY, "jobs_queued", 1)
        try:
            pipe.execute()
        except redis.WatchError as exc:
            raise ClaimLost(job["job_id"]) from exc
    return job


def get(job_id: str) -> Job | None:
    raw = connection().get(_JOB_KEY.format(job_id))
    return json.loads(raw) if raw else None


def update(job_id: str, merge: Callable[[Job], dict[str, Any]] | None = None, **patch: Any) -> Job | None:
    """Merge `patch` (and `merge(job)`'s patch) into a non-terminal job; returns the job as stored
    afterwards, or None if unknown. A terminal job is returned unchanged.

    Optimistic transaction (WATCH/MULTI): concurrent updates retry instead of overwriting.
    """
    key = _JOB_KEY.format(job_id)
    with connection().pipeline() as pipe:
        while True:
            try:
                pipe.watch(key)
                raw = pipe.get(key)
                if raw is None:
                    return None
                job = json.loads(raw)
                if job["status"] in TERMINAL:
                    return job
                previous = job["status"]
                job.update(patch)
                if merge is not None:
                    job.update(merge(job))
                job["updated_at"] = time.time()
                pipe.multi()
                pipe.set(key, json.dumps(job), ex=get_settings().job_ttl_s)
                if job["status"] != previous:
                    pipe.hincrby(STATS_KEY, f"jobs_{job['status']}", 1)
                pipe.execute()
                return job
            except redis.WatchError:
                continue


def is_terminal(job: Job | None) -> bool:
    return job is None or job["status"] in TERMINAL


def record_stage_time(stage: str, seconds: float) -> None:
    """Add one observation to the stage-duration totals `/metrics` exports."""
    pipe = connection().pipeline()
    pipe.hincrbyfloat(STATS_KEY, f"stage_{stage}_seconds_sum", seconds)
    pipe.hincrby(STATS_KEY, f"stage_{stage}_seconds_count", 1)
    pipe.execute()


def add_timing(job_id: str, stage: str, seconds: float) -> None:
    """Add `seconds` to the job's own `timings[stage]` (chunks of one stage add up)."""
    def merge(job: dict) -> dict:
        timings = dict(job.get("timings") or {})
        timings[stage] = round(timings.get(stage, 0.0) + seconds, 4)
        return {"timings": timings}

    update(job_id, merge=merge)


def increment(job_id: str, counter: str) -> int:
    """Atomically count an event of this job (e.g. chunks done); returns the new count."""
    key = f"avsr:job:{job_id}:{counter}"
    pipe = connection().pipeline()
    pipe.incr(key)
    pipe.expire(key, get_settings().job_ttl_s)
    return int(pipe.execute()[0])


def stats() -> dict[str, float]:
    return {str(k): float(v) for k, v in connection().hgetall(STATS_KEY).items()}


CLAIM_TTL_S = 15  # an unstored claim (its submission failed or died) frees the key after this long


def _idempotency_redis_key(key: str, namespace: str) -> str:
    scoped = f"{namespace}\x00{key}" if namespace else key
    return _IDEMPOTENCY_KEY.format(hashlib.sha256(scoped.encode("utf-8", "surrogatepass")).hexdigest())


def claim_idempotency_key(key: str, request: JobRequest, job_id: str, namespace: str = "") -> tuple[str, bool]:
    """Bind `key` (within `namespace`, e.g. a tenant) to `job_id` unless already bound.

    Returns (bound job id, request matches). A fresh claim lives `CLAIM_TTL_S` until `create`
    stores the job with it (then the job's TTL), so a submission whose publish failed and could not
    `release_idempotency_key` still frees the key.
    """
    fingerprint = hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()
    redis_key = _idempotency_redis_key(key, namespace)
    value = json.dumps({"job_id": job_id, "fingerprint": fingerprint})
    r = connection()
    if r.set(redis_key, value, nx=True, ex=CLAIM_TTL_S):
        return job_id, True
    existing = json.loads(r.get(redis_key) or value)
    return existing["job_id"], existing["fingerprint"] == fingerprint


_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"


def release_idempotency_key(key: str, request: JobRequest, job_id: str, namespace: str = "") -> None:
    """Free `key` if it is still this submission's unstored claim (after a failed publish)."""
    fingerprint = hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()
    value = json.dumps({"job_id": job_id, "fingerprint": fingerprint})
    connection().eval(_RELEASE, 1, _idempotency_redis_key(key, namespace), value)


def once(job_id: str, what: str) -> bool:
    """True the first time it is called for (job, what): guards side effects such as webhooks."""
    return bool(connection().set(f"avsr:once:{job_id}:{what}", 1, nx=True, ex=get_settings().job_ttl_s))
