"""Public entry points: talking-face frames → official AV-HuBERT mouth ROIs (uint8 [T,96,96]).

``extract_mouth_rois`` streams frames through detection/tracking (``landmarks``), official gap
interpolation, 12-frame smoothing, similarity warp and crop (``align``).  Detection runs in blocks of
``TrackerConfig.block`` frames anchored to absolute frame indices on a thread pool (dlib's HOG,
OpenCV and the numba port of the 68-point predictor release the GIL), so the result does not depend
on the number of workers, and a long clip can be cut
into overlapping chunks (``start_frame``) processed anywhere and joined with ``stitch_results``.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import time
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cpu_worker.align import CROP_SIZE, WINDOW, RoiCropper, iter_crops, to_gray
from cpu_worker.errors import NoFaceDetected, NoFrames
from cpu_worker.frames import resample_timed
from cpu_worker.landmarks import (
    Box,
    DetectionStats,
    TrackerConfig,
    TrackLinker,
    last_resort_detect,
    nearest_tracks,
    select_track,
    track_block,
)
from tasks.records import FPS

_TAIL = WINDOW + 2  # frames at a chunk's end whose ROI may differ from the single-piece run


@dataclass
class MouthRoiResult:
    """Mouth ROIs of a clip (or of a chunk starting at absolute frame ``start_frame``).

    ``landmarks`` are the (interpolated) landmarks used for the crop; ``detected`` marks frames where a
    face was actually found; ``breaks`` are half-open frame ranges (relative to this result) where the
    face track is missing for longer than ``max_gap_s`` — split the clip there.

    ``tracks`` are the face tracks found (track id = position + 1), each a result of the same length
    holding one face only (no ``tracks`` of its own); their ``rois`` are empty unless they were cropped
    (``extract_mouth_rois(crop_tracks=True)``).  The clip's own ROIs follow the default speaker.
    """

    rois: np.ndarray  # uint8 [T,96,96]
    landmarks: np.ndarray  # float32 [T,68,2]
    detected: np.ndarray  # bool [T]
    breaks: list[tuple[int, int]] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)
    start_frame: int = 0
    fps: float = FPS
    tracks: list[MouthRoiResult] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.detected.shape[0])

    def to_arrays(self, prefix: str = "") -> dict[str, np.ndarray]:
        """Plain arrays (for ``np.savez``); ``from_arrays`` restores the result."""
        arrays = {
            "rois": self.rois,
            "landmarks": self.landmarks,
            "detected": self.detected,
            "breaks": np.asarray(self.breaks, dtype=np.int64).reshape(-1, 2),
            "start_frame": np.asarray(self.start_frame, dtype=np.int64),
            "fps": np.asarray(self.fps, dtype=np.float64),
            "stats_json": np.asarray(json.dumps(self.stats, default=_json_default)),
        }
        if not prefix:
            arrays["num_tracks"] = np.asarray(len(self.tracks), dtype=np.int64)
        out = {prefix + k: v for k, v in arrays.items()}
        for k, track in enumerate(self.tracks):
            out.update(track.to_arrays(prefix=f"track{k}."))
        return out

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray], prefix: str = "") -> MouthRoiResult:
        """Inverse of ``to_arrays`` (accepts an ``NpzFile`` too)."""
        tracks = [] if prefix or "num_tracks" not in arrays else [
            cls.from_arrays(arrays, prefix=f"track{k}.") for k in range(int(arrays["num_tracks"]))]
        return cls(
            rois=np.asarray(arrays[prefix + "rois"], dtype=np.uint8),
            landmarks=np.asarray(arrays[prefix + "landmarks"], dtype=np.float32),
            detected=np.asarray(arrays[prefix + "detected"], dtype=bool),
            breaks=[(int(a), int(b)) for a, b in np.asarray(arrays[prefix + "breaks"]).reshape(-1, 2)],
            stats=json.loads(str(arrays[prefix + "stats_json"])) if prefix + "stats_json" in arrays else {},
            start_frame=int(arrays[prefix + "start_frame"]),
            fps=float(arrays[prefix + "fps"]) if prefix + "fps" in arrays else FPS,
            tracks=tracks,
        )


def _detector_total(calls: Mapping[str, int]) -> int:
    return int(sum(v for k, v in calls.items() if k != "between"))


def _json_default(obj: object) -> object:
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def crop_mouth_rois(frames: np.ndarray | Iterable[np.ndarray], landmarks: np.ndarray) -> np.ndarray:
    """Official alignment + crop from given (already interpolated) landmarks [T,68,2] → uint8 [T,96,96].

    ``frames`` are BGR uint8 [T,H,W,3] (or grey [T,H,W]), as an array or any iterable.
    """
    landmarks = np.asarray(landmarks, dtype=np.float64)
    if landmarks.ndim != 3 or landmarks.shape[1:] != (68, 2):
        raise ValueError(f"landmarks must be [T,68,2], got {landmarks.shape}")
    rois = list(iter_crops(frames, landmarks))
    if not rois:
        return np.zeros((0, CROP_SIZE, CROP_SIZE), np.uint8)
    return np.stack(rois)


_Item = tuple[int, np.ndarray, np.ndarray]  # (frame index, grey frame, landmarks for the crop)

# The bytes of grey frames a leading gap (the frames before the first face) may keep for their crops:
# 250 full-HD frames. Up to 1920x1080 all 250 are kept; of 4096x2304 frames (the largest allowed), 54,
# where 250 took 2.4 GB. Dropped frames are in a break (no face) and get empty ROIs. The last-resort CNN
# pass (a chunk where the schedule found no face) needs every frame kept, so it runs on at most as many.
MAX_LEAD_BYTES = 250 * 1920 * 1080


class _GapFiller:
    """Streaming ``landmarks_interpolate``: short gaps are interpolated linearly between detections
    (leading/trailing gaps copy the nearest detection, as the official code); a gap that grows past
    ``max_gap`` frames becomes a break and is filled by holding the last detection so that frames need
    not be buffered. A leading gap keeps at most ``max_lead`` frames and ``max_lead_bytes`` of them."""

    def __init__(self, max_gap: int, max_lead: int, max_lead_bytes: int | None = None) -> None:
        self.max_gap, self.max_lead, self.max_lead_bytes = max_gap, max_lead, max_lead_bytes
        self.pending: list[tuple[int, np.ndarray]] = []  # (index, grey) of frames without landmarks yet
        self.last: np.ndarray | None = None
        self.last_idx = -1
        self.gap_start: int | None = None
        self.breaks: list[tuple[int, int]] = []
        self.interpolated = 0
        self.holding = False
        self.held = 0
        self.dropped_lead = 0

    @property
    def pending_bytes(self) -> int:
        """The bytes of the grey frames kept for their crops."""
        return sum(gray.nbytes for _, gray in self.pending)

    def _close_gap(self, end: int) -> None:
        if self.gap_start is not None and end - self.gap_start > self.max_gap:
            self.breaks.append((self.gap_start, end))
        self.gap_start = None

    def push(self, idx: int, gray: np.ndarray, lm: np.ndarray | None) -> list[tuple[int, np.ndarray, np.ndarray]]:
        out: list[tuple[int, np.ndarray, np.ndarray]] = []
        if lm is None:
            if self.gap_start is None:
                self.gap_start = idx
            if self.last is not None and (self.holding or len(self.pending) >= self.max_gap):
                # a long gap: emit what is pending and hold the last detection from now on
                for j, g in self.pending:
                    out.append((j, g, self.last))
                self.held += len(self.pending) + 1
                self.holding = True
                self.pending.clear()
                out.append((idx, gray, self.last))
            else:
                self.pending.append((idx, gray))
                while self.last is None and len(self.pending) > 1 and (
                        len(self.pending) > self.max_lead
                        or (self.max_lead_bytes is not None and self.pending_bytes > self.max_lead_bytes)):
                    # a very long leading gap: drop the oldest frame (it will get an empty ROI)
                    j, g = self.pending.pop(0)
                    out.append((j, g, np.full((68, 2), np.nan)))
                    self.dropped_lead += 1
            return out
        lm = lm.astype(np.float64)
        self._close_gap(idx)
        if self.pending:
            n = idx - self.last_idx
            for j, g in self.pending:
                # leading gap: copy the first detection; otherwise linear as the official code
                w = (j - self.last_idx) / float(n)
                out.append((j, g, lm if self.last is None else self.last + w * (lm - self.last)))
            self.interpolated += len(self.pending)
            self.pending.clear()
        self.holding = False
        self.last, self.last_idx = lm, idx
        out.append((idx, gray, lm))
        return out

    def flush(self, end: int) -> list[_Item]:
        self._close_gap(end)
        if self.last is None:
            return []
        out = [(j, g, self.last) for j, g in self.pending]
        self.interpolated += len(self.pending)
        self.pending.clear()
        return out


def _blocks(frames: Iterable[np.ndarray], start: int, block: int) -> Iterator[tuple[int, list[np.ndarray]]]:
    """Group frames, grey as they are read (a third of the bytes in the blocks waiting and in flight;
    the colour frame is never used again), into runs that end at absolute multiples of ``block``."""
    buf: list[np.ndarray] = []
    first = start
    for i, frame in enumerate(frames):
        if frame.dtype != np.uint8:
            raise ValueError(f"frames must be uint8, got {frame.dtype}")
        buf.append(np.ascontiguousarray(to_gray(frame)))
        if (start + i + 1) % block == 0:
            yield first, buf
            first, buf = start + i + 1, []
    if buf:
        yield first, buf


class _RoiBuilder:
    """Gap filling (``_GapFiller``) feeding the crop (``RoiCropper``): frames with landmarks in, ROIs out."""

    def __init__(self, max_gap: int, max_lead: int, crop: bool = True, max_lead_bytes: int | None = None) -> None:
        self.filler = _GapFiller(max_gap, max_lead, max_lead_bytes)
        self.cropper = RoiCropper()
        self.crop = crop
        self.rois: list[np.ndarray] = []
        self.landmarks: list[np.ndarray] = []

    def push(self, idx: int, gray: np.ndarray, lm: np.ndarray | None) -> None:
        self._crop(self.filler.push(idx, gray, lm))

    def _crop(self, items: list[_Item]) -> None:
        for _, gray, lm in items:
            self.landmarks.append(lm)
            if not self.crop:
                continue
            if np.isnan(lm).any():  # dropped from an overlong leading gap (nothing is in the cropper yet)
                self.rois.append(np.zeros((CROP_SIZE, CROP_SIZE), np.uint8))
                continue
            self.rois.extend(self.cropper.push(gray, lm))

    def finish(self, n: int) -> None:
        self._crop(self.filler.flush(n))
        if self.crop:
            self.rois.extend(self.cropper.flush())


_Tracked = tuple[int, np.ndarray, np.ndarray | None, dict[int, np.ndarray | None]]


def _tracked(stream: Iterable[np.ndarray], start_frame: int, cfg: TrackerConfig, n_workers: int,
             det_stats: DetectionStats) -> Iterator[_Tracked]:
    """``(absolute index, grey frame, landmarks or None, {track id: landmarks or None})`` per frame, in order.

    Blocks of ``cfg.block`` frames are tracked on a thread pool (``track_block``), at most
    ``n_workers`` ahead; in each block's periods the face followed so far is chosen (``select_track``),
    and every candidate is linked to its face track (``TrackLinker``).
    """
    speaker: Box | None = None  # where the followed face was last seen
    linker = TrackLinker(cfg.max_faces)
    with ThreadPoolExecutor(max_workers=n_workers) as pool:
        inflight: deque[tuple[int, Future]] = deque()
        blocks = _blocks(stream, start_frame, cfg.block)
        while True:
            for first, block in itertools.islice(blocks, n_workers + 1 - len(inflight)):
                inflight.append((first, pool.submit(track_block, block, first, cfg)))
            if not inflight:
                return
            first, future = inflight.popleft()
            periods, grays, stats = future.result()
            det_stats.merge(stats)
            landmarks: list[np.ndarray | None] = []
            by_track: list[dict[int, np.ndarray | None]] = []
            for candidates in periods:
                track = select_track(candidates, speaker)
                landmarks.extend(track.landmarks)
                speaker = track.last_box or speaker
                linked = linker.link(candidates)
                by_track.extend({tid: t.landmarks[i] for tid, t in linked.items()} for i in range(len(track.landmarks)))
            for k, (gray, lm) in enumerate(zip(grays, landmarks, strict=True)):
                yield first + k, gray, lm, by_track[k]


def tracking_threads(workers: int | None = None) -> int:
    """The threads `extract_mouth_rois` tracks blocks on, each with its own dlib model set:
    ``workers``, or up to 2 by default."""
    return max(1, workers if workers is not None else min(2, os.cpu_count() or 1))


def extract_mouth_rois(
    frames: np.ndarray | Iterable[np.ndarray],
    fps: float = FPS,
    *,
    start_frame: int = 0,
    max_gap_s: float = 1.0,
    workers: int | None = None,
    config: TrackerConfig | None = None,
    corrupt_skipped: int = 0,
    require_face: bool = True,
    crop_tracks: bool = False,
) -> MouthRoiResult:
    """Detect, track, align and crop the speaker's mouth in BGR uint8 frames ([T,H,W,3] or an iterable).

    Frames at another rate than 25 fps are resampled to 25 fps first.  ``start_frame`` is the absolute
    index (at 25 fps) of the first frame when processing one chunk of a longer clip.  Raises
    ``NoFrames`` for an empty input and ``NoFaceDetected`` when no frame has a face — unless
    ``require_face`` is False (a chunk of a longer clip): then the result has no detection, zero ROIs,
    NaN landmarks and the whole range as a break (if longer than ``max_gap_s``).

    Every face followed (at most ``config.max_faces``) is also returned as a face track (``tracks``),
    with its own gap filling and breaks, and its own ROIs when ``crop_tracks``.
    """
    t0 = time.perf_counter()
    cfg = config or TrackerConfig()
    n_workers = tracking_threads(workers)
    stream: Iterable[np.ndarray] = frames
    if abs(fps - FPS) > 1e-6:
        stream = resample_timed(((i / fps, f) for i, f in enumerate(frames)), FPS)
    max_gap = max(1, round(max_gap_s * FPS))
    builder = _RoiBuilder(max_gap, max_lead=max(250, 10 * max_gap), max_lead_bytes=MAX_LEAD_BYTES)
    detected: list[bool] = []
    det_stats = DetectionStats()
    tracks = [_RoiBuilder(max_gap, max_lead=max_gap, crop=crop_tracks) for _ in range(cfg.max_faces)]
    track_detected: list[list[bool]] = [[] for _ in tracks]
    frame_size: list[int] = []
    for idx, gray, lm, by_track in _tracked(stream, start_frame, cfg, n_workers, det_stats):
        frame_size = frame_size or [int(gray.shape[1]), int(gray.shape[0])]
        detected.append(lm is not None)
        builder.push(idx - start_frame, gray, lm)
        for tid, track in enumerate(tracks):
            track_lm = by_track.get(tid)
            track_detected[tid].append(track_lm is not None)
            track.push(idx - start_frame, gray, track_lm)
    n = len(detected)
    if n == 0:
        raise NoFrames()
    if not any(detected) and len(builder.filler.pending) == n:
        # nothing found by the schedule (e.g. a short clip of a profile face): last-resort CNN pass
        pending = builder.filler.pending
        found = last_resort_detect([g for _, g in pending], cfg, stats=det_stats)
        if found is not None:
            pos, lm = found
            detected[pos] = True
            builder = _RoiBuilder(max_gap, max_lead=n)
            for j, g in pending:
                builder.push(j, g, lm if j == pending[pos][0] else None)
    if any(detected):
        builder.finish(n)
        rois, landmarks, breaks = np.stack(builder.rois), np.stack(builder.landmarks), list(builder.filler.breaks)
    elif require_face:
        raise NoFaceDetected()
    else:
        builder = _RoiBuilder(max_gap, max_lead=n)
        rois, landmarks = np.zeros((n, CROP_SIZE, CROP_SIZE), np.uint8), np.full((n, 68, 2), np.nan)
        breaks = [(0, n)] if n > max_gap else []
    elapsed = time.perf_counter() - t0
    calls = det_stats.detector_calls
    stats: dict[str, Any] = {
        "frames_total": n,
        "frames_detected": int(sum(detected)),
        "frames_interpolated": builder.filler.interpolated,
        "frames_held": builder.filler.held,
        "frames_in_breaks": int(sum(e - s for s, e in breaks)),
        "detector_calls": _detector_total(calls),
        "detector_calls_by_kind": dict(calls),  # "between": predictor on an interpolated box, no detector
        "corrupt_skipped": int(corrupt_skipped or getattr(frames, "corrupt_skipped", 0)),
        "faces_seen": det_stats.faces_seen,
        "frame_size": frame_size,  # [width, height] of the first frame
        "crops_clamped": builder.cropper.clamped,
        "seconds": elapsed,
        "fps": n / elapsed if elapsed > 0 else float("inf"),
    }
    return MouthRoiResult(rois=rois, landmarks=landmarks.astype(np.float32), detected=np.array(detected, dtype=bool),
                          breaks=breaks, stats=stats, start_frame=start_frame,
                          tracks=[_track_result(t, d, start_frame) for t, d in zip(tracks, track_detected, strict=True)
                                  if any(d)])


def _track_result(builder: _RoiBuilder, detected: list[bool], start_frame: int) -> MouthRoiResult:
    """One face track of a chunk from its builder (every frame pushed; at least one detection)."""
    n = len(detected)
    builder.finish(n)
    rois = np.stack(builder.rois) if builder.rois else np.zeros((0, CROP_SIZE, CROP_SIZE), np.uint8)
    return MouthRoiResult(rois=rois, landmarks=np.stack(builder.landmarks).astype(np.float32),
                          detected=np.array(detected, dtype=bool), breaks=list(builder.filler.breaks),
                          stats={"frames_detected": int(sum(detected))}, start_frame=start_frame)


def stitch_results(results: Sequence[MouthRoiResult], block: int | None = None,
                   max_tracks: int | None = None) -> MouthRoiResult:
    """Join chunk results (each from ``extract_mouth_rois(..., start_frame=s)``) into one clip result.

    Consecutive chunks must overlap by at least ``block + 14`` frames (38 by default); each boundary
    is placed at the first tracker reset (multiple of ``block``) inside the later chunk, where both
    chunks agree with the single-piece run: from a reset on, landmarks depend only on frames from that
    reset, and a ROI only on the landmarks of the next 11 frames, which the earlier chunk still holds
    (the last 14 frames of a chunk — smoothing window, end-of-chunk HOG key frame — are never kept).
    Not covered: a face gap that straddles a boundary is filled from each chunk's own side.

    Face tracks are joined too: a chunk's track continues the clip's track last seen (before the
    boundary) less than half a face from where it is first seen after it; the others become new tracks
    (at most ``max_tracks`` in all, by default ``TrackerConfig.max_faces``).
    """
    if not results:
        raise ValueError("nothing to stitch")
    block = block or TrackerConfig().block
    parts = sorted(results, key=lambda r: r.start_frame)
    keep: list[tuple[int, int]] = []  # (absolute keep start, absolute keep end) per part
    begin = parts[0].start_frame
    for a, b in itertools.pairwise(parts):
        a_end = a.start_frame + len(a)
        split = stitch_boundary(b.start_frame, block)
        if split > a_end - _TAIL or b.start_frame < begin:
            raise ValueError(
                f"chunks starting at {a.start_frame} and {b.start_frame} overlap too little "
                f"(need at least {block + _TAIL} frames)"
            )
        keep.append((begin, split))
        begin = split
    last = parts[-1]
    keep.append((begin, last.start_frame + len(last)))
    clip = _join(parts, keep)
    calls: dict[str, int] = {}
    for r in parts:
        for k, v in r.stats.get("detector_calls_by_kind", {}).items():
            calls[k] = calls.get(k, 0) + v
    clip.stats = {
        "frames_total": int(clip.detected.size),
        "frames_detected": int(clip.detected.sum()),
        "frames_interpolated": int(clip.detected.size - clip.detected.sum()),
        "detector_calls": _detector_total(calls),
        "detector_calls_by_kind": calls,
        "corrupt_skipped": int(sum(r.stats.get("corrupt_skipped", 0) for r in parts)),
        "faces_seen": max(r.stats.get("faces_seen", 0) for r in parts),
        "frame_size": parts[0].stats.get("frame_size"),
        "chunks": len(parts),
    }
    cap = max_tracks or TrackerConfig().max_faces
    clip.tracks = [_join(pieces, keep) for pieces in _link_chunk_tracks(parts, keep, cap)]
    return clip


def stitch_boundary(chunk_start: int, block: int | None = None) -> int:
    """Where `stitch_results` starts keeping a later chunk that starts at ``chunk_start``: its first
    tracker reset (multiple of ``block``)."""
    block = block or TrackerConfig().block
    return math.ceil(chunk_start / block) * block


def _join(parts: Sequence[MouthRoiResult], keep: Sequence[tuple[int, int]]) -> MouthRoiResult:
    """Frames ``keep[i]`` (absolute) of each part, concatenated; breaks joined across boundaries."""
    origin = parts[0].start_frame
    rois, lms, det = [], [], []
    breaks: list[tuple[int, int]] = []
    for r, (s, e) in zip(parts, keep, strict=True):
        lo, hi = s - r.start_frame, e - r.start_frame
        rois.append(r.rois[lo:hi])
        lms.append(r.landmarks[lo:hi])
        det.append(r.detected[lo:hi])
        for bs, be in r.breaks:
            bs, be = max(bs, lo), min(be, hi)
            if bs < be:
                bs, be = bs + r.start_frame - origin, be + r.start_frame - origin
                if breaks and breaks[-1][1] == bs:
                    breaks[-1] = (breaks[-1][0], be)
                else:
                    breaks.append((bs, be))
    detected = np.concatenate(det)
    return MouthRoiResult(rois=np.concatenate(rois), landmarks=np.concatenate(lms), detected=detected,
                          breaks=breaks, stats={"frames_detected": int(detected.sum())}, start_frame=origin)


def landmark_box(landmarks: np.ndarray) -> Box:
    """The bounding box of one frame's landmarks [68,2]."""
    (x0, y0), (x1, y1) = landmarks.min(axis=0), landmarks.max(axis=0)
    return float(x0), float(y0), float(x1), float(y1)


