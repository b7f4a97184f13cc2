"""The tracking window's few-level HOG detector (`landmarks.window_detector`) finds the boxes the full
pyramid finds on the windows the tracker feeds it, and costs less (fewer pyramid levels scanned)."""

from __future__ import annotations

import dlib
import numpy as np
import pytest

import cpu_worker.landmarks as landmarks
from cpu_worker.landmarks import TrackerConfig, track_block, window_detector


def _boxes(detector: dlib.fhog_object_detector, img: np.ndarray) -> list[tuple[int, int, int, int]]:
    return [(r.left(), r.top(), r.right(), r.bottom()) for r in detector(img, 0)]


def test_few_levels_find_the_full_pyramids_boxes_on_tracking_windows(frames: np.ndarray,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    windows: list[np.ndarray] = []
    hog = landmarks.FaceTracker._hog

    def record(self: landmarks.FaceTracker, img: np.ndarray, upsample: int, kind: str) -> list[dlib.rectangle]:
        if kind == "roi":
            windows.append(img.copy())
        return hog(self, img, upsample, kind)

    monkeypatch.setattr(landmarks.FaceTracker, "_hog", record)
    clip = np.concatenate([frames, frames[-2:0:-1]])
    track_block(list(clip), 0)
    assert len(windows) > 30
    full, few = dlib.get_frontal_face_detector(), window_detector(TrackerConfig().roi_hog_levels)
    found = 0
    for img in windows:
        expected = _boxes(full, img)
        assert _boxes(few, img) == expected
        found += bool(expected)
    assert found > 0.9 * len(windows)
    # the levels are really cut: the whole frame's 150-px face needs level 4 (boxes 72 x 1.2^k px)
    gray = np.ascontiguousarray(frames[5][:, :, 1])
    assert [b[2] - b[0] for b in _boxes(full, gray)] == [149] and _boxes(few, gray) == []


@pytest.mark.parametrize("levels", [0, 128, 10_000])
def test_levels_that_cannot_be_written_keep_the_full_detector(frames: np.ndarray, levels: int) -> None:
    gray = np.ascontiguousarray(frames[5][:, :, 1])
    assert _boxes(window_detector(levels), gray) == _boxes(dlib.get_frontal_face_detector(), gray)
