"""The few-level HOG detectors (`landmarks.few_level_detector`) of the tracking window and of the finer
whole-frame pass find the boxes the full pyramid finds on the images the tracker feeds them."""

from __future__ import annotations

from pathlib import Path

import dlib
import numpy as np
import pytest

import cpu_worker.landmarks as landmarks
from cpu_worker.align import to_gray
from cpu_worker.frames import VideoFile
from cpu_worker.landmarks import TrackerConfig, few_level_detector, track_block
from deploy.local.sample_media import write_face_video


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
    full, few = dlib.get_frontal_face_detector(), few_level_detector(TrackerConfig().roi_hog_levels)
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
    assert _boxes(few_level_detector(levels), gray) == _boxes(dlib.get_frontal_face_detector(), gray)


def test_the_finer_pass_levels_find_the_small_faces_the_full_pyramid_finds(tmp_path: Path) -> None:
    """The synthetic talk's face (an 80-px box in 640×480) is missed at 320×240 and found by the finer
    pass; its few levels give the full pyramid's boxes."""
    path = tmp_path / "talk.mp4"
    write_face_video(path, 1.0, with_audio=False, seed=1)
    full, few = dlib.get_frontal_face_detector(), few_level_detector(TrackerConfig().finer_hog_levels)
    found = 0
    for frame in list(VideoFile(path))[::3]:
        gray = np.ascontiguousarray(to_gray(frame))
        half = np.ascontiguousarray(gray[::2, ::2])
        assert _boxes(full, half) == []
        expected = _boxes(full, gray)
        assert _boxes(few, gray) == expected
        found += len(expected)
    assert found >= 8
