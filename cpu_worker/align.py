"""Official AV-HuBERT / LRS3 mouth-ROI alignment: interpolation, smoothing, similarity warp, crop.

Re-implements ``avhubert/preparation/align_mouth.py`` (``landmarks_interpolate`` + ``crop_patch``):
the similarity transform is estimated from the mean of the stable points (33, 36, 39, 42, 45) over a
window of 12 frames starting at the current frame (the last 11 frames reuse the last full window) onto
the 20-words mean face in a 256×256 frame; the 96×96 crop is centred on the mean of the current
frame's transformed mouth landmarks (48–67), clamped to the frame.  Only the cropped region is warped
(``cv2.warpAffine``), and the result is rounded down like the official ``skimage`` float → uint8 cast.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Iterable, Iterator
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np

STD_SIZE = 256
STABLE_POINTS = (33, 36, 39, 42, 45)
MOUTH_START, MOUTH_STOP = 48, 68
WINDOW = 12
CROP_SIZE = 96
_MEAN_FACE_PATH = Path(__file__).with_name("data") / "20words_mean_face.npy"


@lru_cache(maxsize=1)
def mean_face() -> np.ndarray:
    """The 20-words mean face (68×2, float64, 256×256 frame) shipped with the package."""
    face = np.load(_MEAN_FACE_PATH).astype(np.float64)
    face.setflags(write=False)
    return face


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (Umeyama, with scale) mapping ``src`` points onto ``dst``; 2×3 matrix.

    Same estimate as ``skimage.transform.estimate_transform('similarity', src, dst)``.
    """
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    src_mean, dst_mean = src.mean(axis=0), dst.mean(axis=0)
    src_d, dst_d = src - src_mean, dst - dst_mean
    a = dst_d.T @ src_d / src.shape[0]
    d = np.ones(2)
    if np.linalg.det(a) < 0:
        d[-1] = -1.0
    u, s, vt = np.linalg.svd(a)
    rank = np.linalg.matrix_rank(a)
    if rank == 0:
        raise ValueError("degenerate landmarks: cannot estimate a similarity transform")
    if rank == 1:
        rot = u @ vt if np.linalg.det(u) * np.linalg.det(vt) > 0 else u @ np.diag([1.0, -1.0]) @ vt
    else:
        rot = u @ np.diag(d) @ vt
    var = src_d.var(axis=0).sum()
    scale = (s @ d) / var if var > 0 else 1.0
    m = np.empty((2, 3))
    m[:, :2] = scale * rot
    m[:, 2] = dst_mean - m[:, :2] @ src_mean
    return m


def interpolate_landmarks(landmarks: np.ndarray, detected: np.ndarray) -> np.ndarray:
    """Official ``landmarks_interpolate``: linear between detections, edges copied from the nearest.

    ``landmarks`` is [T,68,2]; rows where ``detected`` is False are ignored.  Returns float64 [T,68,2].
    Raises ``ValueError`` if nothing is detected.
    """
    lm = np.asarray(landmarks, dtype=np.float64).copy()
    idx = np.flatnonzero(np.asarray(detected, dtype=bool))
    if idx.size == 0:
        raise ValueError("no detected frame to interpolate from")
    for a, b in itertools.pairwise(idx):
        if b - a > 1:
            steps = np.arange(1, b - a)[:, None, None] / float(b - a)
            lm[a + 1 : b] = lm[a] + steps * (lm[b] - lm[a])
    lm[: idx[0]] = lm[idx[0]]
    lm[idx[-1] + 1 :] = lm[idx[-1]]
    return lm


