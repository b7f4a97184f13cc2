"""A long talk end to end through the running stack: wall time, real-time factor, worker memory.

    python -m bench.bench_long [--seconds 600] [--workers 1] [--early 0 1] [--size base] [--precision fp32]
                               [--until-first-text]

Writes a synthetic 640x480 talking-face video with audio (`deploy/local/sample_media.py`),
starts a private stack with a random-weight AV-HuBERT of the official Base (or Large/tiny) size,
and for each precision (`AVSR_PRECISION`: fp32, or the opt-in CPU int8/bf16), CPU-worker count and
early-inference setting (`AVSR_EARLY_INFERENCE`) submits the video
as one job (`modality auto` → audio-visual), then reports wall time, real-time factor (processing
time / clip duration), when the first segment's text was in the job status (`partial_segments`),
segments (and how many inference reused from early decodes), and the peak RSS of every worker process
tree. The first run is the baseline of the speed-up (e.g. fp32, 1 worker, early inference off).
`--until-first-text` cancels each job once its first text is in the status and reports only that time
(the latency a client sees on a long clip, without waiting for the whole run).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests
import torch

from deploy.local.sample_media import write_face_video
from deploy.local.stack import Stack, StackConfig
from gpu_worker.avhubert.random_checkpoint import make_random_checkpoint

ROOT = Path(__file__).resolve().parents[1]

BUCKET = "avsr-bench"


def tree_pids(pid: int) -> list[int]:
    """`pid` and all its descendants (prefork pool children)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            children = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            children = []
        todo.extend(int(c) for c in children)
    return out


