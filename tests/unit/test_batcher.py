"""Batching across jobs (gpu_worker/batcher.py): segments of several jobs decoded in one forward pass
give exactly what each job gives decoded alone; a cancelled or failing job stops only itself.

Batches are made deterministic without timing: the linger window is long and the size cap is the
number of segments the test submits, so the batch forms once every job has handed its segments in.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import numpy as np
import pytest

from gpu_worker.batcher import Batcher
from gpu_worker.engine import Engine
from tests.conftest import REFERENCE

LONG_LINGER_S = 600.0  # never reached: the size cap completes each batch


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(REFERENCE / "checkpoints" / "finetune_s2s.pt", device="cpu", max_batch_frames=10_000)


@pytest.fixture(scope="module")
def clips() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Two different clips (random 75 frames, the 50-frame face) with their audio features."""
    from cpu_worker.audio import audio_features

    raw = np.load(REFERENCE / "inputs" / "raw_inputs.npz")
    return {name: (raw[f"{name}__video_uint8"], audio_features(raw[f"{name}__wav_int16"], 16000)[: 75])
            for name in ("rand75", "face50")}


# Job A: two segments of the random clip; job B: three of the face clip, lengths 50, 30, 20.
JOBS = {"a": ("rand75", [{"id": 0, "start_frame": 0, "end_frame": 40}, {"id": 1, "start_frame": 40, "end_frame": 75}]),
        "b": ("face50", [{"id": 0, "start_frame": 0, "end_frame": 50}, {"id": 1, "start_frame": 10, "end_frame": 40},
                         {"id": 2, "start_frame": 30, "end_frame": 50}])}


