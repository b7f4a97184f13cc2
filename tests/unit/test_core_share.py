"""Intra-op threads from the cores other processes leave idle (`gpu_worker/core_share.py`)."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from gpu_worker import core_share
from gpu_worker.core_share import CoreShare


@pytest.mark.parametrize(("others_busy", "cores", "max_threads", "expected"), [
    (2.0, 2, 2, 1),  # preprocessing on both cores: one thread
    (1.0, 2, 2, 1),
    (0.0, 2, 2, 2),  # the cores are free again
    (0.3, 2, 2, 2),
    (0.0, 2, 1, 1),  # never more than the process started with
    (3.0, 8, 4, 4),  # a big host: others leave 5 idle
    (7.5, 8, 4, 1),
])
def test_threads_follow_what_the_other_processes_leave_idle(monkeypatch, others_busy, cores, max_threads, expected):
    """The machine's busy time grows by `others_busy` cores plus this process's own time; the threads are
    the cores left, rounded, between 1 and `max_threads`."""
    start = time.monotonic()
    own = {"s": 0.0}

    def own_busy() -> float:  # this process busy on one core all along: not counted as others
        own["s"] = time.monotonic() - start
        return own["s"]

    monkeypatch.setattr(core_share, "_own_busy_s", own_busy)
    monkeypatch.setattr(core_share, "_machine_busy_s",
                        lambda: ((time.monotonic() - start) * others_busy + own["s"], cores))
    share = CoreShare(max_threads, window_s=0.2, period_s=0.02)
    assert share.threads() == max_threads  # nothing to judge by yet
    time.sleep(0.3)
    assert share.threads() == expected


def test_without_proc_stat_the_threads_stay_at_the_maximum(monkeypatch, tmp_path):
    monkeypatch.setattr(core_share, "PROC_STAT", tmp_path / "missing")
    share = CoreShare(2, window_s=0.1, period_s=0.01)
    share.threads()
    time.sleep(0.05)
    assert share.threads() == 2


def test_proc_stat_is_read_on_this_machine():
    busy = core_share._machine_busy_s()
    assert busy is not None and busy[0] > 0 and busy[1] >= 1


def test_the_thread_count_does_not_change_the_decoded_result():
    """1 and 2 intra-op threads give the same scores, bit for bit (outputs, not sums, are split)."""
    from pathlib import Path

    from gpu_worker.engine import Engine, segment_inputs

    engine = Engine(Path(__file__).resolve().parents[1] / "fixtures" / "avhubert_reference" / "checkpoints"
                    / "finetune_s2s.pt", device="cpu")
    rng = np.random.default_rng(1)
    lengths = [29, 50, 75]
    rois = rng.integers(0, 256, size=(sum(lengths), 96, 96), dtype=np.uint8)
    audio = rng.standard_normal((sum(lengths), 104)).astype(np.float32)
    starts = np.cumsum([0, *lengths])
    spans = [{"id": i, "start_frame": int(starts[i]), "end_frame": int(starts[i + 1])} for i in range(3)]
    items = segment_inputs(rois, audio, spans, "audiovisual")
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            engine._cores = None  # hold the count
            results.append([(d["score"], d["confidence"], d["text"]) for d in engine.decode(items, 3)])
    finally:
        torch.set_num_threads(threads)
    assert results[0] == results[1]


def test_the_engine_asks_before_a_batch_each_segment_it_encodes_and_each_decoder_step():
    """A core freed while a batch is encoded (15 s for 16 segments on one core) is taken at the next segment."""
    from pathlib import Path

    from gpu_worker.engine import Engine, segment_inputs

    engine = Engine(Path(__file__).resolve().parents[1] / "fixtures" / "avhubert_reference" / "checkpoints"
                    / "finetune_s2s.pt", device="cpu", max_batch_frames=10_000)
    assert engine._cores is not None
    rois = np.random.default_rng(0).integers(0, 256, size=(60, 96, 96), dtype=np.uint8)
    spans = [{"id": 0, "start_frame": 0, "end_frame": 30}, {"id": 1, "start_frame": 30, "end_frame": 48},
             {"id": 2, "start_frame": 48, "end_frame": 60}]
    asked: list[int] = []
    engine._cores.threads = lambda: asked.append(torch.get_num_threads()) or 1  # type: ignore[method-assign]
    threads = torch.get_num_threads()
    try:
        alone = engine.decode(segment_inputs(rois, None, spans[:1], "video"), 2)
        assert engine.threads == 1 and torch.get_num_threads() == 1
        # the batch, its one segment, then every step (its tokens incl. </s>)
        assert len(asked) == 1 + 1 + alone[0]["num_tokens"]
        asked.clear()
        decoded = engine.decode(segment_inputs(rois, None, spans, "video"), 2)
    finally:
        torch.set_num_threads(threads)
    # the batch, each of its 3 segments (encoded alone at its own length), then every step of the longest
    assert len(asked) == 1 + 3 + max(d["num_tokens"] for d in decoded)


def test_only_the_cores_of_the_affinity_set_count(monkeypatch, tmp_path):
    """In a container pinned to cores 2-3 of a 4-core host, work on cores 0-1 leaves ours idle."""
    stat = tmp_path / "stat"
    tick = core_share.os.sysconf("SC_CLK_TCK")

    def write(busy_per_core: list[int]) -> None:
        lines = [f"cpu  {sum(busy_per_core)} 0 0 0 0 0 0 0 0 0"]
        lines += [f"cpu{i} {busy} 0 0 {1000 - busy} 0 0 0 0 0 0" for i, busy in enumerate(busy_per_core)]
        stat.write_text("\n".join(lines) + "\nintr 1 2 3\n")

    monkeypatch.setattr(core_share, "PROC_STAT", stat)
    monkeypatch.setattr(core_share.os, "sched_getaffinity", lambda pid: {2, 3})
    write([900, 800, 10, 20])
    assert core_share._machine_busy_s() == (30 / tick, 2)
    monkeypatch.setattr(core_share.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    assert core_share._machine_busy_s() == (1730 / tick, 4)