def _box_at(track: MouthRoiResult, frames: Iterable[int]) -> Box | None:
    """The landmarks' bounding box at the first of ``frames`` (relative) where the track has its face."""
    for f in frames:
        if 0 <= f < len(track) and track.detected[f]:
            return landmark_box(track.landmarks[f])
    return None


def _absent(part: MouthRoiResult, cropped: bool) -> MouthRoiResult:
    """A track piece for a chunk where the face is not seen: no detection, the whole chunk a break."""
    n = len(part)
    return MouthRoiResult(rois=np.zeros((n if cropped else 0, CROP_SIZE, CROP_SIZE), np.uint8),
                          landmarks=np.full((n, 68, 2), np.nan, np.float32), detected=np.zeros(n, bool),
                          breaks=[(0, n)] if n else [], start_frame=part.start_frame)


def _link_chunk_tracks(parts: Sequence[MouthRoiResult], keep: Sequence[tuple[int, int]],
                       max_tracks: int) -> list[list[MouthRoiResult]]:
    """Per clip track, its piece in every part (``_absent`` where the part does not see it)."""
    clip_tracks: list[list[MouthRoiResult | None]] = []
    last_box: list[Box | None] = []  # where each clip track was last seen, up to the current boundary
    for p, (part, (s, e)) in enumerate(zip(parts, keep, strict=True)):
        lo, hi = s - part.start_frame, e - part.start_frame
        firsts = [_box_at(t, range(lo, hi)) for t in part.tracks]
        taken = nearest_tracks(firsts, dict(enumerate(last_box)))  # local -> clip track
        for local, box in enumerate(firsts):
            if box is not None and local not in taken and len(clip_tracks) < max_tracks:
                taken[local] = len(clip_tracks)
                clip_tracks.append([None] * len(parts))
                last_box.append(None)
        for local, g in taken.items():
            track = part.tracks[local]
            clip_tracks[g][p] = track
            last_box[g] = _box_at(track, range(hi - 1, lo - 1, -1)) or last_box[g]
    cropped = any(len(t.rois) for part in parts for t in part.tracks)
    return [[piece if piece is not None else _absent(parts[p], cropped) for p, piece in enumerate(pieces)]
            for pieces in clip_tracks]
