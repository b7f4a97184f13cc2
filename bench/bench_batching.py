"""Batching across jobs: throughput of the GPU worker with cross-job batching against without, one run.

    python -m bench.bench_batching [--jobs 50] [--clips 5] [--size base] [--concurrency 8] [--linger-ms 25]

Starts a private local stack (Redis, SeaweedFS, API, a CPU worker, the GPU-queue worker) with a
random-weight AV-HuBERT of the official Base size (`make_random_checkpoint`, as `bench/bench_model.py`
writes it), and runs `--clips` different 3-second talking-face clips (75 JPEG frames each,
`deploy/local/sample_media.py`) through the whole pipeline once. Then, for each mode, a GPU worker
of the bench's own (the stack's stops consuming) gets `--jobs` concurrent `avsr.infer` tasks — real
Celery tasks on the `gpu` queue, each with its own job record and its own copy of a clip's
`features.npz` in S3 — and the bench measures, from the moment all are published:
  * without: AVSR_GPU_CONCURRENT_JOBS=1, AVSR_BATCH_LINGER_MS=0 — one job at a time, its segments
    batched within the job (what the GPU worker did before batching across jobs);
  * with: AVSR_GPU_CONCURRENT_JOBS=--concurrency, AVSR_BATCH_LINGER_MS=--linger-ms.
It prints jobs/s, the ratio, p50/p95 job latency (publish → result stored), the batches the worker
ran, and checks that every job decoded the same text in both modes.

Why the inference stage only: on the 2-core development machine the CPU stages (JPEG decode, face
tracking, mouth ROIs) of 50 jobs would share the cores with the model and are the same in both modes;
the measured path is everything that batching changes — broker, GPU worker, S3 read, job-record
updates, model — with nothing else competing for the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import cv2
import redis
import requests
import torch

from bench.bench_service import percentile
from deploy.local.sample_media import make_face_frames
from deploy.local.stack import Stack, StackConfig
from gpu_worker.avhubert.random_checkpoint import make_random_checkpoint

ROOT = Path(__file__).resolve().parents[1]
BUCKET, FRAMES = "avsr-bench", 75


def wait_job(api: str, headers: dict, job_id: str, timeout: float = 600) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = requests.get(f"{api}/v1/jobs/{job_id}", headers=headers, timeout=10).json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.2)
    raise TimeoutError(job_id)


def prepare_clips(stack: Stack, clips: int) -> list[tuple[str, dict]]:
    """Each clip through the whole pipeline once: (job id holding its features.npz, its segment plan)."""
    from tasks.celery_app import app

    s3, api, headers = stack.s3_client(), stack.config.api_url, {"X-API-Key": stack.config.api_key}
    ids = []
    for c in range(clips):
        for i, frame in enumerate(make_face_frames(FRAMES, seed=100 + c)):
            body = cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()
            s3.put_object(Bucket=BUCKET, Key=f"clip{c}/frame_{i}.jpg", Body=body)
        ids.append(requests.post(f"{api}/v1/jobs", headers=headers, timeout=10,
                                 json={"s3_bucket": BUCKET, "s3_prefix": f"clip{c}/", "beam_size": 5}).json()["job_id"])
    out = []
    for job_id in ids:
        job = wait_job(api, headers, job_id)
        assert job["status"] == "succeeded", job
        out.append((job_id, app.AsyncResult(f"{job_id}.infer").get(timeout=60)["plan"]))
    return out


def run_mode(stack: Stack, name: str, env: dict[str, str], clips: list[tuple[str, dict]], jobs_n: int) -> dict:
    """`jobs_n` concurrent infer tasks on a GPU worker started with `env`: wall, latencies, texts, batches."""
    from tasks import jobs, storage
    from tasks.celery_app import app
    from tasks.storage import work_key

    log = stack.logs / f"{name}.log"
    log.unlink(missing_ok=True)  # the stack appends to a worker's log: count this run's batches only
    worker = stack.start_worker(name, "gpu", env=env)
    deadline = time.monotonic() + 300
    while "ready." not in (log.read_text() if log.exists() else ""):
        assert worker.poll() is None and time.monotonic() < deadline, f"{name} did not start"
        time.sleep(0.2)
    try:
        request = {"input": {"type": "frames", "bucket": BUCKET, "prefix": "clip0/", "fps": 25.0},
                   "modality": "video", "beam_size": 5, "output": None, "callback_url": None}
        tasks = []
        for n in range(jobs_n):
            source, plan = clips[n % len(clips)]
            job_id = jobs.create(request)["job_id"]
            storage.s3_client().copy_object(
                Bucket=storage.work_bucket(), Key=work_key(job_id, "features.npz"),
                CopySource={"Bucket": storage.work_bucket(), "Key": work_key(source, "features.npz")})
            tasks.append((n % len(clips), plan, job_id))
        started = time.monotonic()
        results = [app.send_task("avsr.infer", args=(plan, job_id), queue="gpu", task_id=f"{job_id}.infer")
                   for _, plan, job_id in tasks]
        done: dict[int, float] = {}
        while len(done) < len(results):
            for i, result in enumerate(results):
                if i not in done and result.ready():
                    done[i] = time.monotonic()
            time.sleep(0.02)
        wall = max(done.values()) - started
        texts = [(tasks[i][0], tuple(d["text"] for d in r.get(timeout=10)["decoded"])) for i, r in enumerate(results)]
    finally:
        worker.terminate()
        worker.wait(120)
    batches = [line for line in log.read_text().splitlines() if '"batch decoded"' in line]
    sizes = [json.loads(b)["segments"] for b in batches]
    return {"wall": wall, "latency": [done[i] - started for i in range(len(results))], "texts": texts,
            "batches": len(sizes), "mean_batch": statistics.mean(sizes) if sizes else 0.0}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=50)
    parser.add_argument("--clips", type=int, default=5)
    parser.add_argument("--size", default="base", choices=["tiny", "base", "large"])
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--linger-ms", type=float, default=25.0)
    parser.add_argument("--port-base", type=int, default=int(os.environ.get("AVSR_TEST_PORT_BASE", "27000")))
    parser.add_argument("--redis-db", type=int, default=int(os.environ.get("AVSR_TEST_REDIS_DB", "14")))
    args = parser.parse_args()

    state = ROOT / "var" / "bench-batching"
    checkpoint = make_random_checkpoint(state / "model" / f"avhubert-random-{args.size}.pt", size=args.size, seed=0)
    config = StackConfig(state_dir=state, redis_url=f"redis://127.0.0.1:6379/{args.redis_db}",
                         s3_port=args.port_base + 333, weed_base_port=args.port_base + 1333, api_port=args.port_base,
                         flower_port=args.port_base + 555, buckets=(BUCKET,), model_path=str(checkpoint),
                         api_key="bench-key")
    redis.Redis.from_url(config.redis_url).flushdb()
    os.environ.update(config.env())  # this process publishes tasks and writes job records like the API
    from tasks.settings import get_settings

    get_settings.cache_clear()
    stack = Stack(config).start()
    try:
        from celery import Celery

        control = Celery(broker=config.redis_url).control
        clips = prepare_clips(stack, args.clips)
        control.cancel_consumer("gpu", destination=[f"gpu@{socket.gethostname()}"], reply=True, timeout=10)
        without = run_mode(stack, "gpu-without", {"AVSR_GPU_CONCURRENT_JOBS": "1", "AVSR_BATCH_LINGER_MS": "0"},
                           clips, args.jobs)
        with_ = run_mode(stack, "gpu-with", {"AVSR_GPU_CONCURRENT_JOBS": str(args.concurrency),
                                             "AVSR_BATCH_LINGER_MS": str(args.linger_ms)}, clips, args.jobs)
    finally:
        stack.stop()

    same = sum(a == b for a, b in zip(without["texts"], with_["texts"], strict=True))
    print(f"{args.jobs} concurrent 3-s jobs ({FRAMES} frames, video, beam 5) over {args.clips} clips; model: random "
          f"{args.size} ({checkpoint.name}); {os.cpu_count()} cores, "
          f"GPU worker device {os.environ.get('AVSR_DEVICE', 'auto')} "
          f"({torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU'}); "
          "inference stage through Celery/Redis/S3")
    print(f"{'mode':<44}{'wall s':>8}{'jobs/s':>8}{'p50 s':>8}{'p95 s':>8}{'batches':>9}{'segs/batch':>11}")
    for label, r in (("without (1 job at a time, linger 0)", without),
                     (f"with ({args.concurrency} jobs, linger {args.linger_ms:g} ms)", with_)):
        print(f"{label:<44}{r['wall']:>8.1f}{args.jobs / r['wall']:>8.2f}{statistics.median(r['latency']):>8.1f}"
              f"{percentile(r['latency'], 95):>8.1f}{r['batches']:>9}{r['mean_batch']:>11.1f}")
    ratio = without["wall"] / with_["wall"]
    print(f"throughput with / without cross-job batching: {ratio:.2f}x; same text in both modes: {same}/{args.jobs}")
    return 0 if same == args.jobs else 1


if __name__ == "__main__":
    sys.exit(main())
