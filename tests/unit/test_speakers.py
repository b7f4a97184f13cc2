"""Whom to read (`cpu_worker/speakers.py`, `stages.plan_clip(speaker=...)`) on a generated two-person clip:
two talking faces side by side, each on its own schedule, the voice being one of them."""

from __future__ import annotations

import numpy as np
import pytest

from cpu_worker import audio as audio_lib
from cpu_worker import speakers
from cpu_worker.mouth_roi import MouthRoiResult, extract_mouth_rois, stitch_results
from cpu_worker.segmentation import plan_chunks
from cpu_worker.stages import build_result, plan_clip
from deploy.local.sample_media import SAMPLE_RATE, GridRenderer, synth_audio
from tasks.errors import JobError

SECONDS, SIZE, HALF = 12.0, (640, 480), 320
N = round(SECONDS * 25)


@pytest.fixture(scope="module")
def scene() -> dict:
    renderer = GridRenderer(SECONDS, SIZE, 25.0, seed=5, grid=(2, 1))
    frames = [renderer.render(i) for i in range(N)]
    clip = extract_mouth_rois(frames, crop_tracks=True)
    energy = []
    for schedule in renderer.schedules:  # the voice of the left face, then of the right one
        wave = synth_audio(schedule, 0, round(SECONDS * SAMPLE_RATE), np.random.default_rng(0))
        energy.append(audio_lib.frame_energy_db(audio_lib.to_int16_16k(wave, SAMPLE_RATE), SAMPLE_RATE))
    return {"frames": frames, "clip": clip, "energy": energy, "schedules": renderer.schedules}


def _side(track: MouthRoiResult) -> str:
    return "left" if np.nanmean(track.landmarks[track.detected][:, :, 0]) < HALF else "right"


def _track_ids(clip: MouthRoiResult) -> dict[str, int]:
    return {_side(t): k + 1 for k, t in enumerate(speakers.face_tracks(clip))}


def test_both_faces_are_tracks_listed_in_quality(scene):
    clip = scene["clip"]
    assert sorted(_track_ids(clip)) == ["left", "right"]
    plan, _ = plan_clip(clip, scene["energy"][0], 0, 15.0, "audiovisual")
    tracks = plan["quality"]["tracks"]
    assert [t["id"] for t in tracks] == [1, 2]
    for info in tracks:
        assert info["frames"] > 0.9 * N and 0 <= info["start"] < info["end"] <= SECONDS
        times = [b[0] for b in info["boxes"]]
        assert times == sorted(times) and len(times) >= SECONDS - 1
        x0, y0, x1, y1 = info["boxes"][0][1:]
        assert 0 <= x0 < x1 <= SIZE[0] and 0 <= y0 < y1 <= SIZE[1]
    assert plan["quality"]["speaker"] == "largest"
    assert all(s["track"] in (1, 2) for s in plan["segments"])


@pytest.mark.parametrize("voice", ["left", "right"])
def test_speaking_reads_the_face_in_sync_with_the_voice_on_every_segment(scene, voice):
    clip = scene["clip"]
    ids = _track_ids(clip)
    energy = scene["energy"][0 if voice == "left" else 1]
    plan, rois = plan_clip(clip, energy, 0, 15.0, "audiovisual", "speaking")
    assert plan["segments"] and plan["quality"]["speaker"] == "speaking"
    assert {s["track"] for s in plan["segments"]} == {ids[voice]}
    chosen = speakers.face_tracks(clip)[ids[voice] - 1]
    for s in plan["segments"]:  # the stream inference reads is that face's mouth
        a, b = s["start_frame"], s["end_frame"]
        np.testing.assert_array_equal(rois[a:b], chosen.rois[a:b])


def test_speaking_without_audio_falls_back_to_the_default(scene):
    plan, rois = plan_clip(scene["clip"], None, 0, 15.0, "video", "speaking")
    assert plan["quality"]["speaker"] == "largest"
    assert rois is scene["clip"].rois


@pytest.mark.parametrize("side", ["left", "right"])
def test_a_hint_on_a_face_reads_that_face(scene, side):
    clip = scene["clip"]
    ids = _track_ids(clip)
    track = speakers.face_tracks(clip)[ids[side] - 1]
    f = int(np.flatnonzero(track.detected)[40])
    x, y = track.landmarks[f].mean(axis=0)
    hint = {"t": f / 25, "x": float(x), "y": float(y)}
    plan, rois = plan_clip(clip, scene["energy"][0], 0, 15.0, "audiovisual", hint)
    assert plan["quality"]["speaker"] == "hint"
    assert {s["track"] for s in plan["segments"]} == {ids[side]}
    assert rois is track.rois


def test_a_hint_on_no_face_fails_the_job_with_a_reason(scene):
    with pytest.raises(JobError) as err:
        plan_clip(scene["clip"], None, 0, 15.0, "video", {"t": 2.0, "x": 320.0, "y": 5.0})
    assert err.value.code == "speaker_not_found"


