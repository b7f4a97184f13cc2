"""Early decodes in a real Redis (`tasks/early.py`, `gpu_worker/tasks.py`): inference reuses a stored
result only for byte-identical inputs, waits for an early batch that is still decoding, and decodes
the segments of an early batch that never finishes itself, and never decodes again the segments of
an early batch that finishes while it looks."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from gpu_worker import tasks as gpu_tasks
from gpu_worker.batcher import Batcher
from gpu_worker.engine import Engine, segment_inputs
from tasks import early
from tasks.settings import get_settings
from tests.conftest import REFERENCE

pytestmark = pytest.mark.integration

JOB = "e" * 32
SPANS = [{"id": 0, "start_frame": 0, "end_frame": 25}, {"id": 1, "start_frame": 25, "end_frame": 50},
         {"id": 2, "start_frame": 50, "end_frame": 75}]


@pytest.fixture(autouse=True)
def early_store(scratch_redis):
    scratch_redis.setenv("AVSR_EARLY_WAIT_S", "1.5")
    get_settings.cache_clear()


class RecordingBatcher(Batcher):
    """The real batcher, recording the spans of every `decode_items` call."""

    def __init__(self, engine: Engine) -> None:
        super().__init__(engine, linger_s=0.0, max_batch_frames=10_000, max_batch_size=16)
        self.decoded: list[list[int]] = []

    def decode_items(self, items, **kwargs):
        self.decoded.append([item.span["id"] for item in items])
        return super().decode_items(items, **kwargs)


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(REFERENCE / "checkpoints" / "finetune_s2s.pt", device="cpu")


@pytest.fixture
def batcher(engine, monkeypatch) -> RecordingBatcher:
    b = RecordingBatcher(engine)
    b.start()
    monkeypatch.setattr(gpu_tasks.runtime, "batcher", lambda: b)
    return b


@pytest.fixture(scope="module")
def rois() -> np.ndarray:
    return np.load(REFERENCE / "inputs" / "raw_inputs.npz")["rand75__video_uint8"]


def run(engine: Engine, rois: np.ndarray, progress: list) -> list:
    items = segment_inputs(rois, None, SPANS, "video")
    digests = [early.input_digest(i.video, i.audio, modality="video", beam_size=2, model=engine.identity)
               for i in items]
    results = gpu_tasks._stored(JOB, SPANS, digests)
    reused = sum(r is not None for r in results)
    reused += gpu_tasks._decode_missing(JOB, items, SPANS, digests, results, "video", 2, progress.append)
    return [reused, results]


def store(engine: Engine, rois: np.ndarray, k: int, decoded: dict) -> None:
    item = segment_inputs(rois, None, [SPANS[k]], "video")[0]
    early.store_decoded(JOB, {early.input_digest(item.video, None, modality="video", beam_size=2,
                                                 model=engine.identity): decoded}, {k: "x"})


def test_identical_inputs_are_reused_and_others_decoded(engine, batcher, rois):
    alone = engine.transcribe(rois=rois, audio=None, segments=SPANS, modality="video", beam_size=2)
    marker = {**alone[1], "text": "from the store"}  # shows that it was reused, not decoded again
    store(engine, rois, 1, marker)
    changed = rois.copy()
    changed[0, 0, 0] ^= 1  # segment 0's inputs differ by one bit from what is stored for it
    store(engine, changed, 0, {**alone[0], "text": "must not be used"})
    reused, results = run(engine, rois, [])
    assert reused == 1 and batcher.decoded == [[0, 2]]
    assert [r["text"] for r in results] == [alone[0]["text"], "from the store", alone[2]["text"]]
    assert [r["id"] for r in results] == [0, 1, 2]


def test_inference_waits_for_a_running_early_batch(engine, batcher, rois):
    alone = engine.transcribe(rois=rois, audio=None, segments=SPANS, modality="video", beam_size=2)
    early.record_batch(JOB, {"origin": 50, "next_id": 2, "chunks": 1, "batches": 1}, SPANS[:2])
    finisher = threading.Timer(0.8, lambda: (store(engine, rois, 0, alone[0]), store(engine, rois, 1, alone[1]),
                                             early.set_batch(JOB, 0, early.DONE)))
    finisher.start()
    reused, results = run(engine, rois, [])
    finisher.join()
    assert reused == 2 and batcher.decoded == [[2]]
    assert results == alone


def test_an_early_batch_finishing_between_two_looks_is_not_decoded_again(engine, batcher, rois, monkeypatch):
    """The early batch stores its results and leaves `queued` while inference decodes the segment it lacks:
    inference takes the stored results instead of decoding those segments a second time."""
    alone = engine.transcribe(rois=rois, audio=None, segments=SPANS, modality="video", beam_size=2)
    early.record_batch(JOB, {"origin": 50, "next_id": 2, "chunks": 1, "batches": 1}, SPANS[:2])
    looks = []

    def in_flight(job_id: str) -> set[tuple[int, int]]:
        looks.append(job_id)
        if len(looks) == 2:  # the batch finishes now, as an early task does: results first, then its state
            store(engine, rois, 0, alone[0])
            store(engine, rois, 1, alone[1])
            early.set_batch(JOB, 0, early.DONE)
        return early_in_flight(job_id)

    early_in_flight = early.in_flight
    monkeypatch.setattr(gpu_tasks.early, "in_flight", in_flight)
    reused, results = run(engine, rois, [])
    assert len(looks) == 2 and batcher.decoded == [[2]]
    assert reused == 2 and results == alone


def test_an_early_batch_that_never_finishes_is_decoded_after_the_wait(engine, batcher, rois):
    alone = engine.transcribe(rois=rois, audio=None, segments=SPANS, modality="video", beam_size=2)
    early.record_batch(JOB, {"origin": 50, "next_id": 2, "chunks": 1, "batches": 1}, SPANS[:2])  # stays queued
    started = time.monotonic()
    reused, results = run(engine, rois, [])
    assert reused == 0 and batcher.decoded == [[2], [0, 1]]
    assert time.monotonic() - started >= 1.5  # AVSR_EARLY_WAIT_S without news
    assert results == alone
