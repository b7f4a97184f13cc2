"""The GPU worker's engine: loaded once, and every torch op on one thread at a time (OpenMP teams)."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

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
