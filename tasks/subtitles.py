"""Job results as JSON, SRT or WebVTT (issue #5: ``GET /v1/jobs/<id>/result?format=json|srt|vtt``).

A result holds ``segments``: ``[{id, start, end, text, confidence}]`` with times in seconds of
the source clip. Segments with empty text are skipped. Text is wrapped at ~42 characters into
at most 2 lines per cue; a longer text is spread over consecutive cues, its time shared in
proportion to the characters. Times are rounded to the millisecond once, so both formats agree.

When the segments carry more than one distinct ``track`` (face track, issue #14), every cue says
whose it is: a WebVTT voice span ``<v track-N>`` and an SRT prefix ``[track-N] `` on its first
line. The label does not count toward the line width (a WebVTT voice name is not displayed; an
SRT first line is that much longer). With one track, or none, the output is as without tracks.

SRT is written with ``srt.compose``. WebVTT is written with webvtt-py 0.6 (``WebVTT.content``
gives the file as a string); webvtt-py does not escape cue text, so ``&``, ``<`` and ``>`` are
escaped here as WebVTT requires.
"""

from __future__ import annotations

import json
import math
import textwrap
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

import srt
import webvtt

LINE_CHARS = 42
MAX_LINES = 2

# Bare mimetypes (bodies are UTF-8): Flask/Werkzeug's ``Response(mimetype=...)`` adds
# ``; charset=utf-8`` to text/* itself, and would repeat one given here.
MIMETYPES = {
    "json": "application/json",
    "srt": "application/x-subrip",
    "vtt": "text/vtt",
}


@dataclass(frozen=True)
class Cue:
    """One subtitle cue: times in milliseconds, 1–2 lines of text, whose (`track-N`, when labelled)."""

    identifier: str
    start_ms: int
    end_ms: int
    lines: tuple[str, ...]
    voice: str | None = None


def _to_ms(seconds: float) -> int:
    """Seconds → milliseconds, half up from the shortest decimal form (0.0405 → 41)."""
    value = float(seconds)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"invalid time {seconds!r}")
    return int((Decimal(repr(value)) * 1000).to_integral_value(rounding=ROUND_HALF_UP))


def wrap_lines(text: str, width: int = LINE_CHARS, max_lines: int = MAX_LINES) -> list[list[str]]:
    """Text → groups of at most ``max_lines`` lines of at most ``width`` characters (long words
    are broken), the lines of a group balanced in length."""
    words = " ".join(text.split())
    if not words:
        return []
    lines = textwrap.wrap(words, width, break_on_hyphens=False)
    groups = [lines[i : i + max_lines] for i in range(0, len(lines), max_lines)]
    return [_balanced(" ".join(group), width, max_lines) for group in groups]


def _balanced(text: str, width: int, max_lines: int) -> list[str]:
    """The narrowest wrap of ``text`` into at most ``max_lines`` lines (≤ ``width`` each)."""
    if len(text) <= width:
        return [text]
    for w in range(math.ceil(len(text) / max_lines), width + 1):
        lines = textwrap.wrap(text, w, break_on_hyphens=False)
        if len(lines) <= max_lines:
            return lines
    return textwrap.wrap(text, width, break_on_hyphens=False)


def segments_to_cues(segments: Iterable[Mapping[str, Any]], width: int = LINE_CHARS,
                     max_lines: int = MAX_LINES) -> list[Cue]:
    """Segments → cues in time order; empty texts skipped, long texts split over several cues; each cue
    labelled with its segment's track when the segments have several."""
    segments = list(segments)
    labelled = len({seg["track"] for seg in segments if "track" in seg}) > 1
    cues: list[Cue] = []
    for seg in sorted(segments, key=lambda s: (_to_ms(s["start"]), _to_ms(s["end"]))):
        start, end = _to_ms(seg["start"]), _to_ms(seg["end"])
        if end < start:
            raise ValueError(f"segment {seg.get('id')!r} ends before it starts")
        groups = wrap_lines(str(seg.get("text") or ""), width, max_lines)
        weights = [sum(len(line) for line in g) for g in groups]
        total, done = sum(weights), 0
        for k, (group, weight) in enumerate(zip(groups, weights, strict=True)):
            a = start + round((end - start) * done / total)
            done += weight
            b = start + round((end - start) * done / total)
            ident = str(seg.get("id", len(cues))) + (f".{k + 1}" if len(groups) > 1 else "")
            voice = f"track-{seg['track']}" if labelled and "track" in seg else None
            cues.append(Cue(ident, a, b, tuple(group), voice))
    return cues


def segments_to_srt(segments: Iterable[Mapping[str, Any]], width: int = LINE_CHARS, max_lines: int = MAX_LINES) -> str:
    """SubRip text of the segments (indices 1..n, ``HH:MM:SS,mmm``)."""
    subs = [
        srt.Subtitle(
            index=i,
            start=timedelta(milliseconds=c.start_ms),
            end=timedelta(milliseconds=c.end_ms),
            content="\n".join(c.lines) if c.voice is None else f"[{c.voice}] " + "\n".join(c.lines),
        )
        for i, c in enumerate(segments_to_cues(segments, width, max_lines), start=1)
    ]
    return srt.compose(subs, reindex=False)


def _vtt_time(ms: int) -> str:
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    seconds, millis = divmod(rest, 1000)
    return f"{hours:02d}:{minutes:02d}:{seconds:02d}.{millis:03d}"


def _vtt_escape(line: str) -> str:
    return line.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _vtt_lines(cue: Cue) -> list[str]:
    lines = [_vtt_escape(line) for line in cue.lines]
    if cue.voice is not None:
        lines[0] = f"<v {cue.voice}>{lines[0]}"
    return lines


def segments_to_vtt(segments: Iterable[Mapping[str, Any]], width: int = LINE_CHARS, max_lines: int = MAX_LINES) -> str:
    """WebVTT text of the segments (cue identifiers are the segment ids)."""
    captions = [
        webvtt.Caption(
            start=_vtt_time(c.start_ms),
            end=_vtt_time(c.end_ms),
            text=_vtt_lines(c),
            identifier=c.identifier,
        )
        for c in segments_to_cues(segments, width, max_lines)
    ]
    return webvtt.WebVTT(captions=captions).content


def render_result(result: Mapping[str, Any], fmt: str, width: int = LINE_CHARS,
                  max_lines: int = MAX_LINES) -> tuple[str, str]:
    """``(body, mimetype)`` of a job result in ``json``, ``srt`` or ``vtt`` (cues of at most
    ``max_lines`` lines of ``width`` characters); ValueError otherwise."""
    fmt = (fmt or "").strip().lower()
    if fmt not in MIMETYPES:
        raise ValueError(f"unknown result format {fmt!r}; expected one of {', '.join(MIMETYPES)}")
    if fmt == "json":
        return json.dumps(result, ensure_ascii=False), MIMETYPES[fmt]
    segments = result.get("segments") or []
    body = (segments_to_srt if fmt == "srt" else segments_to_vtt)(segments, width, max_lines)
    return body, MIMETYPES[fmt]
