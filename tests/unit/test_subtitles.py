"""Result rendering: SRT and WebVTT from segments, JSON passthrough."""

from __future__ import annotations

import html
import json
from datetime import timedelta
from pathlib import Path

import pytest
import srt
import webvtt

from tasks.subtitles import (
    LINE_CHARS,
    render_result,
    segments_to_cues,
    segments_to_srt,
    segments_to_vtt,
    wrap_lines,
)

ROOT = Path(__file__).resolve().parents[2]

LONG = (
    "so the main point of this talk is that lip reading works surprisingly well once the model "
    "has seen enough hours of video from many different speakers"
)
SEGMENTS = [
    {"id": 0, "start": 0.0, "end": 2.5, "text": "hello everyone", "confidence": 0.93},
    {"id": 1, "start": 2.5, "end": 3.0, "text": "   ", "confidence": 0.10},
    {"id": 2, "start": 3723.456, "end": 3725.0, "text": "naïve café — 日本語 & <ok> -->", "confidence": 0.5},
    {"id": 3, "start": 10.0, "end": 22.0, "text": LONG, "confidence": 0.7},
]


def parsed_srt(text: str) -> list[srt.Subtitle]:
    return list(srt.parse(text))


def test_srt_round_trip_times_and_text() -> None:
    subs = parsed_srt(segments_to_srt(SEGMENTS))
    assert [s.index for s in subs] == list(range(1, len(subs) + 1))
    assert subs[0].start == timedelta(0) and subs[0].end == timedelta(seconds=2.5)
    assert subs[0].content == "hello everyone"
    last = subs[-1]
    assert last.start == timedelta(hours=1, minutes=2, seconds=3, milliseconds=456)
    assert last.content == "naïve café — 日本語 & <ok> -->"
    assert "01:02:03,456 --> 01:02:05,000" in segments_to_srt(SEGMENTS)
    assert all(s.content.strip() for s in subs)  # the blank segment is skipped


def test_vtt_round_trip_times_and_text() -> None:
    body = segments_to_vtt(SEGMENTS)
    assert body.startswith("WEBVTT")
    caps = list(webvtt.from_string(body, strict=True))
    assert caps[0].identifier == "0" and caps[0].start == "00:00:00.000" and caps[0].end == "00:00:02.500"
    assert caps[-1].start == "01:02:03.456" and caps[-1].end == "01:02:05.000"
    assert html.unescape(caps[-1].text) == "naïve café — 日本語 & <ok> -->"
    assert "<ok>" not in body and "-->" not in caps[-1].raw_text  # escaped, the cue is not broken
    assert [c.identifier for c in caps] == ["0", "3.1", "3.2", "2"]


def test_long_text_is_wrapped_and_split_over_cues_in_time() -> None:
    subs = parsed_srt(segments_to_srt(SEGMENTS))
    long_cues = [s for s in subs if timedelta(seconds=10) <= s.start < timedelta(seconds=22)]
    assert len(long_cues) == 2
    assert long_cues[0].start == timedelta(seconds=10) and long_cues[-1].end == timedelta(seconds=22)
    assert long_cues[0].end == long_cues[1].start  # contiguous, time shared by characters
    for cue in long_cues:
        lines = cue.content.split("\n")
        assert 1 <= len(lines) <= 2 and all(len(line) <= LINE_CHARS for line in lines)
    assert " ".join(c.content.replace("\n", " ") for c in long_cues) == LONG


def test_wrap_lines_balanced_and_unbreakable_words() -> None:
    assert wrap_lines("short") == [["short"]]
    assert wrap_lines("  \n ") == []
    two = wrap_lines("the quick brown fox jumps over the lazy dog again")
    assert len(two) == 1 and len(two[0]) == 2 and abs(len(two[0][0]) - len(two[0][1])) <= 8
    huge = wrap_lines("x" * 100)
    assert all(len(line) <= LINE_CHARS for group in huge for line in group)


def test_timestamps_exact_at_millisecond_rounding() -> None:
    segs = [{"id": 0, "start": 0.0405, "end": 59.9999, "text": "a", "confidence": 1.0}]
    assert "00:00:00,041 --> 00:01:00,000" in segments_to_srt(segs)  # half up, not to even
    assert "00:00:00.041 --> 00:01:00.000" in segments_to_vtt(segs)
    frames = [{"id": 0, "start": 93093 / 25, "end": 93118 / 25, "text": "b", "confidence": 1.0}]
    assert "01:02:03,720 --> 01:02:04,720" in segments_to_srt(frames)
    assert "01:02:03.720 --> 01:02:04.720" in segments_to_vtt(frames)


def test_empty_and_invalid() -> None:
    assert segments_to_srt([]) == ""
    assert list(webvtt.from_string(segments_to_vtt([]))) == []
    with pytest.raises(ValueError):
        segments_to_srt([{"id": 0, "start": 2.0, "end": 1.0, "text": "x", "confidence": 1}])
    with pytest.raises(ValueError):
        segments_to_vtt([{"id": 0, "start": float("nan"), "end": 1.0, "text": "x", "confidence": 1}])


