"""The GPU worker's engine: loaded once, and every torch op on one thread at a time (OpenMP teams)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from gpu_worker import runtime
from gpu_worker.engine import Engine, segment_inputs
from tasks.settings import get_settings

CHECKPOINT = Path(__file__).resolve().parents[1] / "fixtures" / "avhubert_reference" / "checkpoints" / "finetune_s2s.pt"


def test_the_model_loads_on_a_thread_that_ends_and_decodes_on_the_batchers(monkeypatch, single_torch_thread):
    """Loading and the warm-up run torch ops on a thread of their own, which has ended before any decode,
    never on the calling (main) thread: libgomp keeps a team per thread that ran a parallel op, and with
    more teams than cores every small op of a beam step waits for a wake-up. Decoding runs on the batcher's
    thread."""
    monkeypatch.setenv("AVHUBERT_MODEL_PATH", str(CHECKPOINT))
    get_settings.cache_clear()
    monkeypatch.setattr(runtime, "_engine", None)
    monkeypatch.setattr(runtime, "_batcher", None)
    seen: dict[str, list[threading.Thread]] = {"__init__": [], "warm_up": [], "decode": []}

    def spy(name: str):
        original = getattr(Engine, name)

        def spied(self, *args, **kwargs):
            seen[name].append(threading.current_thread())
            return original(self, *args, **kwargs)
        return spied

    for name in seen:
        monkeypatch.setattr(Engine, name, spy(name))
    try:
        runtime.load_engine()
        loaders = seen["__init__"] + seen["warm_up"]
        assert loaders and all(t is loaders[0] for t in loaders)
        assert loaders[0] is not threading.current_thread() and not loaders[0].is_alive()
        rois = np.random.default_rng(0).integers(0, 256, size=(30, 96, 96), dtype=np.uint8)
        items = segment_inputs(rois, None, [{"id": 0, "start_frame": 0, "end_frame": 30}], "video")
        decoded = runtime.batcher().decode_items(items, modality="video", beam_size=2)
        assert len(decoded) == 1 and decoded[0]["id"] == 0
        decoders = [t for t in seen["decode"] if t is not loaders[0]]
        assert decoders and all(t.name == "avsr-batcher" for t in decoders)
    finally:
        get_settings.cache_clear()


def test_inference_waits_for_early_segments_its_own_batcher_is_decoding(monkeypatch):
    """However long an early batch of the job takes in this worker's batcher, `infer` does not decode its
    segments a second time (before, it gave up after AVSR_EARLY_WAIT_S without news); segments in flight
    elsewhere are still awaited only while news keeps coming."""
    from gpu_worker import tasks as gpu_tasks

    monkeypatch.setenv("AVSR_EARLY_WAIT_S", "0.5")  # far shorter than the early batch here takes
    get_settings.cache_clear()
    monkeypatch.setattr(gpu_tasks, "_POLL_S", 0.01)
    spans = [{"id": 0, "start_frame": 0, "end_frame": 10}, {"id": 1, "start_frame": 10, "end_frame": 20}]
    polls = {"n": 0}
    early_result = {"text": "early", "confidence": 0.5, "score": -1.0, "num_tokens": 2, "words": [],
                    "end_logprob": -0.1}

    class Batcher:
        def __init__(self) -> None:
            self.decoded: list[int] = []

        def working_for(self, job_id: str) -> bool:
            polls["n"] += 1
            if polls["n"] < 60:  # the early batch of segment 0 decodes here for a while (> 0.5 s)
                time.sleep(0.02)
            return polls["n"] < 60

        def decode_items(self, items, **_kwargs):
            self.decoded.extend(int(i) for i in items)
            return [{**early_result, "text": f"late {i}"} for i in items]

    batcher = Batcher()
    monkeypatch.setattr(runtime, "batcher", lambda: batcher)
    # its result is stored a little after the batcher is done with it (the early task's thread stores it)
    monkeypatch.setattr(gpu_tasks.early, "in_flight", lambda job_id: {(0, 10)} if polls["n"] < 63 else set())
    monkeypatch.setattr(gpu_tasks, "_stored", lambda job_id, sp, dg: [
        early_result if s["id"] == 0 and polls["n"] >= 62 else None for s in sp])
    results: list = [None, None]
    try:
        taken = gpu_tasks._decode_missing("job", [0, 1], spans, ["d0", "d1"], results, "video", 2,
                                          lambda _results: None)
    finally:
        get_settings.cache_clear()
    assert batcher.decoded == [1]  # segment 0 came from its early batch, never decoded again
    assert taken == 1 and results[0]["text"] == "early" and results[1]["text"] == "late 1"


def test_a_model_that_failed_to_load_fails_jobs_model_unavailable_without_its_path(monkeypatch, tmp_path):
    """The job's error names the load error's type; its message (the checkpoint's path on the GPU host) stays in
    the worker's log and heartbeat, as /health shows it."""
    from tasks.errors import JobError

    secret = tmp_path / "srv-secret" / "finetune.pt"
    monkeypatch.setenv("AVHUBERT_MODEL_PATH", str(secret))
    get_settings.cache_clear()
    monkeypatch.setattr(runtime, "_engine", None)
    monkeypatch.setattr(runtime, "_batcher", None)
    monkeypatch.setattr(runtime, "_engine_error", None)
    try:
        with pytest.raises(JobError) as info:
            runtime.engine()
        assert info.value.code == "model_unavailable" and info.value.retryable
        assert info.value.message.startswith("the model is not loaded: ") and "srv-secret" not in info.value.message
        assert "(details in the GPU worker's log)" in info.value.message
        assert "srv-secret" in (runtime.model_state()["model_error"] or "")  # the operator's view keeps it
    finally:
        get_settings.cache_clear()
