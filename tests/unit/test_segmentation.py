"""Long-video building blocks: segment planning, chunks for parallel preprocessing, batches."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from cpu_worker.segmentation import (
    MAX_MODEL_FRAMES,
    Chunk,
    Segment,
    mouth_motion,
    plan_chunks,
    plan_segments,
)

FPS = 25.0


# ---------------------------------------------------------------------------------------------
# Synthetic per-frame signals
# ---------------------------------------------------------------------------------------------


def talk_schedule(seconds: float, seed: int, utt=(4.0, 10.0), pause=(0.5, 1.5)) -> list[tuple[int, int]]:
    """Utterance intervals [start, end) in frames; pauses between them fall at random places."""
    rng = np.random.default_rng(seed)
    n, t, out = int(seconds * FPS), int(0.4 * FPS), []
    while t < n:
        end = min(n, t + int(rng.uniform(*utt) * FPS))
        out.append((t, end))
        t = end + int(rng.uniform(*pause) * FPS)
    return out


def signals(n: int, speech: list[tuple[int, int]], seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(audio energy dB, mouth motion): syllable-modulated speech, noisy near-silent pauses."""
    rng = np.random.default_rng(seed)
    t = np.arange(n) / FPS
    is_speech = np.zeros(n, bool)
    for a, b in speech:
        is_speech[a:b] = True
    energy = np.where(is_speech, -22 + 6 * np.sin(2 * np.pi * 4 * t), -60.0) + rng.normal(0, 2, n)
    motion = np.where(is_speech, 0.6 * np.abs(np.sin(np.pi * 4 * t)), 0.05) + rng.normal(0, 0.03, n)
    return energy.astype(np.float32), np.abs(motion).astype(np.float32)


def pauses_of(speech: list[tuple[int, int]]) -> list[tuple[int, int]]:
    return [(a_end, b_start) for (_, a_end), (b_start, _) in itertools.pairwise(speech)]


def assert_valid(segs: list[Segment], n: int, max_frames: int) -> None:
    assert [s.id for s in segs] == list(range(len(segs)))
    for s in segs:
        assert 0 <= s.start_frame < s.end_frame <= n
        assert s.num_frames <= min(max_frames, MAX_MODEL_FRAMES)
    for a, b in itertools.pairwise(segs):
        assert a.end_frame <= b.start_frame


def inner_cuts(segs: list[Segment]) -> list[int]:
    return [a.end_frame for a, b in itertools.pairwise(segs) if a.end_frame == b.start_frame]


# ---------------------------------------------------------------------------------------------
# mouth_motion
# ---------------------------------------------------------------------------------------------


