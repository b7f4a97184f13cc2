"""Streaming gap filling (official interpolation for short gaps, breaks for long ones)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cpu_worker.align import interpolate_landmarks
from cpu_worker.mouth_roi import _GapFiller

ROOT = Path(__file__).resolve().parents[2]


def _run(detected: list[bool], max_gap: int, max_lead: int = 1000,
         max_lead_bytes: int | None = None) -> tuple[_GapFiller, dict[int, np.ndarray]]:
    rng = np.random.default_rng(0)
    filler = _GapFiller(max_gap, max_lead, max_lead_bytes)
    out: dict[int, np.ndarray] = {}
    gray = np.zeros((2, 2), np.uint8)
    for i, d in enumerate(detected):
        lm = rng.integers(0, 500, (68, 2)).astype(np.int32) if d else None
        for j, _, filled in filler.push(i, gray, lm):
            assert j not in out
            out[j] = filled
    for j, _, filled in filler.flush(len(detected)):
        out[j] = filled
    return filler, out


def test_short_gaps_match_official_interpolation() -> None:
    det = [False, True, True, False, False, True, False, True, True, False, False]
    filler, out = _run(det, max_gap=25)
    assert sorted(out) == list(range(len(det)))
    rng = np.random.default_rng(0)
    raw = np.zeros((len(det), 68, 2))
    for i, d in enumerate(det):
        if d:
            raw[i] = rng.integers(0, 500, (68, 2))
    expected = interpolate_landmarks(raw, np.array(det))
    np.testing.assert_allclose(np.stack([out[i] for i in range(len(det))]), expected)
    assert filler.breaks == [] and filler.interpolated == det.count(False)


def test_long_gap_is_a_break_and_holds_the_last_face() -> None:
    det = [True] * 3 + [False] * 8 + [True] * 2
    filler, out = _run(det, max_gap=5)
    assert filler.breaks == [(3, 11)]
    for j in range(3, 11):
        np.testing.assert_array_equal(out[j], out[2])  # held, frames were not buffered for the whole gap
    assert filler.held == 8
    assert not filler.pending


def test_long_leading_and_trailing_gaps() -> None:
    det = [False] * 7 + [True] + [False] * 6
    filler, out = _run(det, max_gap=5)
    assert filler.breaks == [(0, 7), (8, 14)]
    np.testing.assert_array_equal(out[0], out[7])
    np.testing.assert_array_equal(out[13], out[7])


def test_overlong_leading_gap_drops_oldest_frames() -> None:
    det = [False] * 12 + [True]
    filler, out = _run(det, max_gap=5, max_lead=10)
    assert filler.dropped_lead == 2
    assert np.isnan(out[0]).all() and np.isnan(out[1]).all()
    np.testing.assert_array_equal(out[2], out[12])


def test_leading_gap_keeps_at_most_its_byte_budget() -> None:
    """The 2x2 frames of `_run` are 4 bytes: a budget of 7 frames' bytes keeps 7 of 12 (their count cap is 10)."""
    det = [False] * 12 + [True] + [False] * 3
    filler, out = _run(det, max_gap=5, max_lead=10, max_lead_bytes=7 * 4)
    assert filler.dropped_lead == 5 and filler.pending_bytes == 0
    assert all(np.isnan(out[j]).all() for j in range(5))
    for j in range(5, 12):
        np.testing.assert_array_equal(out[j], out[12])
    assert filler.breaks == [(0, 12)]
