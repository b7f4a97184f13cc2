"""Whom to read when several faces are visible: the face tracks of a clip and the request's `speaker`.

    largest    the face the tracker follows by default: at each start the largest, most central face,
               then the same face for as long as it is seen (today's behaviour; the default)
    center     the face track whose box centre is on average nearest to the frame centre
    {t, x, y}  the face track under pixel (x, y) of the source video at t seconds (a click on a frame)
    speaking   per segment, the track whose mouth moves with the sound (below); without audio: largest
    all        every face track, each segmented and read on its own (video only)

Active speaker (`speaking`): segments are cut where any face is visible, at the audio's pauses; in each
segment every track seen on at least half of its frames is scored by the Pearson correlation between
its mouth opening (inner-lip gap over mouth width, from the 68 landmarks, 3-frame smoothed) and the
audio energy envelope (dB per video frame, floored 50 dB under its peak, 3-frame smoothed), at the lag
of -2..+2 frames (±80 ms) that fits best. The highest score wins; a segment where no track has a
usable score (still mouths, no sound) keeps the default track. A classical synchrony measure that needs
no extra model; it is fooled when the voice comes from off screen, when two people speak at once,
by dubbed or badly offset audio (beyond ±80 ms), and by a face whose lips are not visible.
"""

from __future__ import annotations

import numpy as np

from cpu_worker import segmentation
from cpu_worker.mouth_roi import MouthRoiResult, landmark_box
from tasks.errors import JobError
from tasks.records import FPS, FaceTrackInfo, SpeakerHint, seconds

DEFAULT = "largest"
SYNC_MAX_LAG = 2  # frames either way
SYNC_MIN_COVERAGE = 0.5  # of a segment's frames, for a track to be scored
HINT_WINDOW_S = 1.0  # a hint looks for a face this close in time
CENTRE_MIN_SHARE = 0.25  # `center` considers tracks seen on at least this share of the face frames


def needs_track_rois(speaker: str | SpeakerHint | None) -> bool:
    """Whether preprocessing must crop every face track (all modes but the default)."""
    return speaker not in (None, DEFAULT)


def face_tracks(clip: MouthRoiResult) -> list[MouthRoiResult]:
    """The clip's face tracks (id = position + 1); a clip without any (one detection of the last-resort
    pass) is its own single track."""
    return clip.tracks or ([clip] if clip.detected.any() else [])