def test_all_reads_each_face_and_its_rois_equal_single_face_extraction_of_its_half(scene):
    clip = scene["clip"]
    ids = _track_ids(clip)
    plan, rois = plan_clip(clip, scene["energy"][0], 0, 15.0, "audiovisual", "all")
    assert plan["modality"] == "video" and rois.shape == (2, N, 96, 96)
    assert [s["id"] for s in plan["segments"]] == list(range(len(plan["segments"])))
    assert [(s["start_frame"], s["track"]) for s in plan["segments"]] == sorted(
        (s["start_frame"], s["track"]) for s in plan["segments"])
    for side, offset in (("left", 0), ("right", HALF)):
        k = ids[side] - 1
        assert {s["stream"] for s in plan["segments"] if s["track"] == k + 1} == {k}
        alone = extract_mouth_rois([np.ascontiguousarray(f[:, offset:offset + HALF]) for f in scene["frames"]])
        track = speakers.face_tracks(clip)[k]
        # The same face in a frame twice as wide: a tracker period's first whole-frame HOG pass runs at another
        # scale, so its box (and the landmarks, smoothed over 12 frames) may differ by a pixel there.
        np.testing.assert_array_equal(track.detected, alone.detected)
        assert np.abs(track.landmarks - (alone.landmarks + np.array([offset, 0]))).mean() < 0.2
        assert np.abs(rois[k].astype(int) - alone.rois).mean() < 1.5
        assert np.corrcoef(rois[k].ravel(), alone.rois.ravel())[0, 1] > 0.99


def test_all_gives_one_transcript_per_track(scene):
    plan, _ = plan_clip(scene["clip"], None, 0, 15.0, "video", "all")
    decoded = [{"id": s["id"], "text": f"t{s['track']}", "confidence": 0.5, "score": -0.7, "num_tokens": 1,
                "words": [], "end_logprob": -0.1} for s in plan["segments"]]
    result = build_result({"plan": plan, "decoded": decoded, "model": {}}, {})
    assert [t["track"] for t in result["transcripts"]] == [1, 2]
    for t in result["transcripts"]:
        n = sum(1 for s in plan["segments"] if s["track"] == t["track"])
        assert t["text"] == " ".join([f"t{t['track']}"] * n) and t["confidence"] == 0.5
    assert [s["track"] for s in result["segments"]] == [s["track"] for s in plan["segments"]]


def test_chunked_tracks_equal_the_one_piece_tracks(scene):
    frames = scene["frames"]
    parts = [extract_mouth_rois(frames[c.start:c.end], start_frame=c.start, crop_tracks=True, require_face=False)
             for c in plan_chunks(N, chunk_frames=120, overlap=25)]
    stitched = stitch_results(parts)
    whole = speakers.face_tracks(scene["clip"])
    assert len(stitched.tracks) == len(whole) == 2
    assert _track_ids(stitched) == _track_ids(scene["clip"])
    for a, b in zip(stitched.tracks, whole, strict=True):
        np.testing.assert_array_equal(a.detected, b.detected)
        np.testing.assert_allclose(a.landmarks, b.landmarks, atol=1e-3)
        np.testing.assert_array_equal(a.rois, b.rois)


def test_tracks_survive_the_chunk_file_round_trip(scene):
    again = MouthRoiResult.from_arrays(scene["clip"].to_arrays())
    assert len(again.tracks) == 2
    for a, b in zip(again.tracks, scene["clip"].tracks, strict=True):
        np.testing.assert_array_equal(a.rois, b.rois)
        np.testing.assert_array_equal(a.landmarks, b.landmarks)
        assert a.breaks == b.breaks


def test_mouth_opening_follows_the_lips():
    lm = np.zeros((2, 68, 2))
    lm[:, 48], lm[:, 54] = (0, 0), (40, 0)
    lm[1, 61:64, 1], lm[1, 65:68, 1] = -4, 4
    np.testing.assert_allclose(speakers.mouth_opening(lm), [0.0, 0.2])


def test_audio_only_reads_no_face_whatever_the_speaker(scene):
    for speaker in ("all", "speaking", {"t": 2.0, "x": 320.0, "y": 5.0}):
        plan, rois = plan_clip(scene["clip"], scene["energy"][0], 0, 15.0, "audio", speaker)
        assert plan["quality"]["speaker"] == "largest" and plan["modality"] == "audio"
        assert rois is scene["clip"].rois


def test_a_span_no_track_follows_gets_no_track(scene):
    clip = scene["clip"]
    assert speakers.default_track(clip, [], 0, N) is None
    stranger = MouthRoiResult(rois=clip.rois, landmarks=clip.landmarks + 200, detected=clip.detected)
    assert speakers.default_track(clip, [stranger], 0, N) is None
    assert speakers.default_track(clip, speakers.face_tracks(clip), 0, N) is not None
