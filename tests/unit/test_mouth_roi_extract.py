"""Detection + tracking + crop (``extract_mouth_rois``) vs the official reference, and the messy cases."""

from __future__ import annotations

import subprocess
import sys
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest

from cpu_worker.errors import NoFaceDetected, NoFrames
from cpu_worker.landmarks import TrackerConfig
from cpu_worker.mouth_roi import MAX_LEAD_BYTES, MouthRoiResult, _blocks, extract_mouth_rois, stitch_results
from tasks.errors import JobError

ROOT = Path(__file__).resolve().parents[2]

PRE = ROOT / "tests/fixtures/avhubert_reference/preprocess"




@pytest.fixture(scope="module")
def result(frames: np.ndarray) -> MouthRoiResult:
    return extract_mouth_rois(frames, fps=25.0)


@pytest.fixture(scope="module")
def pingpong(frames: np.ndarray) -> np.ndarray:
    return np.concatenate([frames, frames[-2:0:-1]] * 2)[:150]


def test_shapes_and_types(result: MouthRoiResult) -> None:
    assert result.rois.shape == (50, 96, 96) and result.rois.dtype == np.uint8
    assert result.landmarks.shape == (50, 68, 2) and result.landmarks.dtype == np.float32
    assert result.detected.shape == (50,) and result.detected.dtype == bool
    for key in (
        "frames_total",
        "frames_detected",
        "frames_interpolated",
        "detector_calls",
        "corrupt_skipped",
    ):
        assert key in result.stats
    assert result.stats["frames_total"] == 50 and result.stats["fps"] > 0


def test_detection_flags_match_official(result: MouthRoiResult, ref: dict[str, np.ndarray]) -> None:
    np.testing.assert_array_equal(result.detected, ref["detected"])
    assert result.stats["frames_detected"] == 47 and result.stats["frames_interpolated"] == 3
    assert result.breaks == []


def test_landmarks_close_to_official(result: MouthRoiResult, ref: dict[str, np.ndarray]) -> None:
    det = ref["detected"]
    err = np.abs(result.landmarks[det] - ref["landmarks_raw"][det]).mean()
    assert err < 1.0, err  # brief allows 2 px; measured ~0.3 px
    err_all = np.abs(result.landmarks - ref["landmarks_interpolated"]).mean()
    assert err_all < 1.0, err_all


def test_rois_close_to_official(result: MouthRoiResult, ref: dict[str, np.ndarray]) -> None:
    mae = np.abs(result.rois.astype(np.int16) - ref["roi_gray"]).mean()
    assert mae < 3.0, mae  # measured ~1.8 grey levels with our own landmarks


def test_iterable_input_and_worker_count_give_identical_result(frames: np.ndarray, result: MouthRoiResult) -> None:
    other = extract_mouth_rois(iter(list(frames)), workers=1)
    np.testing.assert_array_equal(other.rois, result.rois)
    np.testing.assert_array_equal(other.landmarks, result.landmarks)


def test_chunks_stitch_to_whole(pingpong: np.ndarray) -> None:
    whole = extract_mouth_rois(pingpong)
    first = extract_mouth_rois(pingpong[:90])
    second = extract_mouth_rois(pingpong[50:], start_frame=50)
    assert second.start_frame == 50
    stitched = stitch_results([second, first])
    assert len(stitched) == len(whole) == 150
    np.testing.assert_array_equal(stitched.detected, whole.detected)
    mae = np.abs(stitched.rois.astype(np.int16) - whole.rois).mean()
    assert mae < 0.5, mae  # identical in practice: detection schedule is anchored to absolute indices
    np.testing.assert_array_equal(stitched.rois, whole.rois)
    with pytest.raises(ValueError, match="overlap"):
        stitch_results([extract_mouth_rois(pingpong[:60]), second])


def test_three_chunks_at_arbitrary_offsets(pingpong: np.ndarray) -> None:
    whole = extract_mouth_rois(pingpong)
    spans = [(0, 70), (31, 110), (67, 150)]
    parts = [extract_mouth_rois(pingpong[s:e], start_frame=s) for s, e in spans]
    stitched = stitch_results(parts)
    np.testing.assert_array_equal(stitched.rois, whole.rois)
    np.testing.assert_array_equal(stitched.landmarks, whole.landmarks)
    assert stitched.stats["chunks"] == 3 and stitched.stats["frames_total"] == 150
    assert parts[1].detected[0]  # a chunk starting between two key frames still checks its first frame


