"""`make demo`: start the local stack, transcribe a generated talking-face clip end to end, stop.

The clip is scikit-image's astronaut portrait animated into a short "talk" with sound
(`deploy/local/sample_media.py`), uploaded to the local S3, submitted to `POST /v1/jobs`,
polled by job id until done; the job JSON and the SRT subtitles are printed.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import requests

from deploy.local.sample_media import write_face_video
from deploy.local.stack import Stack, StackConfig

INPUT_BUCKET = "avsr-inputs"


def run_demo(seconds: float = 4.0) -> dict:
    config = StackConfig(model_path=os.environ.get("AVHUBERT_MODEL_PATH", ""))
    print("starting the local stack (Redis, S3, API, CPU worker, GPU-queue worker, Flower)...", flush=True)
    stack = Stack(config).start()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            clip = Path(tmp) / "astronaut_talk.mp4"
            write_face_video(clip, seconds=seconds, with_audio=True, seed=0)
            stack.s3_client().upload_file(str(clip), INPUT_BUCKET, "demo/astronaut_talk.mp4")
        print(f"uploaded s3://{INPUT_BUCKET}/demo/astronaut_talk.mp4 ({seconds:.0f} s, 640x480, with audio)")
        headers = {"Authorization": f"Bearer {config.api_key}"}
        response = requests.post(f"{config.api_url}/v1/jobs", headers=headers, timeout=10, json={
            "s3_bucket": INPUT_BUCKET, "s3_key": "demo/astronaut_talk.mp4", "modality": "auto", "beam_size": 5})
        response.raise_for_status()
        job_id = response.json()["job_id"]
        print(f"POST /v1/jobs -> {response.status_code} job_id={job_id}")
        deadline = time.monotonic() + 600
        last = None
        while time.monotonic() < deadline:
            job = requests.get(f"{config.api_url}/v1/jobs/{job_id}", headers=headers, timeout=10).json()
            state = (job["status"], job["stage"], job["progress"])
            if state != last:
                print(f"  {job['status']:<9} stage={job['stage']:<13} progress={job['progress']:.2f}", flush=True)
                last = state
            if job["status"] in ("succeeded", "failed", "cancelled"):
                break
            time.sleep(0.5)
        print(json.dumps(job, indent=2))
        if job["status"] == "succeeded":
            srt = requests.get(f"{config.api_url}/v1/jobs/{job_id}/result?format=srt", headers=headers, timeout=10)
            print("--- result.srt ---\n" + srt.text)
        return job
    finally:
        print("stopping the local stack...", flush=True)
        stack.stop()


def main() -> int:
    job = run_demo()
    if job["status"] != "succeeded":
        return 1
    if not os.environ.get("AVHUBERT_MODEL_PATH"):
        print("NOTE: random-weight demo model — the text above is meaningless. Set AVHUBERT_MODEL_PATH.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