def run_jobs(batcher: Batcher, calls: dict[str, Callable[[], list]]) -> dict[str, list | BaseException]:
    """Run each call in a thread of its own (as the GPU worker's task threads do); result or exception."""
    out: dict[str, list | BaseException] = {}

    def run(name: str, call: Callable[[], list]) -> None:
        try:
            out[name] = call()
        except BaseException as exc:
            out[name] = exc

    threads = [threading.Thread(target=run, args=item) for item in calls.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


@pytest.mark.parametrize("modality", ["video", "audiovisual"])
def test_jobs_batched_together_equal_each_job_alone(engine, clips, modality, single_torch_thread):
    batches: list[list[tuple[int, int]]] = []
    batcher = Batcher(engine, linger_s=LONG_LINGER_S, max_batch_frames=10_000, max_batch_size=5,
                      on_batch=batches.append)
    batcher.start()

    def job(name: str) -> Callable[[], list]:
        rois, audio = clips[JOBS[name][0]]
        return lambda: batcher.transcribe(rois=rois, audio=audio, segments=JOBS[name][1], modality=modality,
                                          beam_size=3)

    together = run_jobs(batcher, {"a": job("a"), "b": job("b")})
    assert [sorted(n for _, n in batch) for batch in batches] == [[2, 3]]  # one forward pass, both jobs
    for name, (clip, segments) in JOBS.items():
        rois, audio = clips[clip]
        alone = engine.transcribe(rois=rois, audio=audio, segments=segments, modality=modality, beam_size=3)
        got = together[name]
        assert isinstance(got, list)
        assert [(g["id"], g["text"], g["num_tokens"]) for g in got] == \
            [(a["id"], a["text"], a["num_tokens"]) for a in alone]
        assert [g["score"] for g in got] == pytest.approx([a["score"] for a in alone], abs=1e-4)


def test_progress_reports_each_jobs_segments_in_order_and_a_cancelled_job_stops_alone(engine, clips,
                                                                                      single_torch_thread):
    batches: list[list[tuple[int, int]]] = []
    cancelled = threading.Event()

    def on_batch(batch: list[tuple[int, int]]) -> None:
        batches.append(batch)
        if len(batches) == 2:  # the second batch is taken; it waits until the job has been cancelled
            cancelled.wait(120)

    batcher = Batcher(engine, linger_s=0.0, max_batch_frames=10_000, max_batch_size=1, on_batch=on_batch)
    batcher.start()
    rois, _ = clips["face50"]
    segments = JOBS["b"][1]
    seen: list[list[int | None]] = []

    class Cancelled(Exception):
        pass

    def report(results: list) -> None:
        seen.append([None if r is None else r["id"] for r in results])

    def cancel_after_first(results: list) -> None:
        report(results)
        raise Cancelled()

    out = run_jobs(batcher, {
        "cancelled": lambda: batcher.transcribe(rois=rois, audio=None, segments=segments, modality="video",
                                                beam_size=2, on_progress=cancel_after_first)})
    cancelled.set()
    assert isinstance(out["cancelled"], Cancelled)
    assert seen == [[0, None, None]]
    seen.clear()
    done = batcher.transcribe(rois=rois, audio=None, segments=segments, modality="video", beam_size=2,
                              on_progress=report)
    assert [d["id"] for d in done] == [0, 1, 2]
    assert seen == [[0, None, None], [0, 1, None], [0, 1, 2]]
    # job 0's third segment never reached a batch; the batcher went on with job 1
    assert batches == [[(0, 1)], [(0, 1)], [(1, 1)], [(1, 1)], [(1, 1)]]


def test_a_failing_batch_fails_only_the_job_that_raises(engine, clips, monkeypatch, single_torch_thread):
    batches: list[list[tuple[int, int]]] = []
    batcher = Batcher(engine, linger_s=LONG_LINGER_S, max_batch_frames=10_000, max_batch_size=5,
                      on_batch=batches.append)
    batcher.start()
    decode = engine.decode

    def decode_but_not_job_b(items, beam_size):
        if any(item.span["end_frame"] == 50 for item in items):  # job B's first segment (none of job A's)
            raise RuntimeError("this input breaks the model")
        return decode(items, beam_size)

    monkeypatch.setattr(engine, "decode", decode_but_not_job_b)
    segments_b = [{"id": 0, "start_frame": 0, "end_frame": 50}, {"id": 1, "start_frame": 10, "end_frame": 40},
                  {"id": 2, "start_frame": 20, "end_frame": 40}]
    out = run_jobs(batcher, {
        "a": lambda: batcher.transcribe(rois=clips["rand75"][0], audio=None, segments=JOBS["a"][1],
                                        modality="video", beam_size=2),
        "b": lambda: batcher.transcribe(rois=clips["face50"][0], audio=None, segments=segments_b,
                                        modality="video", beam_size=2),
    })
    assert isinstance(out["b"], RuntimeError)
    a = out["a"]
    assert isinstance(a, list) and [d["id"] for d in a] == [0, 1]
    assert [sorted(n for _, n in batch) for batch in batches] == [[2, 3]]


def test_a_batch_that_cannot_be_planned_fails_its_jobs_and_the_thread_lives_on(engine, clips, single_torch_thread):
    calls = []

    def on_batch(batch):
        calls.append(batch)
        if len(calls) == 1:
            raise MemoryError("planning the first batch failed")

    batcher = Batcher(engine, linger_s=0.0, max_batch_frames=10_000, max_batch_size=5, on_batch=on_batch)
    batcher.start()
    rois = clips["rand75"][0]
    with pytest.raises(MemoryError):
        batcher.transcribe(rois=rois, audio=None, segments=JOBS["a"][1], modality="video", beam_size=1)
    again = batcher.transcribe(rois=rois, audio=None, segments=JOBS["a"][1], modality="video", beam_size=1)
    assert [d["id"] for d in again] == [0, 1]


def test_a_decode_that_hangs_fails_the_job_with_timeout(engine, clips, monkeypatch):
    from tasks.errors import JobError

    release = threading.Event()

    def hang(items, beam_size):
        release.wait(30)
        return []

    batcher = Batcher(engine, linger_s=0.0, max_batch_frames=10_000, max_batch_size=5, stall_limit_s=0.2)
    monkeypatch.setattr(batcher, "_decode", lambda batch: hang(batch, 1))
    batcher.start()
    try:
        with pytest.raises(JobError) as err:
            batcher.transcribe(rois=clips["rand75"][0], audio=None, segments=JOBS["a"][1], modality="video",
                               beam_size=1)
        assert err.value.code == "timeout"
    finally:
        release.set()


@pytest.mark.parametrize("bad", [{"max_batch_frames": 0}, {"max_batch_size": 0}, {"linger_s": -1.0}])
def test_a_batch_budget_that_can_hold_nothing_is_refused(engine, bad):
    with pytest.raises(ValueError):
        Batcher(engine, **{"linger_s": 0.0, "max_batch_frames": 100, "max_batch_size": 2, **bad})


def test_the_batcher_says_which_jobs_it_is_working_for(engine, clips, single_torch_thread):
    """`working_for(job_id)`: segments of that job are waiting or decoding here (what `infer` asks before it
    gives up waiting for the job's early batches)."""
    from tasks.logs import current_job_id

    rois, segments = clips["rand75"][0], JOBS["a"][1]
    batcher = Batcher(engine, linger_s=0.3, max_batch_frames=10_000, max_batch_size=5)
    batcher.start()
    seen: dict[str, bool] = {}

    def submit() -> None:
        token = current_job_id.set("job-a")
        try:
            batcher.transcribe(rois=rois, audio=None, segments=segments, modality="video", beam_size=2)
        finally:
            current_job_id.reset(token)

    worker = threading.Thread(target=submit)
    worker.start()
    deadline = time.monotonic() + 5
    while not seen.get("a") and time.monotonic() < deadline:
        seen["a"] = batcher.working_for("job-a")
        time.sleep(0.01)
    seen["b"] = batcher.working_for("job-b")
    worker.join()
    assert seen == {"a": True, "b": False}
    assert not batcher.working_for("job-a")  # done