def test_video_file_source_streams_into_extract(result: MouthRoiResult) -> None:
    from cpu_worker.frames import VideoFile

    res = extract_mouth_rois(VideoFile(PRE / "face_clip_640x480_ffv1.mkv"))
    np.testing.assert_array_equal(res.rois, result.rois)
    assert res.stats["corrupt_skipped"] == 0


def test_no_face_raises_with_code(frames: np.ndarray) -> None:
    blank = np.repeat(frames[:1], 4, axis=0)  # frame 0 has no face
    with pytest.raises(NoFaceDetected) as info:
        extract_mouth_rois(blank, config=TrackerConfig(use_cnn=False))
    assert info.value.code == "no_face_detected" and isinstance(info.value, JobError)
    with pytest.raises(NoFrames) as info2:
        extract_mouth_rois(np.zeros((0, 48, 64, 3), np.uint8))
    assert info2.value.code == "no_frames"


@pytest.mark.parametrize("shape", [(40, 2000), (2000, 40), (32, 4000), (4000, 32), (32, 200_000), (200_000, 33)])
def test_sliver_frames_find_no_face_instead_of_crashing_dlibs_cnn(shape: tuple[int, int]) -> None:
    """Frames of legal size (each side >= AVSR_MIN_FRAME_SIDE, under AVSR_MAX_FRAME_PIXELS) whose detector
    inputs, shrunk to `detect_max_side` or `cnn_max_side`, are a few pixels across: dlib's CNN raised on
    those, and aborted the process on some; and where a side shrinks below one pixel OpenCV's resize raised."""
    noise = np.random.default_rng(0).integers(0, 255, (6, *shape, 3), dtype=np.uint8)
    with pytest.raises(NoFaceDetected):
        extract_mouth_rois(noise)


