"""Public entry points: talking-face frames → official AV-HuBERT mouth ROIs (uint8 [T,96,96])."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from cpu_worker.align import CROP_SIZE, iter_crops


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
