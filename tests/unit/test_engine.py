"""The GPU worker's engine: segments batched by length give what each gives alone; a batch that
runs out of GPU memory is decoded in halves.

Batched and single decoding differ only by float32 summation order (identical in float64); with
random weights a beam can sit on a near-tie that such noise flips, so the tests compare like
with like (these segments and beams are not on a tie)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gpu_worker.engine import Engine
from tests.conftest import REFERENCE


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(REFERENCE / "checkpoints" / "finetune_s2s.pt", device="cpu", max_batch_frames=10_000)


@pytest.fixture(scope="module")
def clip() -> tuple[np.ndarray, np.ndarray]:
    from cpu_worker.audio import audio_features

    raw = np.load(REFERENCE / "inputs" / "raw_inputs.npz")
    rois = np.concatenate([raw["rand75__video_uint8"], raw["face50__video_uint8"]])
    wave = np.concatenate([raw["rand75__wav_int16"], raw["face50__wav_int16"]])
    return rois, audio_features(wave, 16000)[: len(rois)]


SEGMENTS = [{"id": 0, "start_frame": 0, "end_frame": 75}, {"id": 1, "start_frame": 75, "end_frame": 125},
            {"id": 2, "start_frame": 80, "end_frame": 110}]


@pytest.mark.parametrize("modality", ["video", "audio", "audiovisual"])
def test_batched_segments_equal_one_at_a_time(engine, clip, modality, single_torch_thread):
    rois, audio = clip
    batched = engine.transcribe(rois=rois, audio=audio, segments=SEGMENTS, modality=modality, beam_size=3)
    alone = [engine.transcribe(rois=rois, audio=audio, segments=[s], modality=modality, beam_size=3)[0]
             for s in SEGMENTS]
    assert [b["id"] for b in batched] == [0, 1, 2]
    assert [b["text"] for b in batched] == [a["text"] for a in alone]
    assert [b["score"] for b in batched] == pytest.approx([a["score"] for a in alone], abs=1e-4)


def test_out_of_memory_splits_the_batch(engine, clip, monkeypatch, single_torch_thread):
    rois, _ = clip
    # after the split every segment is decoded alone
    expected = [engine.transcribe(rois=rois, audio=None, segments=[s], modality="video", beam_size=2)[0]
                for s in SEGMENTS]
    generate, sizes = engine.model.generate, []

    def small_gpu(**kwargs):
        sizes.append(kwargs["video"].shape[0])
        if sizes[-1] > 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return generate(**kwargs)

    monkeypatch.setattr(engine.model, "generate", small_gpu)
    progress = []
    got = engine.transcribe(rois=rois, audio=None, segments=SEGMENTS, modality="video", beam_size=2,
                            on_progress=progress.append)
    assert [(g["id"], g["text"], g["num_tokens"]) for g in got] == \
        [(e["id"], e["text"], e["num_tokens"]) for e in expected]
    assert [g["score"] for g in got] == pytest.approx([e["score"] for e in expected], abs=1e-4)
    assert sizes == [3, 1, 2, 1, 1]  # 3 fails → [a] + [b, c]; [b, c] fails → [b] + [c]
    assert progress == [3]


def test_modality_needs_its_input(engine, clip):
    rois, _ = clip
    with pytest.raises(ValueError, match="needs audio"):
        engine.transcribe(rois=rois, audio=None, segments=SEGMENTS, modality="audio")
    with pytest.raises(ValueError, match="modality"):
        engine.transcribe(rois=rois, audio=None, segments=SEGMENTS, modality="lips")


def test_words_spell_the_text_and_recombine_into_the_segment_confidence(engine, clip, single_torch_thread):
    rois, audio = clip
    decoded = engine.transcribe(rois=rois, audio=audio, segments=SEGMENTS, modality="audiovisual", beam_size=3)
    assert any(len(d["words"]) > 1 for d in decoded)
    for d in decoded:
        assert " ".join(w["word"] for w in d["words"]) == d["text"]
        assert all(0.0 <= w["confidence"] <= 1.0 and w["tokens"] >= 1 for w in d["words"])
        assert sum(w["tokens"] for w in d["words"]) + 1 == d["num_tokens"]  # + </s>
        log_conf = (sum(w["tokens"] * np.log(w["confidence"]) for w in d["words"]) + d["end_logprob"]) / d["num_tokens"]
        assert np.exp(log_conf) == pytest.approx(d["confidence"], rel=1e-9)