def track_info(tracks: list[MouthRoiResult]) -> list[FaceTrackInfo]:
    """`quality.tracks`: id, time span, frames with the face, and its landmarks' box about once a second."""
    info: list[FaceTrackInfo] = []
    for k, track in enumerate(tracks):
        seen = np.flatnonzero(track.detected)
        if seen.size == 0:
            continue
        boxes = []
        for second in range(int(seen[0] // FPS), int(seen[-1] // FPS) + 1):
            in_second = seen[(seen >= second * FPS) & (seen < (second + 1) * FPS)]
            if in_second.size:
                f = int(in_second[0])
                boxes.append([round(f / FPS, 2), *(round(v, 1) for v in landmark_box(track.landmarks[f]))])
        info.append({"id": k + 1, "start": seconds(seen[0]), "end": seconds(seen[-1] + 1),
                     "frames": int(seen.size), "boxes": boxes})
    return info


def face_mask(clip: MouthRoiResult) -> np.ndarray:
    """Frames of the clip's (or track's) face run: short gaps were interpolated; only breaks lack a face."""
    mask = np.ones(len(clip), bool)
    for start, end in clip.breaks:
        mask[start:end] = False
    return mask


def mouth_opening(landmarks: np.ndarray) -> np.ndarray:
    """Inner-lip gap over mouth width per frame, from 68-point landmarks [T,68,2] (NaN where absent)."""
    lm = np.asarray(landmarks, np.float64)
    pairs = ((61, 67), (62, 66), (63, 65))  # inner lips, top and bottom
    gap = np.mean([np.linalg.norm(lm[:, top] - lm[:, bottom], axis=1) for top, bottom in pairs], axis=0)
    width = np.linalg.norm(lm[:, 48] - lm[:, 54], axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(width > 1e-6, gap / width, np.nan)


def sync_score(opening: np.ndarray, energy_db: np.ndarray, valid: np.ndarray) -> float | None:
    """Best Pearson correlation of mouth opening and audio energy over lags -2..+2 frames (None: unusable)."""
    best: float | None = None
    o = segmentation.moving_average(np.nan_to_num(opening), 3)
    e = segmentation.moving_average(np.maximum(energy_db, energy_db.max(initial=-120.0) - 50.0), 3)
    for lag in range(-SYNC_MAX_LAG, SYNC_MAX_LAG + 1):
        a, b, v = _shift(o, e, valid, lag)
        if v.sum() < 5 or a[v].std() < 1e-6 or b[v].std() < 1e-6:
            continue
        r = float(np.corrcoef(a[v], b[v])[0, 1])
        best = r if best is None else max(best, r)
    return best


def _shift(o: np.ndarray, e: np.ndarray, valid: np.ndarray, lag: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Opening at frame i paired with energy at frame i + lag."""
    if lag >= 0:
        n = len(o) - lag
        return o[:n], e[lag:lag + n], valid[:n]
    return o[-lag:], e[:len(o) + lag], valid[-lag:]


def choose_hint(tracks: list[MouthRoiResult], hint: SpeakerHint) -> int:
    """Index of the track under the hint's point at its time (nearest detected frame within 1 s)."""
    frame = round(hint["t"] * FPS)
    window = round(HINT_WINDOW_S * FPS)
    best: tuple[float, int] | None = None
    for k, track in enumerate(tracks):
        seen = np.flatnonzero(track.detected[max(0, frame - window):frame + window + 1]) + max(0, frame - window)
        if seen.size == 0:
            continue
        f = int(seen[np.argmin(np.abs(seen - frame))])
        x0, y0, x1, y1 = landmark_box(track.landmarks[f])
        size = max(x1 - x0, y1 - y0)
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        d = float(np.hypot(hint["x"] - cx, hint["y"] - cy))
        if d <= size and (best is None or d < best[0]):  # within about a face of the landmarks' centre
            best = (d, k)
    if best is None:
        raise JobError("speaker_not_found",
                       f"no face at ({hint['x']:g}, {hint['y']:g}) within {HINT_WINDOW_S:g} s of t={hint['t']:g} s")
    return best[1]


def choose_center(tracks: list[MouthRoiResult], frame_size: tuple[int, int] | None) -> int:
    """Index of the track nearest the frame centre on average, among tracks seen often enough."""
    counts = [int(t.detected.sum()) for t in tracks]
    if frame_size is None:
        return int(np.argmax(counts))
    cx, cy = frame_size[0] / 2, frame_size[1] / 2
    candidates = [k for k, c in enumerate(counts) if c >= CENTRE_MIN_SHARE * max(counts)]

    def distance(k: int) -> float:
        centres = tracks[k].landmarks[tracks[k].detected].mean(axis=1)
        return float(np.hypot(centres[:, 0] - cx, centres[:, 1] - cy).mean())

    return min(candidates, key=distance)


def default_track(clip: MouthRoiResult, tracks: list[MouthRoiResult], start: int, end: int) -> int | None:
    """Index of the track the default stream follows on frames [start, end) (same landmarks), or None when
    it follows none there (a face beyond the cap, or found only by the last-resort pass)."""
    best, best_k = 0, None
    for k, track in enumerate(tracks):
        both = clip.detected[start:end] & track.detected[start:end]
        same = np.abs(clip.landmarks[start:end][both] - track.landmarks[start:end][both]).max(axis=(1, 2)) < 1.0
        if int(same.sum()) > best:
            best, best_k = int(same.sum()), k
    return best_k
