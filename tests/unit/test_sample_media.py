"""The synthetic talking-face video generator used by the long-video benchmark and tests."""

from __future__ import annotations

import itertools
from pathlib import Path

import av
import numpy as np
import pytest

from deploy.local.sample_media import (
    SAMPLE_RATE,
    FaceRenderer,
    Schedule,
    make_face_frames,
    write_face_video,
)


def decode(path: Path) -> tuple[list[np.ndarray], np.ndarray, dict]:
    with av.open(str(path)) as c:
        v, a = c.streams.video[0], c.streams.audio[0]
        info = {
            "fps": v.average_rate,
            "size": (v.codec_context.width, v.codec_context.height),
            "audio_rate": a.rate,
            "audio_channels": a.codec_context.channels,
            "audio_s": float(a.duration * a.time_base) if a.duration else None,
        }
        frames = [f.to_ndarray(format="bgr24") for f in c.decode(video=0)]
    with av.open(str(path)) as c:
        audio = np.concatenate([f.to_ndarray().reshape(-1) for f in c.decode(audio=0)])
    return frames, audio, info


@pytest.mark.parametrize("suffix", [".mp4", ".mkv"])
def test_three_second_clip_decodes_with_frames_fps_size_and_audio(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"talk{suffix}"
    utterances = write_face_video(path, 3.0, fps=25, size=(320, 240), seed=1)
    frames, audio, info = decode(path)
    assert len(frames) == 75 and frames[0].shape == (240, 320, 3)
    assert info["fps"] == 25 and info["size"] == (320, 240)
    assert info["audio_rate"] == SAMPLE_RATE and info["audio_channels"] == 1
    # AAC adds encoder priming/padding (< 2 frames of 1024 samples); PCM is exact.
    assert abs(audio.size - 3 * SAMPLE_RATE) <= (2048 if suffix == ".mp4" else 0)
    if info["audio_s"] is not None:
        assert abs(info["audio_s"] - 3.0) < 0.1
    assert utterances and all(0 <= a < b <= 3.0 for a, b in utterances)
    # The rendered frames are the iterator's frames (up to lossy coding).
    expected = list(make_face_frames(75, size=(320, 240), seed=1))
    assert np.abs(frames[40].astype(int) - expected[40]).mean() < 6


def test_audio_is_loud_in_utterances_and_near_silent_in_pauses(tmp_path: Path) -> None:
    path = tmp_path / "talk.mkv"
    utterances = write_face_video(path, 12.0, size=(160, 120), seed=3)
    _, audio, _ = decode(path)
    x = audio.astype(np.float64) / 32768

    def level_db(a: float, b: float) -> float:
        seg = x[int(a * SAMPLE_RATE) : int(b * SAMPLE_RATE)]
        return 10 * np.log10(np.mean(seg**2) + 1e-12)

    starts = [a for a, _ in utterances]
    ends = [b for _, b in utterances]
    pauses = list(zip(ends[:-1], starts[1:], strict=True))
    assert len(pauses) >= 1
    for a, b in utterances:
        assert level_db(a + 0.1, b - 0.1) > -30
    for a, b in pauses:
        assert 0.5 <= b - a <= 1.5
        assert level_db(a + 0.05, b - 0.05) < -50


def test_mouth_moves_only_in_utterances() -> None:
    schedule = Schedule.random(20.0, seed=2)
    r = FaceRenderer(schedule, size=(640, 480), fps=25.0, seed=2)
    openings = np.array([r.opening(i) for i in range(500)])
    t = np.arange(500) / 25.0
    inside = np.zeros(500, bool)
    for a, b in schedule.intervals():
        assert 2.0 <= b - a <= 8.0 or b == 20.0
        inside |= (t >= a) & (t < b)
    assert np.all(openings[~inside] == 0) and openings[inside].max() > 0.9
    # opening the mouth changes the mouth and chin of the face, and nothing above the mouth
    diff = np.abs(r._talking_face(0.0).astype(int) - r._talking_face(openings.max()).astype(int))
    assert diff[130:180, 80:150].mean() > 10 and diff[:125].max() == 0


def test_make_face_frames_deterministic() -> None:
    a = list(make_face_frames(3, size=(320, 240), seed=5))
    b = list(make_face_frames(3, size=(320, 240), seed=5))
    assert all(x.dtype == np.uint8 and x.shape == (240, 320, 3) for x in a)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def test_segmentation_cuts_a_synthetic_talk_in_its_pauses(tmp_path: Path) -> None:
    from cpu_worker.audio import frame_energy_db
    from cpu_worker.segmentation import plan_segments

    path = tmp_path / "talk.mkv"
    utterances = write_face_video(path, 40.0, size=(160, 120), seed=4)
    frames, audio, _ = decode(path)
    segs = plan_segments(len(frames), 25.0, audio_energy_db=frame_energy_db(audio, SAMPLE_RATE))
    pauses = [(a[1], b[0]) for a, b in itertools.pairwise(utterances)]
    cuts = [s.end_s for s in segs[:-1]]
    assert len(cuts) == len(pauses) >= 4
    assert all(a <= c <= b for c, (a, b) in zip(cuts, pauses, strict=True))
