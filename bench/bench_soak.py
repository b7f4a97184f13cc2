"""Soak: 200 jobs submitted at once, one CPU worker and the GPU worker killed (SIGKILL) mid-run and restarted.

    python -m bench.bench_soak [--jobs 200] [--kill-after 0.2] [--checkpoint PATH]

Starts a private local stack (Redis DB 8, SeaweedFS, gunicorn API, two CPU workers, the GPU-queue
worker) on its own ports, uploads a 3-second clip as 75 JPEG frames, submits `--jobs` jobs at once,
and once `--kill-after` of them have finished kills `cpu1` and `gpu` (process group, SIGKILL: what
the OOM killer or a lost spot instance does) and starts replacements. Reports jobs finished,
failed (by code), lost (not finished by the deadline), duplicated (a job finalized more than once,
from the workers' logs), and the recovery time: from the kill to the first job finishing after it,
and to the last job that was in flight at the kill finishing. Not a timed test: run it alone.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import signal
import sys
import time
from pathlib import Path

import cv2
import redis
import requests

from deploy.local.sample_media import make_face_frames
from deploy.local.stack import Stack, StackConfig

ROOT = Path(__file__).resolve().parents[1]
BUCKET, PREFIX, FRAMES = "avsr-soak", "clip75/", 75
TERMINAL = ("succeeded", "failed", "cancelled")


def poll_all(api: str, headers: dict, ids: list[str]) -> dict[str, dict]:
    return {job_id: requests.get(f"{api}/v1/jobs/{job_id}", headers=headers, timeout=30).json() for job_id in ids}


def finalize_counts(logs: Path) -> collections.Counter:
    """How many times each job's finalize stage completed, across every worker log."""
    counts: collections.Counter = collections.Counter()
    for log in logs.glob("*.log"):
        for line in log.read_text(errors="replace").splitlines():
            if line.startswith("{") and '"finalize done"' in line:
                counts[json.loads(line).get("job_id")] += 1
    return counts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--kill-after", type=float, default=0.2, help="fraction of jobs finished before the kill")
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--checkpoint", default="")
    args = parser.parse_args()

    config = StackConfig(state_dir=ROOT / "var" / "soak-stack", redis_url="redis://127.0.0.1:6379/8",
                         s3_port=25333, weed_base_port=26333, api_port=25000, flower_port=25555, cpu_workers=2,
                         buckets=(BUCKET,), model_path=args.checkpoint, api_key="soak-key",
                         extra_env={"AVSR_RATE_LIMIT": "100000/minute", "AVSR_LOG_JSON": "1"})
    redis.Redis.from_url(config.redis_url).flushdb()
    stack = Stack(config)
    stack.start()
    report: dict[str, object] = {}
    try:
        s3 = stack.s3_client()
        for i, frame in enumerate(make_face_frames(FRAMES, seed=1)):
            body = cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()
            s3.put_object(Bucket=BUCKET, Key=f"{PREFIX}frame_{i}.jpg", Body=body)
        api, headers = config.api_url, {"X-API-Key": config.api_key}
        body = {"s3_bucket": BUCKET, "s3_prefix": PREFIX, "beam_size": 5}
        started = time.monotonic()
        ids = []
        for n in range(args.jobs):
            answer = requests.post(f"{api}/v1/jobs", json=body, timeout=30,
                                   headers=headers | {"Idempotency-Key": f"soak-{n}"})
            answer.raise_for_status()
            ids.append(answer.json()["job_id"])

        killed_at = None
        in_flight_at_kill: set[str] = set()
        deadline = started + args.timeout
        while time.monotonic() < deadline:
            jobs = poll_all(api, headers, ids)
            done = [j for j in jobs.values() if j["status"] in TERMINAL]
            if killed_at is None and len(done) >= args.kill_after * args.jobs:
                in_flight_at_kill = {i for i, j in jobs.items() if j["status"] == "running"}
                for name in ("cpu1", "gpu"):
                    os.killpg(stack.pids[name], signal.SIGKILL)
                killed_at = time.time()
                time.sleep(5)
                stack.start_worker("cpu1b", "cpu", config.cpu_concurrency)
                stack.start_worker("gpub", "gpu")
            if len(done) == len(ids):
                break
            time.sleep(2)
        jobs = poll_all(api, headers, ids)
        wall = time.monotonic() - started
        finished_after = sorted(j["finished_at"] for j in jobs.values()
                                if j.get("finished_at") and killed_at and _ts(j["finished_at"]) > killed_at)
        in_flight_done = [_ts(jobs[i]["finished_at"]) for i in in_flight_at_kill if jobs[i].get("finished_at")]
        finalized = finalize_counts(stack.logs)
        report = {
            "jobs": args.jobs, "distinct_job_ids": len(set(ids)), "wall_s": round(wall, 1),
            "succeeded": sum(j["status"] == "succeeded" for j in jobs.values()),
            "failed": dict(collections.Counter(j["error"]["code"] for j in jobs.values() if j["status"] == "failed")),
            "lost": sum(j["status"] not in TERMINAL for j in jobs.values()),
            "duplicated": sum(1 for i in ids if finalized[i] > 1),
            "in_flight_at_kill": len(in_flight_at_kill),
            "recovery_first_finish_s": round(_ts(finished_after[0]) - killed_at, 1)
            if finished_after and killed_at else None,
            "recovery_in_flight_all_s": round(max(in_flight_done) - killed_at, 1)
            if in_flight_done and killed_at else None,
        }
    finally:
        stack.stop()
    print(json.dumps(report, indent=2))
    return 0 if report.get("lost") == 0 and report.get("duplicated") == 0 else 1


def _ts(iso: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


if __name__ == "__main__":
    sys.exit(main())
