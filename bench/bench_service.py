"""Service latency and throughput, against the same work done in-process, in one run.

    python -m bench.bench_service [--runs 10] [--inflight 20] [--checkpoint PATH]

Starts a private local stack (Redis DB 13, SeaweedFS, gunicorn API, one CPU worker with
concurrency 2, the GPU-queue worker) on bench ports, uploads a 3-second clip as 75 JPEG frames
(the astronaut talking face, 640x480), then measures
  * in-process: S3 GETs + mouth ROIs + AV-HuBERT decode, called directly (the baseline);
  * submit→done latency through the API/Celery/S3 path, one job at a time (p50/p95);
  * throughput with `--inflight` jobs submitted at once, and that none is lost.
The model defaults to the tiny random-weight checkpoint the local stack makes: this measures the
service around the model; `bench/bench_model.py` measures the model.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import requests

from cpu_worker.frames import ImageSequence
from cpu_worker.mouth_roi import extract_mouth_rois
from deploy.local.sample_media import make_face_frames
from deploy.local.stack import Stack, StackConfig
from gpu_worker.engine import Engine

ROOT = Path(__file__).resolve().parents[1]

BUCKET, PREFIX, FRAMES = "avsr-bench", "clip75/", 75


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def wait(api: str, headers: dict, job_id: str, timeout: float = 600) -> tuple[dict, float]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = requests.get(f"{api}/v1/jobs/{job_id}", headers=headers, timeout=10).json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job, time.monotonic()
        time.sleep(0.02)
    raise TimeoutError(job_id)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--inflight", type=int, default=20)
    parser.add_argument("--checkpoint", default="")
    args = parser.parse_args()

    config = StackConfig(state_dir=ROOT / "var" / "bench-stack", redis_url="redis://127.0.0.1:6379/13",
                         s3_port=23333, weed_base_port=24333, api_port=23000, flower_port=23555,
                         buckets=(BUCKET,), model_path=args.checkpoint, api_key="bench-key")
    import redis

    redis.Redis.from_url(config.redis_url).flushdb()
    stack = Stack(config)
    stack.start()
    try:
        s3 = stack.s3_client()
        jpegs = [cv2.imencode(".jpg", f, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()
                 for f in make_face_frames(FRAMES, seed=1)]
        for i, body in enumerate(jpegs):
            s3.put_object(Bucket=BUCKET, Key=f"{PREFIX}frame_{i}.jpg", Body=body)

        engine = Engine(config.model_path, device="cpu")
        engine.warm_up()
        in_process = []
        for _ in range(max(3, args.runs // 2)):
            started = time.perf_counter()
            bodies = [s3.get_object(Bucket=BUCKET, Key=f"{PREFIX}frame_{i}.jpg")["Body"].read()
                      for i in range(FRAMES)]
            roi = extract_mouth_rois(ImageSequence(bodies, fps=25.0))
            engine.transcribe(rois=roi.rois, audio=None, segments=[{"id": 0, "start_frame": 0,
                              "end_frame": len(roi)}], modality="video", beam_size=5)
            in_process.append(time.perf_counter() - started)

        api, headers = config.api_url, {"X-API-Key": config.api_key}
        body = {"s3_bucket": BUCKET, "s3_prefix": PREFIX, "beam_size": 5}
        latency, stages = [], []
        for _ in range(args.runs):
            started = time.monotonic()
            job_id = requests.post(f"{api}/v1/jobs", json=body, headers=headers, timeout=10).json()["job_id"]
            job, done = wait(api, headers, job_id)
            assert job["status"] == "succeeded", job
            latency.append(done - started)
            stages.append(job["result"]["timings"])

        started = time.monotonic()
        ids = [requests.post(f"{api}/v1/jobs", json=body, headers=headers, timeout=10).json()["job_id"]
               for _ in range(args.inflight)]
        results = [wait(api, headers, job_id)[0] for job_id in ids]
        wall = time.monotonic() - started
        succeeded = sum(r["status"] == "succeeded" for r in results)
    finally:
        stack.stop()

    base = statistics.median(in_process)
    print(f"clip: {FRAMES} JPEG frames 640x480 (3 s) in S3; model {Path(config.model_path).name}; CPU only")
    print(f"{'path':<34}{'p50 s':>9}{'p95 s':>9}")
    print(f"{'in-process (GET+ROI+decode)':<34}{base:>9.3f}{percentile(in_process, 95):>9.3f}")
    print(f"{'service submit->done':<34}{statistics.median(latency):>9.3f}{percentile(latency, 95):>9.3f}")
    print(f"service / in-process (p50): {statistics.median(latency) / base:.2f}x "
          f"(overhead {statistics.median(latency) - base:+.3f} s)")
    mean_stage = {k: statistics.mean(t.get(k, 0.0) for t in stages) for k in stages[0]}
    print("mean stage seconds: " + ", ".join(f"{k} {v:.3f}" for k, v in mean_stage.items()))
    print(f"throughput: {args.inflight} jobs in flight -> {wall:.1f} s wall, "
          f"{args.inflight / wall * 60:.1f} jobs/min, {args.inflight * 3 / wall:.2f}x real time; "
          f"{succeeded}/{args.inflight} succeeded, {args.inflight - succeeded} lost or failed")
    return 0 if succeeded == args.inflight else 1


if __name__ == "__main__":
    sys.exit(main())