def test_cnn_is_never_given_an_image_it_cannot_scan() -> None:
    """dlib's CNN on 3x320 corrupts the heap (`double free`, SIGABRT): run where that cannot take pytest."""
    code = ("import numpy as np\nfrom cpu_worker.landmarks import cnn_detect\n"
            "print([len(cnn_detect(np.zeros(s, np.uint8))) for s in [(3, 320), (320, 3), (8, 8), (12, 5), (31, 320)]])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert (done.returncode, done.stdout.strip()) == (0, "[0, 0, 0, 0, 0]"), done.stderr[-2000:]


def test_big_frames_are_kept_grey_and_a_faceless_lead_within_its_budget() -> None:
    """A 4096x2304 clip without a face (the largest frame allowed): the colour frames are not buffered
    (blocks hold grey) and the leading gap keeps MAX_LEAD_BYTES of frames, not 250. Before, 100 such
    frames peaked at 3.3 GB of numpy arrays (tracemalloc), now 1.5 GB (real RSS of a 200-frame H.264
    file of that size: 5.1 against 2.0 GB)."""
    blank = np.zeros((2304, 4096, 3), np.uint8)

    def frames() -> Iterator[np.ndarray]:
        for _ in range(100):
            yield blank.copy()  # a decoder's fresh frame each time

    first, block = next(_blocks(frames(), 0, 24))
    assert (first, len(block), block[0].shape) == (0, 24, (2304, 4096))
    tracemalloc.start()
    try:
        with pytest.raises(NoFaceDetected):
            extract_mouth_rois(frames(), config=TrackerConfig(use_cnn=False))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    frame_grey = 2304 * 4096
    assert MAX_LEAD_BYTES // frame_grey == 54
    assert peak < 2.2e9, f"{peak / 1e9:.2f} GB"


def test_long_gap_is_reported_as_break(frames: np.ndarray) -> None:
    clip = np.concatenate([frames[1:20], np.repeat(frames[:1], 30, axis=0), frames[22:40]])
    res = extract_mouth_rois(clip, max_gap_s=1.0, config=TrackerConfig(use_cnn=False))
    assert res.breaks == [(19, 49)]
    assert not res.detected[19:49].any() and res.detected[:19].all()
    assert res.stats["frames_in_breaks"] == 30
    short = extract_mouth_rois(clip, max_gap_s=2.0, config=TrackerConfig(use_cnn=False))
    assert short.breaks == []


def test_follows_one_speaker_among_several(frames: np.ndarray) -> None:
    # the speaker (central) plus a second, static face pasted at the right edge of every frame
    clip = frames[1:30].copy()
    clip = clip[np.r_[0:19, 21:29]]  # skip the source's face-less frames 20 and 21
    clip[:, 270:470, 450:640] = frames[10][140:340, 200:390]
    res = extract_mouth_rois(clip)
    assert res.stats["faces_seen"] == 2
    assert res.detected.all()
    centre_x = res.landmarks[:, 48:68, 0].mean(axis=1)
    assert (centre_x < 420).all(), centre_x  # stays on the central face across blocks


def test_keeps_the_same_speaker_when_another_face_becomes_more_central(frames: np.ndarray) -> None:
    # two copies of the face drift right-to-left: the left one starts more central, the right one ends so
    face = frames[10][140:340, 200:390]
    n = 60
    clip = np.empty((n, 480, 640, 3), np.uint8)
    clip[:] = frames[0]  # face-less background
    for i in range(n):
        lx, rx = round(150 - 130 * i / (n - 1)), round(400 - 100 * i / (n - 1))
        clip[i, 140:340, lx : lx + 190] = face
        clip[i, 140:340, rx : rx + 190] = face
    res = extract_mouth_rois(clip)
    assert res.stats["faces_seen"] == 2 and res.detected.all()
    mouth_x = res.landmarks[:, 48:68, 0].mean(axis=1)
    assert (mouth_x < 300).all(), mouth_x  # followed the left face although the right one ends up central


def test_tiny_face_found_by_finer_scales(frames: np.ndarray) -> None:
    canvas = np.full((19, 480, 640, 3), 90, np.uint8)
    for i in range(19):  # faces of ~50 px: invisible to the fast pass, found once the search escalates
        canvas[i, 150:330, 200:440] = cv2.resize(frames[1 + i], (240, 180), interpolation=cv2.INTER_AREA)
    res = extract_mouth_rois(canvas, config=TrackerConfig(use_cnn=False))
    # escalation to finer scales at frame 6 (after 6 missed frames), frame 5 checked next to it, then tracked
    assert res.detected[5:].all() and res.detected.sum() == 14
    assert res.stats["detector_calls_by_kind"]["finer"] > 0


def test_cnn_fallback_when_hog_finds_nothing(frames: np.ndarray) -> None:
    gray = cv2.cvtColor(frames[10], cv2.COLOR_BGR2GRAY)
    rotated = cv2.warpAffine(gray, cv2.getRotationMatrix2D((320, 240), 45, 1.0), (640, 480))
    clip = np.repeat(cv2.cvtColor(rotated, cv2.COLOR_GRAY2BGR)[None], 3, axis=0)
    cfg = TrackerConfig(cnn_phase=2, escalate_every=100)
    res = extract_mouth_rois(clip, config=cfg)
    assert res.stats["detector_calls_by_kind"]["cnn"] == 1
    assert res.detected.tolist() == [False, False, True]
    with pytest.raises(NoFaceDetected):
        extract_mouth_rois(clip, config=TrackerConfig(cnn_phase=2, escalate_every=100, use_cnn=False))
    # too short for the CNN schedule: the last-resort pass finds the face on its first try
    short = extract_mouth_rois(clip[:2])
    assert short.detected.tolist() == [True, False]
    assert short.stats["detector_calls_by_kind"]["cnn"] == 1
    np.testing.assert_array_equal(short.landmarks[1], short.landmarks[0])


def test_other_frame_rate_is_resampled(frames: np.ndarray) -> None:
    res = extract_mouth_rois(frames[1:21], fps=50.0)  # 20 frames at 50 fps = 0.4 s = 10 frames at 25 fps
    assert len(res) == 10


def test_result_round_trips_through_arrays(result: MouthRoiResult, tmp_path: Path) -> None:
    np.savez(tmp_path / "r.npz", **result.to_arrays())
    back = MouthRoiResult.from_arrays(np.load(tmp_path / "r.npz"))
    np.testing.assert_array_equal(back.rois, result.rois)
    np.testing.assert_array_equal(back.landmarks, result.landmarks)
    np.testing.assert_array_equal(back.detected, result.detected)
    assert back.breaks == result.breaks and back.start_frame == result.start_frame
    assert back.stats["frames_detected"] == result.stats["frames_detected"]


def test_chunk_without_face_when_not_required(frames: np.ndarray) -> None:
    blank = np.repeat(frames[:1], 30, axis=0)
    res = extract_mouth_rois(blank, start_frame=48, require_face=False, config=TrackerConfig(use_cnn=False))
    assert len(res) == 30 and not res.detected.any() and res.start_frame == 48
    assert res.rois.shape == (30, 96, 96) and not res.rois.any() and np.isnan(res.landmarks).all()
    assert res.breaks == [(0, 30)]