def crop_from_transform(gray: np.ndarray, transform: np.ndarray, landmarks: np.ndarray) -> tuple[np.ndarray, bool]:
    """Warp only the 96×96 mouth crop of ``gray`` under ``transform``; returns (roi, clamped).

    ``clamped`` tells whether the crop centre had to be moved to stay inside the 256×256 frame.
    """
    mouth = landmarks[MOUTH_START:MOUTH_STOP] @ transform[:, :2].T + transform[:, 2]
    cx, cy = mouth.mean(axis=0)
    half = CROP_SIZE // 2
    clamped = False
    if cy - half < 0:
        cy, clamped = half, True
    if cx - half < 0:
        cx, clamped = half, True
    if cy + half > STD_SIZE:
        cy, clamped = STD_SIZE - half, True
    if cx + half > STD_SIZE:
        cx, clamped = STD_SIZE - half, True
    x0, y0 = float(np.rint(cx)) - half, float(np.rint(cy)) - half
    m = transform.copy()
    m[0, 2] -= x0
    m[1, 2] -= y0
    # only the source pixels the crop can sample are converted and warped
    inv = cv2.invertAffineTransform(m)
    corners = np.array([[0, 0, 1], [CROP_SIZE, 0, 1], [0, CROP_SIZE, 1], [CROP_SIZE, CROP_SIZE, 1]], np.float64)
    src_pts = corners @ inv.T
    h, w = gray.shape[:2]
    sx0 = int(np.clip(np.floor(src_pts[:, 0].min()) - 2, 0, w))
    sy0 = int(np.clip(np.floor(src_pts[:, 1].min()) - 2, 0, h))
    sx1 = int(np.clip(np.ceil(src_pts[:, 0].max()) + 3, 0, w))
    sy1 = int(np.clip(np.ceil(src_pts[:, 1].max()) + 3, 0, h))
    if sx1 - sx0 < 2 or sy1 - sy0 < 2:  # the crop lies entirely outside the frame
        return np.zeros((CROP_SIZE, CROP_SIZE), np.uint8), clamped
    m[0, 2] += m[0, 0] * sx0 + m[0, 1] * sy0
    m[1, 2] += m[1, 0] * sx0 + m[1, 1] * sy0
    src = gray[sy0:sy1, sx0:sx1].astype(np.float32)
    # float warp + floor reproduces skimage's float result cast with astype(uint8) (truncation).
    out = cv2.warpAffine(
        src, m, (CROP_SIZE, CROP_SIZE), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0
    )
    roi = np.clip(np.floor(out + 1e-3), 0, 255).astype(np.uint8)
    return roi, clamped


class RoiCropper:
    """Streaming official crop: push (gray frame, landmarks) in order, receive ROIs as windows fill.

    Frame i is cropped once frames i..i+11 have arrived; ``flush`` crops the last (up to 11) frames with
    the transform of the last full window, or, for a clip shorter than 12 frames, of all its frames.
    """

    def __init__(self, window: int = WINDOW) -> None:
        self.window = window
        self._frames: deque[np.ndarray] = deque()
        self._landmarks: deque[np.ndarray] = deque()
        self._last: np.ndarray | None = None
        self._stable_dst = mean_face()[list(STABLE_POINTS)]
        self.clamped = 0

    def _transform(self) -> np.ndarray:
        smoothed = np.mean(np.stack(self._landmarks), axis=0)
        return similarity_transform(smoothed[list(STABLE_POINTS)], self._stable_dst)

    def _emit(self, transform: np.ndarray) -> np.ndarray:
        roi, clamped = crop_from_transform(self._frames.popleft(), transform, self._landmarks.popleft())
        self.clamped += int(clamped)
        return roi

    def push(self, gray: np.ndarray, landmarks: np.ndarray) -> list[np.ndarray]:
        """Add one frame; return the ROIs that became computable (zero or one)."""
        self._frames.append(gray)
        self._landmarks.append(np.asarray(landmarks, dtype=np.float64))
        if len(self._frames) < self.window:
            return []
        self._last = self._transform()
        return [self._emit(self._last)]

    def flush(self) -> list[np.ndarray]:
        """Crop every frame still buffered (end of the clip)."""
        if not self._frames:
            return []
        transform = self._last if self._last is not None else self._transform()
        out = []
        while self._frames:
            out.append(self._emit(transform))
        return out


def to_gray(frame: np.ndarray) -> np.ndarray:
    """BGR / BGRA (or already grey) uint8 frame → grey uint8, as ``cv2.COLOR_BGR2GRAY``."""
    if frame.ndim == 2:
        return frame
    if frame.shape[2] == 1:
        return frame[:, :, 0]
    if frame.shape[2] == 4:
        return cv2.cvtColor(frame, cv2.COLOR_BGRA2GRAY)
    return cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY)


def iter_crops(frames: Iterable[np.ndarray], landmarks: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
    """Stream official crops for (frame, interpolated landmarks) pairs."""
    cropper = RoiCropper()
    for frame, lm in zip(frames, landmarks, strict=True):
        yield from cropper.push(to_gray(frame), lm)
    yield from cropper.flush()
