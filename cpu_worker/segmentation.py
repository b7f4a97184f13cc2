"""Long videos (issue #5): segment planning, parallel-preprocessing chunks and inference batches.

AV-HuBERT was trained on sentence-length clips (at most 500 frames), so a long clip is cut into
segments that are decoded one by one and stitched back with times.

Segmentation algorithm (`plan_segments`), all in frames of the source clip, deterministic:

1. Face runs. ``face_present`` gaps of at most ``min_gap_s`` between face frames are bridged and
   face runs shorter than that are dropped as detector flicker. Frames without a face are never
   inside a segment; every face run is segmented on its own.
2. Pause cues. Each given cue gets an adaptive threshold from its own percentiles over the
   face frames of each calibration window (`calibration_windows`: the clip in balanced windows of
   at most 56 s, so one window for a clip up to 56 s; lo = 2nd, hi = 95th percentile): audio
   is *silent* below ``lo + 0.35 (hi - lo)`` dB, with lo raised to at least ``hi - 50 dB``
   (ignored when ``hi - lo < 10 dB``: no contrast, e.g. all speech or all silence); the mouth is
   *still* below ``lo + 0.3 (hi - lo)`` of its 5-frame moving average (ignored when
   ``hi - lo < 0.3 hi``). The pause level of a frame is the fraction of the informative cues that
   are quiet (0, ½ or 1). Pauses shorter than ~2 % of the window's face frames in total do not
   pull the 2nd percentile down and are not found.
3. Natural cuts. Inside a face run, the middle of every pause where *all* informative cues are
   quiet for at least ``min_pause_s`` (not touching the run's ends) is a cut.
4. Merge. Pieces shorter than ``min_segment_s`` are merged, shortest first, into their shorter
   neighbour in the same face run (a face run shorter than that stays one short segment).
5. Forced cuts. A piece longer than the limit (``max_segment_s``, never more than 500 frames)
   is cut recursively at the best pause (any cue quiet, ≥ 3 frames; score = sum of pause
   levels, ties to the piece's middle) whose middle, clipped to the window that keeps both
   sides ≥ ``min_segment_s``, is the cut. Only when the window holds no pause is the cut hard:
   at ``L / ceil(L / limit)`` (balanced), moved within ±0.5 s to the least active frame.

Every step is local: a cut's neighbourhood, a window's percentiles. So the first segments of the plan
are decided before the whole clip is known (`settled_segments`), and inference can start on them while
the rest is still being preprocessed.

`plan_chunks` splits a clip into overlapping chunks for parallel preprocessing (joined again by
`cpu_worker.mouth_roi.stitch_results`).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from tasks.records import FPS

MAX_MODEL_FRAMES = 500  # longest clip AV-HuBERT was trained on; the official loader drops longer ones

_AUDIO_REL_THRESHOLD = 0.35
_AUDIO_MIN_CONTRAST_DB = 10.0
_AUDIO_MAX_RANGE_DB = 50.0  # noise floor taken >= speech level - 50 dB (digital silence is not the floor)
_AUDIO_FLOOR_DB = -120.0
_LO_PERCENTILE, _HI_PERCENTILE = 2.0, 95.0
_MOUTH_REL_THRESHOLD = 0.3
_MOUTH_MIN_CONTRAST = 0.3  # (hi - lo) / hi
_MOUTH_SMOOTH_FRAMES = 5
_FORCED_PAUSE_MIN_FRAMES = 3
_HARD_CUT_SEARCH_S = 0.5
_MOTION_BLOCK = 1024  # frames per block in mouth_motion (bounds float memory)
# Pause thresholds are percentiles per window of at most this long. Under a minute so that two default
# chunks (750 frames each) settle the first window: it must end `settle_margin` (43 frames) before the
# second chunk's stitch boundary (frame 1488), so the first text is published after two chunks, not three
# (for 98 % of clip lengths; where the balanced chunks are much shorter than 750 frames, after three).
CALIBRATION_S = 56.0


@dataclass(frozen=True)
class Segment:
    """Frames ``[start_frame, end_frame)`` of the source clip, decoded as one utterance."""

    id: int
    start_frame: int
    end_frame: int
    fps: float = FPS

    @property
    def num_frames(self) -> int:
        return self.end_frame - self.start_frame

    @property
    def start_s(self) -> float:
        return self.start_frame / self.fps

    @property
    def end_s(self) -> float:
        return self.end_frame / self.fps

    def to_dict(self, fps: float | None = None) -> dict:
        """JSON-ready ``{id, start_frame, end_frame, start, end}`` (seconds at ``fps``, default own)."""
        fps = self.fps if fps is None else fps
        return {
            "id": self.id,
            "start_frame": self.start_frame,
            "end_frame": self.end_frame,
            "start": self.start_frame / fps,
            "end": self.end_frame / fps,
        }


@dataclass(frozen=True)
class Chunk:
    """A worker processes frames ``[start, end)`` and owns the results for ``[core_start, core_end)``."""

    index: int
    start: int
    end: int
    core_start: int
    core_end: int

    def to_dict(self) -> dict:
        """JSON-ready ``{index, start, end, core_start, core_end}``."""
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------
# Per-frame signals
# ---------------------------------------------------------------------------------------------


def mouth_motion(rois: np.ndarray) -> np.ndarray:
    """Per-frame mouth activity of mouth ROIs uint8 [T,H,W] (e.g. 96×96) → float32 [T].

    Mean absolute difference to the previous frame over rows ¼–⅞ and columns ⅙–⅚ of the ROI
    (the official ROI is centred on the mouth: lips and jaw, little nose), 2×2-pooled, each
    frame's region first normalised to zero mean and unit contrast, so global brightness and
    contrast changes do not count as motion. Frame 0 gets frame 1's value.
    """
    rois = np.asarray(rois)
    if rois.ndim != 3:
        raise ValueError(f"rois must be [T,H,W], got {rois.shape}")
    t, h, w = rois.shape
    if t < 2:
        return np.zeros(t, np.float32)
    region = rois[:, h // 4 : h - h // 8, w // 6 : w - w // 6]
    out = np.empty(t, np.float32)
    prev = None
    for start in range(0, t, _MOTION_BLOCK):
        z = _normalised(region[start : start + _MOTION_BLOCK])
        offset = start + 1 if prev is None else start  # frame index of the first difference
        if prev is not None:
            z = np.concatenate([prev, z])
        diffs = np.abs(np.diff(z, axis=0)).mean(axis=(1, 2))
        out[offset : offset + len(diffs)] = diffs
        prev = z[-1:]
    out[0] = out[1]
    return out


def _normalised(block: np.ndarray) -> np.ndarray:
    """2×2-average-pooled frames, each scaled to zero mean and unit std (+ a small floor)."""
    n, h, w = block.shape
    x = block[:, : h // 2 * 2, : w // 2 * 2].astype(np.float32)
    x = x.reshape(n, h // 2, 2, w // 2, 2).mean(axis=(2, 4))
    mean = x.mean(axis=(1, 2), keepdims=True)
    std = x.std(axis=(1, 2), keepdims=True)
    return (x - mean) / (std + 2.0)


# ---------------------------------------------------------------------------------------------
# Segment planning
# ---------------------------------------------------------------------------------------------


def plan_segments(
    num_frames: int,
    fps: float = FPS,
    *,
    face_present: np.ndarray | None = None,
    mouth_motion: np.ndarray | None = None,
    audio_energy_db: np.ndarray | None = None,
    max_segment_s: float = 15.0,
    min_segment_s: float = 1.0,
    min_gap_s: float = 0.5,
    min_pause_s: float = 0.3,
) -> list[Segment]:
    """Cut a clip of ``num_frames`` frames into segments to decode (algorithm: module docstring).

    ``face_present`` and ``mouth_motion`` have ``num_frames`` entries. ``audio_energy_db`` is the
    level per video frame (e.g. ``cpu_worker.audio.frame_energy_db``); audio a little shorter
    or longer than the video is fine: it is cut, or extended with its last value. Segments are
    in time order, ids 0..n-1, never overlap, never contain face-less frames and are at most
    ``min(max_segment_s·fps, 500)`` frames long.
    """
    if num_frames < 0 or fps <= 0:
        raise ValueError("num_frames must be >= 0 and fps > 0")
    max_frames = min(math.floor(max_segment_s * fps + 1e-9), MAX_MODEL_FRAMES)
    min_frames = max(1, round(min_segment_s * fps))
    if max_frames < 2 * min_frames:
        raise ValueError(f"max segment ({max_frames} frames) must be >= 2 x min segment ({min_frames})")
    face = _face_mask(num_frames, face_present, max(0, round(min_gap_s * fps)))
    pause, activity = _pause_levels(num_frames, face, mouth_motion, audio_energy_db,
                                    calibration_windows(num_frames, fps))
    planner = _Planner(pause, activity, min_frames, max_frames, max(1, round(min_pause_s * fps)), fps)
    spans = [span for run in _runs(face) for span in planner.plan_run(*run)]
    return [Segment(i, s, e, float(fps)) for i, (s, e) in enumerate(spans)]


def calibration_windows(num_frames: int, fps: float = FPS) -> list[tuple[int, int]]:
    """The clip's calibration windows ``[a, b)``: balanced, at most `CALIBRATION_S` long, covering it."""
    size = max(1, math.floor(CALIBRATION_S * fps))
    n = max(1, math.ceil(num_frames / size))
    return [(i * num_frames // n, (i + 1) * num_frames // n) for i in range(n)]


def settled_segments(
    total_frames: int,
    fps: float = FPS,
    *,
    offset: int,
    origin: int,
    first_id: int,
    face_present: np.ndarray,
    mouth_motion: np.ndarray | None = None,
    audio_energy_db: np.ndarray | None = None,
    max_segment_s: float = 15.0,
    min_segment_s: float = 1.0,
    min_gap_s: float = 0.5,
    min_pause_s: float = 0.3,
) -> tuple[list[Segment], int]:
    """The segments from frame ``origin`` on that `plan_segments` of the whole clip (``total_frames``)
    will have, as far as frames ``[offset, offset + len(face_present))`` already decide them.

    The signals cover those frames only (their first and last few frames may still change: a margin
    of `_edge` frames is not trusted). ``origin`` is 0 or the origin a previous call returned (no
    segment crosses it); ``first_id`` the id of the first segment from it. Returns the settled
    segments and the next origin. A face run that continues past what is known is settled up to its
    last *firewall* cut: a natural cut whose pieces on both sides are at least ``min_segment_s`` long,
    which no merge can cross, so that everything before it is planned as in the whole clip.
    """
    n = len(face_present)
    known_end = offset + n
    if not 0 <= offset <= origin <= known_end <= total_frames:
        raise ValueError("need 0 <= offset <= origin <= offset + len(face_present) <= total_frames")
    max_frames = min(math.floor(max_segment_s * fps + 1e-9), MAX_MODEL_FRAMES)
    min_frames = max(1, round(min_segment_s * fps))
    gap = max(0, round(min_gap_s * fps))
    edge = _edge(gap)
    windows = calibration_windows(total_frames, fps)
    first = next(i for i, (_, b) in enumerate(windows) if origin < b or b == total_frames)
    if offset > 0 and windows[first][0] - offset < edge:
        return [], origin  # the window around origin is not wholly known: nothing is decided
    if known_end == total_frames:
        settled_end = total_frames
    else:
        ends = [b for _, b in windows[first:] if b <= known_end - edge]
        if not ends:
            return [], origin
        settled_end = ends[-1]
    face = _face_mask(n, face_present, gap)
    local = [(max(a, offset) - offset, min(b, known_end) - offset) for a, b in windows if a < known_end and b > offset]
    pause, activity = _pause_levels(n, face, mouth_motion, audio_energy_db, [w for w in local if w[0] < w[1]])
    planner = _Planner(pause, activity, min_frames, max_frames, max(1, round(min_pause_s * fps)), fps)
    lo, hi = origin - offset, settled_end - offset
    spans: list[tuple[int, int]] = []
    next_origin = settled_end
    for a, b in ((lo + a, lo + b) for a, b in _runs(face[lo:hi])):
        if b < hi or settled_end == total_frames:
            spans += planner.plan_run(a, b)
            continue
        cuts = [a, *planner._natural_cuts(a, hi)]  # the run goes on past `hi`: plan up to a firewall
        firewall = max((j for j in range(1, len(cuts) - 1)
                        if cuts[j] - cuts[j - 1] >= min_frames and cuts[j + 1] - cuts[j] >= min_frames), default=0)
        if firewall:
            pieces = planner._merge(list(itertools.pairwise(cuts[:firewall + 1])))
            spans += [span for piece in pieces for span in planner._split(*piece)]
        next_origin = offset + cuts[firewall]
    segments = [Segment(first_id + i, offset + s, offset + e, float(fps)) for i, (s, e) in enumerate(spans)]
    return segments, next_origin


def settle_margin(fps: float = FPS, min_gap_s: float = 0.5) -> int:
    """Frames a partial view must reach past a calibration window's start or end for `settled_segments`
    to use that window."""
    return _edge(max(0, round(min_gap_s * fps)))


def _edge(gap: int) -> int:
    """Frames at each end of a partial view of the signals that may still change when more is known:
    a face gap of up to ``gap`` frames bridged, a face run under ``gap`` frames dropped, the mouth
    motion's smoothing."""
    return 3 * gap + _MOUTH_SMOOTH_FRAMES + 2


def _check_len(name: str, arr: np.ndarray | None, n: int) -> np.ndarray | None:
    if arr is None:
        return None
    arr = np.asarray(arr)
    if arr.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},), got {arr.shape}")
    return arr


