"""Several faces through the real stack (API, Celery workers, S3): a generated two-person clip — two
talking faces side by side, each on its own schedule, the voice being the left one's — read with each
`speaker` mode; the clip spans two preprocessing chunks, so face tracks are joined across them."""

from __future__ import annotations

from pathlib import Path

import pytest

from tasks.settings import get_settings

from .conftest import CHECKPOINT, INPUT_BUCKET

pytestmark = pytest.mark.integration

KEY = "faces/two.mp4"


@pytest.fixture(scope="module")
def two_faces(s3, tmp_path_factory) -> Path:
    from deploy.local.sample_media import write_face_video

    path: Path = tmp_path_factory.mktemp("faces") / "two.mp4"
    write_face_video(path, seconds=6.0, with_audio=True, seed=5, grid=(2, 1))
    s3.upload_file(str(path), INPUT_BUCKET, KEY)
    return path


def _job(api, speaker) -> dict:
    job = api.wait(api.submit({"s3_bucket": INPUT_BUCKET, "s3_key": KEY, "beam_size": 1, "speaker": speaker}))
    assert job["status"] == "succeeded", job
    return job


def _run(api, speaker) -> dict:
    return _job(api, speaker)["result"]


def _ids(result: dict) -> dict[str, int]:
    """Track id by side of the frame (from `quality.tracks`' boxes)."""
    sides = {}
    for track in result["quality"]["tracks"]:
        centres = [(b[1] + b[3]) / 2 for b in track["boxes"]]
        sides["left" if sum(centres) / len(centres) < 320 else "right"] = track["id"]
    return sides


def test_default_lists_both_tracks_and_names_the_track_of_every_segment(api, two_faces):
    result = _run(api, "largest")
    assert sorted(_ids(result)) == ["left", "right"]
    assert result["quality"]["speaker"] == "largest"
    assert result["segments"] and all(s["track"] in (1, 2) for s in result["segments"])
    assert [t["track"] for t in result["transcripts"]] == sorted({s["track"] for s in result["segments"]})


def test_speaking_reads_the_face_that_matches_the_voice(api, two_faces):
    result = _run(api, "speaking")
    assert result["quality"]["speaker"] == "speaking"
    assert result["segments"]
    assert {s["track"] for s in result["segments"]} == {_ids(result)["left"]}


def test_a_hint_reads_the_face_clicked(api, two_faces):
    default = _run(api, "largest")
    right = next(t for t in default["quality"]["tracks"] if t["id"] == _ids(default)["right"])
    t, x0, y0, x1, y1 = right["boxes"][2]
    result = _run(api, {"t": t, "x": (x0 + x1) / 2, "y": (y0 + y1) / 2})
    assert result["quality"]["speaker"] == "hint"
    assert {s["track"] for s in result["segments"]} == {right["id"]}


def test_a_hint_on_no_face_fails_the_job_with_speaker_not_found(api, two_faces):
    job = api.wait(api.submit({"s3_bucket": INPUT_BUCKET, "s3_key": KEY, "speaker": {"t": 1.0, "x": 320, "y": 2}}))
    assert job["status"] == "failed"
    assert job["error"]["code"] == "speaker_not_found"


def test_all_gives_a_transcript_per_face_and_labelled_subtitles(api, two_faces):
    job = _job(api, "all")
    result = job["result"]
    assert result["modality"] == "video"
    assert [t["track"] for t in result["transcripts"]] == [1, 2]
    assert {s["track"] for s in result["segments"]} == {1, 2}
    starts = [(s["start"], s["track"]) for s in result["segments"]]
    assert starts == sorted(starts)
    vtt = api.request("GET", f"/v1/jobs/{job['job_id']}/result?format=vtt").text
    cues = vtt.split("\n\n")[1:]  # after the header; a long segment gives several cues
    spoken = {s["track"] for s in result["segments"] if s["text"]}
    assert cues and all(cue.split("\n")[2].startswith("<v track-") for cue in cues)
    assert {int(cue.split("\n")[2].split(">")[0].removeprefix("<v track-")) for cue in cues} == spoken


@pytest.mark.parametrize("speaker", ["speaking", "all"])
def test_avsr_transcribe_reads_the_same_faces_as_the_service(api, two_faces, speaker, monkeypatch):
    from avsr_client.local import transcribe

    for name, value in {"AVSR_CHUNK_FRAMES": "100", "AVSR_MAX_SEGMENT_S": "4"}.items():  # the stack's
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    try:
        local = transcribe(two_faces, model=CHECKPOINT, beam_size=1, device="cpu", speaker=speaker)
    finally:
        get_settings.cache_clear()
    remote = _run(api, speaker)
    keys = ("id", "start", "end", "track", "text")
    assert [{k: s[k] for k in keys} for s in local["segments"]] == [{k: s[k] for k in keys} for s in remote["segments"]]
    assert local["transcripts"] == remote["transcripts"]
