"""Official crop from given landmarks vs the AV-HuBERT reference ROIs."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cpu_worker import align
from cpu_worker.mouth_roi import crop_mouth_rois

ROOT = Path(__file__).resolve().parents[2]

PRE = ROOT / "tests/fixtures/avhubert_reference/preprocess"




def test_frames_decode_exactly(frames: np.ndarray, ref: dict[str, np.ndarray]) -> None:
    import hashlib

    assert frames.shape == (50, 480, 640, 3)
    assert all(hashlib.sha256(f.tobytes()).hexdigest() == h for f, h in zip(frames, ref["frame_sha256"], strict=True))


def test_mean_face_shipped_in_package(ref: dict[str, np.ndarray]) -> None:
    np.testing.assert_array_equal(align.mean_face(), ref["mean_face"])


def test_interpolation_matches_official(ref: dict[str, np.ndarray]) -> None:
    out = align.interpolate_landmarks(ref["landmarks_raw"], ref["detected"])
    np.testing.assert_allclose(out, ref["landmarks_interpolated"], atol=1e-9)


def test_similarity_transform_matches_skimage() -> None:
    from skimage.transform import estimate_transform

    rng = np.random.default_rng(0)
    src = rng.uniform(0, 500, (5, 2))
    dst = src @ np.array([[0.8, -0.3], [0.3, 0.8]]).T + [10, -4] + rng.normal(0, 3, (5, 2))
    ours = align.similarity_transform(src, dst)
    theirs = estimate_transform("similarity", src, dst).params[:2]
    np.testing.assert_allclose(ours, theirs, atol=1e-9)


def test_crop_from_official_landmarks_matches_official_roi(frames: np.ndarray, ref: dict[str, np.ndarray]) -> None:
    rois = crop_mouth_rois(frames, ref["landmarks_interpolated"])
    assert rois.shape == (50, 96, 96) and rois.dtype == np.uint8
    mae = np.abs(rois.astype(np.int16) - ref["roi_gray"]).mean()
    assert mae < 0.5, mae
    # accepts an iterable of grey frames as well
    rois_gray = crop_mouth_rois((f[:, :, 1] for f in frames[:5]), ref["landmarks_interpolated"][:5])
    assert rois_gray.shape == (5, 96, 96)


def test_short_clip_uses_whole_window(frames: np.ndarray, ref: dict[str, np.ndarray]) -> None:
    lm = ref["landmarks_interpolated"][:5]
    rois = crop_mouth_rois(frames[:5], lm)
    t = align.similarity_transform(
        lm.mean(axis=0)[list(align.STABLE_POINTS)], align.mean_face()[list(align.STABLE_POINTS)]
    )
    expect, _ = align.crop_from_transform(align.to_gray(frames[3]), t, lm[3])
    np.testing.assert_array_equal(rois[3], expect)


def test_crop_clamps_at_frame_border(frames: np.ndarray, ref: dict[str, np.ndarray]) -> None:
    lm = ref["landmarks_interpolated"][10].copy()
    t = align.similarity_transform(lm[list(align.STABLE_POINTS)], align.mean_face()[list(align.STABLE_POINTS)])
    moved = lm.copy()
    moved[48:68] += 200.0  # mouth far outside the 256 frame after the warp
    roi, clamped = align.crop_from_transform(align.to_gray(frames[10]), t, moved)
    assert clamped and roi.shape == (96, 96)