def test_render_result_formats() -> None:
    result = {"job_id": "j1", "text": "hello everyone", "segments": SEGMENTS}
    body, mime = render_result(result, "json")
    assert mime == "application/json" and json.loads(body) == result and "日本語" in body
    body, mime = render_result(result, "SRT")
    assert mime == "application/x-subrip" and body == segments_to_srt(SEGMENTS)
    body, mime = render_result(result, "vtt")
    assert mime == "text/vtt" and body == segments_to_vtt(SEGMENTS)
    assert render_result({"text": ""}, "srt") == ("", "application/x-subrip")
    with pytest.raises(ValueError):
        render_result(result, "txt")


def test_files_read_back_with_webvtt(tmp_path: Path) -> None:
    (tmp_path / "r.vtt").write_text(segments_to_vtt(SEGMENTS), encoding="utf-8")
    (tmp_path / "r.srt").write_text(segments_to_srt(SEGMENTS), encoding="utf-8")
    from_vtt = webvtt.read(str(tmp_path / "r.vtt"))
    from_srt = webvtt.from_srt(str(tmp_path / "r.srt"))
    assert [(c.start, c.end) for c in from_vtt] == [(c.start, c.end) for c in from_srt]
    assert [html.unescape(c.text) for c in from_vtt] == [c.raw_text for c in from_srt]  # SRT has no escapes


def test_mimetypes_make_single_charset_flask_headers() -> None:
    flask = pytest.importorskip("flask")
    for fmt in ("json", "srt", "vtt"):
        _, mime = render_result({"segments": SEGMENTS}, fmt)
        header = flask.Response("x", mimetype=mime).headers["Content-Type"]
        assert header.count("charset") <= 1, header


def test_line_width_and_count_are_configurable():
    segments = [{"id": 0, "start": 0.0, "end": 6.0, "text": "one two three four five six seven eight nine ten"}]
    cues = segments_to_cues(segments, width=12, max_lines=1)
    assert all(len(c.lines) == 1 and len(c.lines[0]) <= 12 for c in cues) and len(cues) >= 4
    assert " ".join(line for c in cues for line in c.lines) == segments[0]["text"]
    assert cues[0].start_ms == 0 and cues[-1].end_ms == 6000
    three = segments_to_cues(segments, width=20, max_lines=3)
    assert len(three) == 1 and len(three[0].lines) == 3


TWO_FACES = [
    {"id": 0, "start": 0.0, "end": 2.0, "text": "hello <you> & me", "confidence": 0.9, "track": 1},
    {"id": 1, "start": 1.0, "end": 9.0, "text": LONG, "confidence": 0.8, "track": 2},
]


def test_one_track_or_none_is_unlabelled_byte_for_byte() -> None:
    one = [{**s, "track": 3} for s in SEGMENTS]
    assert segments_to_srt(one) == segments_to_srt(SEGMENTS)
    assert segments_to_vtt(one) == segments_to_vtt(SEGMENTS)
    assert segments_to_srt(one, 12, 1) == segments_to_srt(SEGMENTS, 12, 1)


def test_several_tracks_label_every_vtt_cue_with_a_voice() -> None:
    body = segments_to_vtt(TWO_FACES)
    caps = list(webvtt.from_string(body, strict=True))
    assert len(caps) > 2  # the long text is spread over several cues, each labelled
    assert [c.voice for c in caps] == ["track-1"] + ["track-2"] * (len(caps) - 1)
    assert caps[0].raw_text == "<v track-1>hello &lt;you&gt; &amp; me"  # the text escaped, the span not
    assert all(c.raw_text.startswith(f"<v {c.voice}>") and c.raw_text.count("<v ") == 1 for c in caps)
    assert " ".join(html.unescape(c.text).replace("\n", " ") for c in caps[1:]) == LONG


def test_several_tracks_prefix_every_srt_cue() -> None:
    subs = parsed_srt(segments_to_srt(TWO_FACES))
    assert subs[0].content == "[track-1] hello <you> & me"
    assert all(s.content.startswith("[track-2] ") for s in subs[1:])
    # the label is not counted in the line width: the text after it is wrapped as without tracks
    unlabelled = parsed_srt(segments_to_srt([{k: v for k, v in s.items() if k != "track"} for s in TWO_FACES]))
    assert [s.content for s in subs] == [f"[track-{1 if i == 0 else 2}] {u.content}" for i, u in enumerate(unlabelled)]
    narrow = segments_to_cues(TWO_FACES, width=12, max_lines=1)
    assert all(len(c.lines) == 1 and len(c.lines[0]) <= 12 and c.voice for c in narrow)


def test_a_segment_without_a_track_among_tracks_is_unlabelled() -> None:
    mixed = [*TWO_FACES, {"id": 2, "start": 20.0, "end": 21.0, "text": "who", "confidence": 0.5}]
    assert parsed_srt(segments_to_srt(mixed))[-1].content == "who"
    assert segments_to_cues(mixed)[-1].voice is None
