"""Operational endpoints: `/health`, `/metrics` (Prometheus), `/openapi.json`."""

from __future__ import annotations

import time
from urllib.parse import urlparse

import redis
from flask import Blueprint, Response, current_app, jsonify
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, SummaryMetricFamily

from api.errors import error_response
from api.openapi import openapi_spec
from tasks import heartbeat, jobs, leases
from tasks.celery_app import CPU_QUEUE, GPU_QUEUE
from tasks.errors import public_model_error

bp = Blueprint("ops", __name__)


def _redacted(url: str) -> str:
    parsed = urlparse(url)
    host = parsed.hostname or ""
    return f"{parsed.scheme}://{host}:{parsed.port or 6379}{parsed.path}"


def queue_depths(r: redis.Redis) -> dict[str, int]:
    return {q: int(r.llen(q)) for q in (CPU_QUEUE, GPU_QUEUE)}


@bp.get("/health")
def health():
    """Model, device and broker/worker state; 503 when the broker (Redis) does not answer."""
    settings = current_app.config["AVSR_SETTINGS"]
    broker: dict[str, object] = {"url": _redacted(settings.redis_url)}
    try:
        started = time.perf_counter()
        r = jobs.connection(settings.redis_url)
        r.ping()
        broker.update(ok=True, latency_ms=round(1000 * (time.perf_counter() - started), 2))
        workers = heartbeat.heartbeats(r)
        queues = queue_depths(r)
    except Exception as exc:
        broker.update(ok=False, error=type(exc).__name__)
        body = {"status": "unavailable", "model_loaded": False, "device": None, "gpu_name": None,
                "broker": broker, "workers": {"cpu": 0, "gpu": []}, "queues": None}
        return jsonify(body), 503
    gpu = [w for w in workers if w["role"] == GPU_QUEUE]
    loaded = [w for w in gpu if w.get("model_loaded")]
    first = (loaded or gpu or [{}])[0]
    cpu_count = sum(1 for w in workers if w["role"] == CPU_QUEUE)
    body = {
        "status": "ok" if loaded and cpu_count else "degraded",
        "model_loaded": bool(loaded),
        "device": first.get("device"),
        "gpu_name": first.get("gpu_name"),
        "model": _public({k: first.get(k) for k in ("checkpoint", "kind", "loaded_at", "load_seconds", "model_error")}),
        "broker": broker,
        "workers": {"cpu": cpu_count, "gpu": [
            _public({k: w.get(k) for k in ("hostname", "device", "gpu_name", "model_loaded", "checkpoint", "loaded_at",
                                           "updated_at")}) for w in gpu]},
        "queues": queues,
    }
    return jsonify(body), 200


def _public(fields: dict) -> dict:
    """What an unauthenticated /health shows of a worker's model: the checkpoint's file name, not its path or
    bucket, and the type of a load error, not its message (paths, endpoints: the GPU worker's log has it)."""
    if fields.get("checkpoint"):
        fields["checkpoint"] = str(fields["checkpoint"]).rstrip("/").rsplit("/", 1)[-1]
    if fields.get("model_error"):
        fields["model_error"] = public_model_error(str(fields["model_error"]))
    return fields


class RedisStateCollector:
    """Exports job, stage, queue and worker state kept in Redis (shared by every API process)."""

    def collect(self):
        stats = jobs.stats()
        counter = CounterMetricFamily("avsr_jobs", "Jobs that entered each status", labels=["status"])
        for status in jobs.STATUSES:
            counter.add_metric([status], stats.get(f"jobs_{status}", 0.0))
        yield counter
        lost = CounterMetricFamily("avsr_worker_lost", "Jobs failed because a stage's worker died too often")
        lost.add_metric([], stats.get(leases.WORKER_LOST_STAT, 0.0))
        yield lost
        summary = SummaryMetricFamily("avsr_stage_duration_seconds", "Time spent per pipeline stage",
                                      labels=["stage"])
        for key, value in stats.items():
            if key.startswith("stage_") and key.endswith("_seconds_sum"):
                stage = key[len("stage_"):-len("_seconds_sum")]
                summary.add_metric([stage], int(stats.get(f"stage_{stage}_seconds_count", 0)), value)
        yield summary
        depth = GaugeMetricFamily("avsr_queue_depth", "Messages waiting in each Celery queue", labels=["queue"])
        for queue, n in queue_depths(jobs.connection()).items():
            depth.add_metric([queue], n)
        yield depth
        workers = heartbeat.heartbeats()
        alive = GaugeMetricFamily("avsr_workers", "Workers with a live heartbeat", labels=["role"])
        for role in (CPU_QUEUE, GPU_QUEUE):
            alive.add_metric([role], sum(1 for w in workers if w["role"] == role))
        yield alive
        loaded = GaugeMetricFamily("avsr_model_loaded", "Model loaded on a GPU worker", labels=["worker"])
        load_s = GaugeMetricFamily("avsr_model_load_seconds", "Model load time", labels=["worker"])
        memory = GaugeMetricFamily("avsr_gpu_memory_bytes", "GPU memory in use", labels=["worker", "kind"])
        for w in workers:
            if w["role"] != GPU_QUEUE:
                continue
            loaded.add_metric([w["hostname"]], 1.0 if w.get("model_loaded") else 0.0)
            if w.get("load_seconds") is not None:
                load_s.add_metric([w["hostname"]], w["load_seconds"])
            for kind in ("allocated", "reserved"):
                if w.get(f"gpu_memory_{kind}") is not None:
                    memory.add_metric([w["hostname"], kind], w[f"gpu_memory_{kind}"])
        yield from (loaded, load_s, memory)


_registry = CollectorRegistry()
_registry.register(RedisStateCollector())


@bp.get("/metrics")
def metrics():
    try:
        return Response(generate_latest(_registry), mimetype="text/plain; version=0.0.4")
    except Exception as exc:
        return error_response("broker_unavailable", type(exc).__name__)


@bp.get("/openapi.json")
def openapi():
    return jsonify(openapi_spec())