def rss_kib(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of `pid` so far (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class PeakSampler(threading.Thread):
    """Samples the summed RSS of each named process tree every 0.2 s; keeps the peak, and the CPU seconds
    each tree spent from `start()` to `stop` (of its processes alive at the end)."""

    def __init__(self, pids: dict[str, int]):
        super().__init__(daemon=True)
        self.pids, self.peak = pids, dict.fromkeys(pids, 0)
        self.cpu_s: dict[str, float] = {}
        self.stop = threading.Event()

    def _cpu(self) -> dict[int, float]:
        return {p: cpu_seconds(p) for pid in self.pids.values() for p in tree_pids(pid)}

    def run(self) -> None:
        before = self._cpu()
        while not self.stop.is_set():
            for name, pid in self.pids.items():
                total = sum(rss_kib(p, "VmRSS") for p in tree_pids(pid))
                self.peak[name] = max(self.peak[name], total)
            self.stop.wait(0.2)
        after = self._cpu()
        self.cpu_s = {name: round(sum(after[p] - before.get(p, 0.0) for p in tree_pids(pid) if p in after), 1)
                      for name, pid in self.pids.items()}


def run_once(video: Path, seconds: float, workers: int, checkpoint: Path, early: bool,
             until_first_text: bool = False, precision: str = "fp32") -> dict:
    config = StackConfig(state_dir=ROOT / "var" / f"bench-long-{workers}", redis_url="redis://127.0.0.1:6379/12",
                         s3_port=25333, weed_base_port=26333, api_port=25000, flower_port=25555,
                         buckets=(BUCKET,), model_path=str(checkpoint), cpu_workers=workers, cpu_concurrency=1,
                         api_key="bench-key", extra_env={"AVSR_CPU_THREADS": str(max(1, 2 // workers)),
                                                         "AVSR_EARLY_INFERENCE": "1" if early else "0",
                                                         "AVSR_PRECISION": precision})
    import redis

    redis.Redis.from_url(config.redis_url).flushdb()
    stack = Stack(config).start()
    try:
        stack.s3_client().upload_file(str(video), BUCKET, "long/talk.mp4")
        sampler = PeakSampler({n: p for n, p in stack.pids.items() if n.startswith(("cpu", "gpu"))})
        sampler.start()
        headers = {"X-API-Key": config.api_key}
        started = time.monotonic()
        job_id = requests.post(f"{config.api_url}/v1/jobs", headers=headers, timeout=10,
                               json={"s3_bucket": BUCKET, "s3_key": "long/talk.mp4", "beam_size": 5}).json()["job_id"]
        first_text: float | None = None
        while True:
            job = requests.get(f"{config.api_url}/v1/jobs/{job_id}", headers=headers, timeout=10).json()
            if first_text is None and (job.get("partial_segments") or job["status"] == "succeeded"):
                first_text = time.monotonic() - started
                if until_first_text and job["status"] != "succeeded":
                    requests.delete(f"{config.api_url}/v1/jobs/{job_id}", headers=headers, timeout=10)
                    job = {**job, "status": "cancelled"}
            if job["status"] in ("succeeded", "failed", "cancelled"):
                break
            time.sleep(0.5)
        wall = time.monotonic() - started
        sampler.stop.set()
        sampler.join()
    finally:
        stack.stop()
    if until_first_text and first_text is not None:
        return {"precision": precision, "workers": workers, "early": early, "first_text_s": first_text,
                "first_segments": job.get("partial_segments", [])}
    if job["status"] != "succeeded":
        raise RuntimeError(f"job failed: {job.get('error')}")
    result = job["result"]
    return {"precision": precision, "workers": workers, "early": early, "wall_s": wall, "rtf": wall / seconds,
            "first_text_s": first_text,
            "segments": len(result["segments"]), "reused": job.get("segments_reused", 0), "text": result["text"],
            "frames": result["num_frames"], "timings": result["timings"],
            "peak_rss_mib": {k: round(v / 1024) for k, v in sampler.peak.items()}, "cpu_s": sampler.cpu_s}


def _label(run: dict) -> str:
    return f"{run['precision']}, {run['workers']} CPU workers, early {'on' if run['early'] else 'off'}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=600.0)
    parser.add_argument("--workers", type=int, nargs="+", default=[1])
    parser.add_argument("--early", type=int, nargs="+", default=[0, 1], choices=[0, 1],
                        help="early inference off (0) and/or on (1), each with every worker count")
    parser.add_argument("--size", default="base", choices=["tiny", "base", "large"])
    parser.add_argument("--precision", nargs="+", default=["fp32"], choices=["fp32", "bf16", "int8"],
                        help="the GPU-queue worker's AVSR_PRECISION (bf16/int8: opt-in CPU reduced precision)")
    parser.add_argument("--until-first-text", action="store_true",
                        help="cancel each job once its first text is in the status; report only that time")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(tmp) / f"avhubert-random-{args.size}.pt"
        make_random_checkpoint(checkpoint, size=args.size, seed=0)
        video = Path(tmp) / "talk.mp4"
        started = time.monotonic()
        write_face_video(video, seconds=args.seconds, with_audio=True, seed=7)
        print(f"wrote a {args.seconds:.0f} s 640x480 talk with audio in {time.monotonic() - started:.0f} s "
              f"({video.stat().st_size / 1e6:.1f} MB); model: random {args.size}; {os.cpu_count()} cores, "
              f"{torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU'}",
              flush=True)
        runs = [run_once(video, args.seconds, w, checkpoint, bool(e), args.until_first_text, p)
                for p in args.precision for w in args.workers for e in args.early]
    if args.until_first_text:
        for r in runs:
            shown = r["first_segments"][:1]
            print(f"{_label(r)}: first text in the status "
                  f"{r['first_text_s']:.1f} s after submit ({len(r['first_segments'])} segments then; first: "
                  f"{shown[0]['start'] if shown else '-'}-{shown[0]['end'] if shown else '-'} s)")
        return 0
    print(f"{'precision':>9}{'cpu workers':>12}{'early':>6}{'wall s':>9}{'RTF':>7}{'first text s':>13}{'segments':>9}"
          f"{'reused':>7}  stage seconds (summed over tasks)                 peak RSS MiB; CPU seconds")
    for r in runs:
        stages = ", ".join(f"{k} {v:.0f}" for k, v in r["timings"].items())
        print(f"{r['precision']:>9}{r['workers']:>12}{'on' if r['early'] else 'off':>6}{r['wall_s']:>9.1f}"
              f"{r['rtf']:>7.2f}{r['first_text_s']:>13.1f}{r['segments']:>9}{r['reused']:>7}  {stages:<48} "
              f"{r['peak_rss_mib']}; {r['cpu_s']}")
    for r in runs[1:]:
        print(f"{_label(r)} vs the first run: wall "
              f"{runs[0]['wall_s'] / r['wall_s']:.2f}x, first text {runs[0]['first_text_s'] / r['first_text_s']:.2f}x "
              f"sooner; same text: {r['text'] == runs[0]['text']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