def mouth_rois(openings: np.ndarray, gains: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """96×96 textured 'faces' with a dark mouth ellipse of the given heights, then gain/offset."""
    rng = np.random.default_rng(3)
    texture = 100 + 20 * rng.random((96, 96))
    yy, xx = np.mgrid[:96, :96]
    frames = []
    for h, g, o in zip(openings, gains, offsets, strict=True):
        img = texture.copy()
        img[((xx - 48) / 22) ** 2 + ((yy - 52) / max(h, 0.5)) ** 2 <= 1] = 40
        frames.append(np.clip(img * g + o, 0, 255))
    return np.stack(frames).astype(np.uint8)


def test_mouth_motion_ignores_brightness_but_sees_the_mouth() -> None:
    t = 50
    ramp_g, ramp_o = np.linspace(0.7, 1.3, t), np.linspace(-20, 40, t)
    still = mouth_motion(mouth_rois(np.full(t, 3.0), ramp_g, ramp_o))
    talking = mouth_motion(mouth_rois(3 + 9 * np.abs(np.sin(np.arange(t) / 2)), np.ones(t), np.zeros(t)))
    assert still.shape == talking.shape == (t,) and still.dtype == np.float32
    assert still[0] == still[1] and talking[0] == talking[1]
    assert still.max() < 0.1 * np.median(talking)


def test_mouth_motion_blocks_match_one_piece() -> None:
    rois = np.random.default_rng(0).integers(0, 256, (2100, 96, 96), dtype=np.uint8)
    m = mouth_motion(rois)
    assert m.shape == (2100,) and np.all(m > 0)
    np.testing.assert_allclose(m[1020:1030], mouth_motion(rois[1019:1030])[1:], rtol=1e-5)
    assert mouth_motion(rois[:1]).tolist() == [0.0]


# ---------------------------------------------------------------------------------------------
# plan_segments
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cues", ["audio", "mouth", "both"])
def test_ten_minute_talk_is_cut_in_every_pause_and_only_there(cues: str) -> None:
    n = int(600 * FPS)
    speech = talk_schedule(600, seed=7)
    energy, motion = signals(n, speech)
    segs = plan_segments(
        n,
        FPS,
        audio_energy_db=energy if cues != "mouth" else None,
        mouth_motion=motion if cues != "audio" else None,
    )
    assert_valid(segs, n, 375)
    assert segs[0].start_frame == 0 and segs[-1].end_frame == n  # the face is always there: tiling
    cuts = inner_cuts(segs)
    assert len(cuts) == len(segs) - 1
    pauses = pauses_of(speech)
    assert len(cuts) == len(pauses)  # every pause (≥ 0.5 s) cut once, nothing else
    for cut, (a, b) in zip(cuts, pauses, strict=True):
        assert a <= cut <= b
        assert abs(cut - (a + b) / 2) <= 2  # the middle of the pause


def test_long_utterances_get_forced_cuts_in_short_gaps() -> None:
    # 60 s of speech with 0.2 s inter-word gaps every ~2.5 s: no natural pause, so every
    # cut is forced, and each must land in a gap, never mid-word.
    n = int(60 * FPS)
    rng = np.random.default_rng(5)
    gaps, t = [], 40
    while t < n - 40:
        gaps.append((t, t + 5))
        t += int(rng.uniform(2.0, 3.0) * FPS)
    speech = [(b, a) for (_, b), (a, _) in zip([(0, 0), *gaps], [*gaps, (n, n)], strict=True)]
    energy, motion = signals(n, speech)
    segs = plan_segments(n, FPS, audio_energy_db=energy, mouth_motion=motion, max_segment_s=10.0)
    assert_valid(segs, n, 250)
    assert len(segs) >= 6
    for cut in inner_cuts(segs):
        assert any(a <= cut <= b for a, b in gaps), cut


def test_pause_free_run_gets_balanced_hard_cuts() -> None:
    n = int(40 * FPS)
    rng = np.random.default_rng(2)
    energy = (-20 + rng.normal(0, 1, n)).astype(np.float32)  # no contrast: no silence anywhere
    for kwargs in ({}, {"audio_energy_db": energy}):
        segs = plan_segments(n, FPS, **kwargs)
        assert_valid(segs, n, 375)
        assert len(segs) == 3 and inner_cuts(segs) == [s.start_frame for s in segs[1:]]
        assert max(s.num_frames for s in segs) - min(s.num_frames for s in segs) <= 2 * 13


def test_never_more_than_500_frames_and_max_respected() -> None:
    n = 5000
    segs = plan_segments(n, FPS, max_segment_s=60.0)
    assert_valid(segs, n, 500)
    assert max(s.num_frames for s in segs) == 500
    segs = plan_segments(n, 30.0, max_segment_s=7.3)
    assert max(s.num_frames for s in segs) <= 219


def test_face_gaps_split_short_gaps_bridged_flicker_dropped() -> None:
    n = 1000
    face = np.ones(n, bool)
    face[300:400] = False  # real gap: excluded, splits
    face[600:605] = False  # 0.2 s dropout: bridged
    face[800:1000] = False
    face[900:903] = True  # 3-frame false detection: dropped
    segs = plan_segments(n, FPS, face_present=face, max_segment_s=20.0)
    assert [(s.start_frame, s.end_frame) for s in segs] == [(0, 300), (400, 800)]
    segs = plan_segments(n, FPS, face_present=face)  # 400 frames > 15 s: balanced hard cut
    assert [(s.start_frame, s.end_frame) for s in segs] == [(0, 300), (400, 600), (600, 800)]


def test_tiny_pieces_are_merged() -> None:
    # speech 0–8 s, a 0.2 s word between two 0.5 s pauses, speech again: the piece around the
    # word (< 1 s) must not become its own segment.
    n = int(20 * FPS)
    speech = [(0, 200), (212, 217), (229, n)]
    energy, motion = signals(n, speech)
    segs = plan_segments(n, FPS, audio_energy_db=energy, mouth_motion=motion)
    assert_valid(segs, n, 375)
    assert min(s.num_frames for s in segs) >= 25
    assert len(segs) == 2
    assert 200 <= segs[0].end_frame <= 229


def test_timing_conversion_exact_and_to_dict() -> None:
    seg = Segment(3, 93093, 93118, 25.0)
    assert seg.start_s == 3723.72 and seg.end_s == 3724.72 and seg.num_frames == 25
    want = {"id": 3, "start_frame": 93093, "end_frame": 93118, "start": 3723.72, "end": 3724.72}
    assert seg.to_dict() == want
    assert seg.to_dict(fps=50.0)["end"] == 93118 / 50
    segs = plan_segments(100, 29.97)
    assert segs[0].end_s == 100 / 29.97


def test_deterministic_and_validated() -> None:
    n = 3000
    energy, motion = signals(n, talk_schedule(120, seed=1))
    a = plan_segments(n, FPS, audio_energy_db=energy, mouth_motion=motion)
    b = plan_segments(n, FPS, audio_energy_db=energy.copy(), mouth_motion=motion.copy())
    assert a == b
    assert plan_segments(0, FPS) == []
    with pytest.raises(ValueError):
        plan_segments(n, FPS, mouth_motion=motion[:-1])
    with pytest.raises(ValueError):
        plan_segments(n, FPS, face_present=np.ones(n + 1, bool))
    # audio a few frames short or long of the video is cut / extended
    assert plan_segments(n, FPS, audio_energy_db=energy[:-3]) == plan_segments(n, FPS, audio_energy_db=energy)
    longer = np.concatenate([energy, np.zeros(5, np.float32)])
    assert plan_segments(n, FPS, audio_energy_db=longer) == plan_segments(n, FPS, audio_energy_db=energy)
    with pytest.raises(ValueError):
        plan_segments(n, FPS, max_segment_s=1.5, min_segment_s=1.0)


# ---------------------------------------------------------------------------------------------
# plan_chunks
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 100, 749, 750, 751, 1500, 15000, 15001])
def test_chunk_cores_tile(n: int) -> None:
    chunks = plan_chunks(n, 750, 25)
    assert chunks[0].core_start == 0 and chunks[-1].core_end == n
    for a, b in itertools.pairwise(chunks):
        assert a.core_end == b.core_start
    for c in chunks:
        assert 0 <= c.start <= c.core_start < c.core_end <= c.end <= n
        assert c.core_end - c.core_start <= 750
        assert c.core_start - c.start == min(25, c.core_start)
        assert c.end - c.core_end == min(25, n - c.core_end)
    assert len(chunks) == -(-n // 750)
    cores = np.concatenate([np.arange(c.core_start, c.core_end) for c in chunks])
    np.testing.assert_array_equal(cores, np.arange(n))


@pytest.mark.parametrize(
    ("n", "chunk", "align"), [(15000, 750, 24), (1000, 100, 24), (50, 750, 24), (7, 5, 2)]
)
def test_chunk_cores_aligned(n: int, chunk: int, align: int) -> None:
    chunks = plan_chunks(n, chunk, 25 if chunk > 25 else 1, align=align)
    assert chunks[0].core_start == 0 and chunks[-1].core_end == n
    for a, b in itertools.pairwise(chunks):
        assert a.core_end == b.core_start and a.core_end % align == 0
    assert all(c.core_end - c.core_start <= chunk for c in chunks)
    assert len(chunks) == -(-n // (chunk // align * align))
    cores = np.concatenate([np.arange(c.core_start, c.core_end) for c in chunks])
    np.testing.assert_array_equal(cores, np.arange(n))


def test_chunk_edge_cases() -> None:
    assert plan_chunks(0) == []
    assert plan_chunks(100) == [Chunk(0, 0, 100, 0, 100)]
    want = {"index": 0, "start": 0, "end": 100, "core_start": 0, "core_end": 100}
    assert plan_chunks(100)[0].to_dict() == want
    assert [(c.core_start, c.core_end) for c in plan_chunks(1500)] == [(0, 750), (750, 1500)]
    assert [(c.start, c.end) for c in plan_chunks(1500)] == [(0, 775), (725, 1500)]
    for bad in ((100, 10, 10), (100, 10, 11), (100, 0, 0), (100, 10, -1), (100, 10, 2, 11), (100, 10, 2, 0)):
        with pytest.raises(ValueError):
            plan_chunks(*bad)


# ---------------------------------------------------------------------------------------------
# Settled segments: the plan's first segments, decided from a prefix of the clip
# ---------------------------------------------------------------------------------------------


def _long_clip(seconds: float, seed: int) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
    """(frames, face, energy, motion) of a long talk with face gaps (flicker, short and long)."""
    n = int(seconds * FPS)
    short = seed % 2  # odd seeds: utterances under a second among longer ones, many merges
    energy, motion = signals(n, talk_schedule(seconds, seed, utt=(0.3, 4.0) if short else (2.0, 25.0),
                                              pause=(0.2, 1.5)), seed)
    rng = np.random.default_rng(seed)
    face = np.ones(n, bool)
    for _ in range(int(seconds / 10)):  # face gaps, many of them near where the known prefix ends
        a = int(rng.integers(0, n)) if rng.random() < 0.5 else int(rng.integers(1, n // 750 + 1)) * 750 - 30
        face[max(0, a):a + int(rng.choice([2, 8, 12, 14, 30, 60, 400]))] = False
    return n, face, energy, motion


def _streamed(n: int, face: np.ndarray, energy: np.ndarray | None, motion: np.ndarray | None, step: int,
              seed: int) -> tuple[list[Segment], list[int]]:
    """`settled_segments` called as chunks arrive, each time on a window of what is known (from a chunk
    start before the origin's calibration window); the view's first frames are perturbed as a partial
    stitch's are. Returns every segment and the count settled before the whole clip was known."""
    from cpu_worker.segmentation import calibration_windows, settled_segments

    rng = np.random.default_rng(seed)
    out: list[Segment] = []
    early: list[int] = []
    origin = 0
    windows = calibration_windows(n, FPS)
    for known in [*range(step, n, step), n]:
        start = next(a for a, b in windows if origin < b or b == n)
        offset = max(0, start - int(rng.integers(50, 400)))
        sl = slice(offset, known)
        view_motion = None if motion is None else motion[sl].copy()
        view_face = face[sl].copy()
        # a partial view's first and last frames may differ from the whole clip's
        ends = [slice(0, 5)] if offset else []
        ends += [slice(-5, None)] if known < n else []
        for end in ends:
            if view_motion is not None:
                view_motion[end] = rng.uniform(0, 1, 5)
            view_face[end] = rng.integers(0, 2, 5).astype(bool)
        got, origin = settled_segments(n, FPS, offset=offset, origin=origin, first_id=len(out),
                                       face_present=view_face, mouth_motion=view_motion,
                                       audio_energy_db=None if energy is None else energy[sl])
        out += got
        if known < n:
            early.append(len(got))
    return out, early


@pytest.mark.parametrize("seed", range(6))
def test_settled_segments_are_the_whole_clip_plan(seed: int) -> None:
    n, face, energy, motion = _long_clip(300.0 + 40 * seed, seed)
    whole = plan_segments(n, FPS, face_present=face, mouth_motion=motion, audio_energy_db=energy)
    streamed, early = _streamed(n, face, energy, motion, step=750, seed=seed)
    assert streamed == whole
    assert sum(early) >= len(whole) // 2  # most segments are known before the end


def test_settled_segments_without_cues_or_audio() -> None:
    n, face, energy, motion = _long_clip(200.0, 7)
    for e, m in ((None, motion), (None, None), (energy, None)):
        whole = plan_segments(n, FPS, face_present=face, mouth_motion=m, audio_energy_db=e)
        streamed, _ = _streamed(n, face, e, m, step=600, seed=3)
        assert streamed == whole


def test_calibration_windows_leave_short_clips_as_one() -> None:
    from cpu_worker.segmentation import calibration_windows

    assert calibration_windows(1400, FPS) == [(0, 1400)]
    assert calibration_windows(1401, FPS) == [(0, 700), (700, 1401)]
    assert calibration_windows(0, FPS) == [(0, 0)]
    windows = calibration_windows(15_000, FPS)
    assert len(windows) == 11 and windows[-1][1] == 15_000 and all(1363 <= b - a <= 1364 for a, b in windows)


def test_two_default_chunks_settle_the_first_calibration_window_of_most_clips() -> None:
    """The first early batch is published after two chunks of the default size for almost every
    length, three for the rest (clips whose balanced chunks are much shorter than 750 frames, mostly
    1.5-7 min): what those chunks stitch reaches past the first window by the settle margin. (With
    60-s windows, 9 % of lengths got there after two chunks.)"""
    from cpu_worker.mouth_roi import stitch_boundary
    from cpu_worker.segmentation import calibration_windows, settle_margin
    from cpu_worker.stages import CHUNK_OVERLAP
    from tasks.settings import Settings

    chunk_frames, margin = Settings().chunk_frames, settle_margin(FPS)

    def chunks_to_settle(n: int) -> int:
        chunks = plan_chunks(n, chunk_frames, CHUNK_OVERLAP)
        settled = calibration_windows(n, FPS)[0][1] + margin
        return next(k for k in range(1, len(chunks) + 1)
                    if k == len(chunks) or stitch_boundary(chunks[k].start) >= settled)

    needed = [chunks_to_settle(n) for n in range(1401, 100_001, 11)]  # 56 s to 66 min
    assert max(needed) == 3
    assert needed.count(2) >= 0.95 * len(needed)
    assert chunks_to_settle(15_000) == 2  # a 10-minute talk