def _fit_length(x: np.ndarray, n: int) -> np.ndarray:
    """``x`` cut to ``n`` entries or extended with its last value (NaN when empty)."""
    if x.size >= n:
        return x[:n]
    fill = x[-1] if x.size else np.nan
    return np.concatenate([x, np.full(n - x.size, fill)])


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """Maximal runs ``[start, end)`` of True."""
    padded = np.concatenate([[False], np.asarray(mask, bool), [False]])
    edges = np.flatnonzero(padded[1:] != padded[:-1])
    return [(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2], strict=True)]


def _face_mask(n: int, face_present: np.ndarray | None, gap: int) -> np.ndarray:
    """Face frames with gaps ≤ ``gap`` bridged and runs shorter than ``max(gap, 1)`` dropped."""
    face = _check_len("face_present", face_present, n)
    mask = np.ones(n, bool) if face is None else face.astype(bool).copy()
    for a, b in _runs(~mask):
        if a > 0 and b < n and b - a <= gap:
            mask[a:b] = True
    for a, b in _runs(mask):
        if b - a < max(gap, 1):
            mask[a:b] = False
    return mask


def moving_average(x: np.ndarray, k: int) -> np.ndarray:
    """``x`` averaged over ``k`` frames centred on each (ends padded with the edge values)."""
    if k <= 1 or x.size == 0:
        return x
    padded = np.pad(x, (k // 2, k - 1 - k // 2), mode="edge")
    return np.convolve(padded, np.ones(k) / k, mode="valid")


def _cue(
    x: np.ndarray, face: np.ndarray, rel: float, informative: Callable[[float, float], bool],
    max_range: float = math.inf,
) -> tuple[np.ndarray, np.ndarray] | None:
    """(quiet mask, activity in [0,1]) of one cue from its face-frame percentiles, or None."""
    vals = x[face]
    if vals.size < 2:
        return None
    lo, hi = (float(v) for v in np.percentile(vals, [_LO_PERCENTILE, _HI_PERCENTILE]))
    lo = max(lo, hi - max_range)
    if not informative(lo, hi):
        return None
    return x < lo + rel * (hi - lo), np.clip((x - lo) / (hi - lo), 0.0, 1.0)


def _audio_informative(lo: float, hi: float) -> bool:
    return hi - lo >= _AUDIO_MIN_CONTRAST_DB


def _mouth_informative(lo: float, hi: float) -> bool:
    return hi > 0 and hi - lo >= _MOUTH_MIN_CONTRAST * hi


def _pause_levels(
    n: int, face: np.ndarray, motion: np.ndarray | None, energy: np.ndarray | None,
    windows: list[tuple[int, int]],
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Per-frame pause level (fraction of the informative cues quiet) and mean activity, the cues
    calibrated per window (0 and 0 in a window where none is informative), or Nones when no cue is
    informative anywhere."""
    signals: list[tuple[np.ndarray, float, Callable[[float, float], bool], float]] = []
    if energy is not None:
        energy = _fit_length(np.asarray(energy, np.float64).reshape(-1), n)
        e = np.nan_to_num(energy.astype(np.float64), nan=_AUDIO_FLOOR_DB, neginf=_AUDIO_FLOOR_DB)
        signals.append((np.maximum(e, _AUDIO_FLOOR_DB), _AUDIO_REL_THRESHOLD, _audio_informative, _AUDIO_MAX_RANGE_DB))
    motion = _check_len("mouth_motion", motion, n)
    if motion is not None:
        m = moving_average(np.nan_to_num(motion.astype(np.float64)), _MOUTH_SMOOTH_FRAMES)
        signals.append((m, _MOUTH_REL_THRESHOLD, _mouth_informative, math.inf))
    pause, activity = np.zeros(n), np.zeros(n)
    informative = False
    for a, b in windows:
        found = [c for x, rel, useful, max_range in signals
                 if (c := _cue(x[a:b], face[a:b], rel, useful, max_range)) is not None]
        if found:
            informative = True
            pause[a:b] = np.mean([q for q, _ in found], axis=0)
            activity[a:b] = np.mean([act for _, act in found], axis=0)
    return (pause, activity) if informative else (None, None)


class _Planner:
    """Steps 3–5 of the algorithm for one face run."""

    def __init__(
        self,
        pause: np.ndarray | None,
        activity: np.ndarray | None,
        min_frames: int,
        max_frames: int,
        min_pause: int,
        fps: float,
    ) -> None:
        self.pause, self.activity = pause, activity
        self.min_frames, self.max_frames, self.min_pause = min_frames, max_frames, min_pause
        self.search = max(1, round(_HARD_CUT_SEARCH_S * fps))

    def plan_run(self, start: int, end: int) -> list[tuple[int, int]]:
        cuts = [start, *self._natural_cuts(start, end), end]
        pieces = self._merge(list(itertools.pairwise(cuts)))
        return [span for piece in pieces for span in self._split(*piece)]

    def _pause_runs(self, start: int, end: int, level: float, min_len: int) -> list[tuple[int, int]]:
        if self.pause is None:
            return []
        runs = _runs(self.pause[start:end] >= level)
        return [(start + a, start + b) for a, b in runs if b - a >= min_len]

    def _natural_cuts(self, start: int, end: int) -> list[int]:
        runs = self._pause_runs(start, end, 1.0, self.min_pause)
        return [(a + b) // 2 for a, b in runs if a > start and b < end]

    def _merge(self, pieces: list[tuple[int, int]]) -> list[tuple[int, int]]:
        while len(pieces) > 1:
            lengths = [b - a for a, b in pieces]
            i = int(np.argmin(lengths))
            if lengths[i] >= self.min_frames:
                break
            left = lengths[i - 1] if i > 0 else math.inf
            right = lengths[i + 1] if i + 1 < len(pieces) else math.inf
            j = i - 1 if left <= right else i + 1
            a, b = min(i, j), max(i, j)
            pieces[a : b + 1] = [(pieces[a][0], pieces[b][1])]
        return pieces

    def _split(self, start: int, end: int) -> list[tuple[int, int]]:
        out, stack = [], [(start, end)]
        while stack:
            a, b = stack.pop()
            if b - a <= self.max_frames:
                out.append((a, b))
                continue
            c = self._best_cut(a, b)
            stack += [(c, b), (a, c)]
        return out

    def _best_cut(self, start: int, end: int) -> int:
        lo, hi = start + self.min_frames, end - self.min_frames  # allowed cut positions, inclusive
        middle = (start + end) / 2
        best: tuple[float, float, int] | None = None
        for a, b in self._pause_runs(start, end, 0.5, _FORCED_PAUSE_MIN_FRAMES):
            ca, cb = max(a, lo), min(b - 1, hi)
            if ca > cb:
                continue
            cut = (ca + cb + 1) // 2
            key = (float(self.pause[a:b].sum()), -abs(cut - middle), -cut)  # type: ignore[index]  # runs exist
            if best is None or key > best:
                best = key
        if best is not None:
            return -best[2]
        return self._hard_cut(start, end, lo, hi)

    def _hard_cut(self, start: int, end: int, lo: int, hi: int) -> int:
        n = math.ceil((end - start) / self.max_frames)
        target = min(max(start + round((end - start) / n), lo), hi)
        if self.activity is None:
            return target
        a, b = max(lo, target - self.search), min(hi, target + self.search)
        cands = np.arange(a, b + 1)
        order = np.lexsort((np.abs(cands - target), self.activity[a : b + 1]))
        return int(cands[order[0]])


# ---------------------------------------------------------------------------------------------
# Parallel preprocessing chunks
# ---------------------------------------------------------------------------------------------


def plan_chunks(num_frames: int, chunk_frames: int = 750, overlap: int = 25, align: int = 1) -> list[Chunk]:
    """Split ``[0, num_frames)`` into balanced cores of at most ``chunk_frames`` frames, each
    processed with ``overlap`` extra frames on both sides (clipped to the clip).

    Core boundaries are multiples of ``align`` (e.g. the tracker's reset period, so that chunk
    boundaries sit where a chunked run agrees with a one-piece run).
    """
    if chunk_frames <= 0:
        raise ValueError("chunk_frames must be > 0")
    if not 0 <= overlap < chunk_frames:
        raise ValueError("overlap must be >= 0 and < chunk_frames")
    if not 1 <= align <= chunk_frames:
        raise ValueError("align must be >= 1 and <= chunk_frames")
    if num_frames < 0:
        raise ValueError("num_frames must be >= 0")
    units = math.ceil(num_frames / align)
    n = math.ceil(units / (chunk_frames // align))
    bounds = [min(num_frames, i * units // n * align) for i in range(n + 1)] if n else []
    return [
        Chunk(i, max(0, a - overlap), min(num_frames, b + overlap), a, b)
        for i, (a, b) in enumerate(itertools.pairwise(bounds))
    ]
