"""The typed records handed from one stage to the next (plain JSON for Celery and Redis).

    JobRequest     api/ validation → the job record → every stage
    InputPlan      prepare: what the input is and how it is cut into chunks (`input_plan.json` in S3)
    ChunkSummary   preprocess_chunk → assemble
    SegmentPlan    assemble → infer: the clip's segments (the arrays themselves are in S3)
    Transcript     infer → finalize: the segment plan with each segment's decoded text
    JobResult      finalize → the job record, `result.json`, the API

Only keys and these small documents travel through Redis; arrays go by reference (S3 keys).
"""

from __future__ import annotations

from typing import Any, Literal, NotRequired, TypedDict

FPS = 25.0
"""AV-HuBERT's frame rate: every input is mapped onto this grid, and everything after `prepare` is at it."""
SOURCE_FPS_RANGE = (1.0, 120.0)
"""The frame rates a frame-sequence input may be shot at (its `fps`)."""


def seconds(frame: int | float) -> float:
    """The time of a frame index (or a frame count's duration) in a result: seconds, to the millisecond."""
    return round(float(frame) / FPS, 3)

Modality = Literal["auto", "video", "audio", "audiovisual"]
SpeakerMode = Literal["largest", "center", "speaking", "all"]
"""Whom to read when several faces are visible (see `SpeakerHint` for a point on a face)."""


class SpeakerHint(TypedDict):
    """The face under pixel (`x`, `y`) of the source video at `t` seconds (a click on a frame)."""

    t: float
    x: float
    y: float


class FramesInput(TypedDict):
    type: Literal["frames"]
    bucket: str
    prefix: str
    fps: float


class VideoInput(TypedDict):
    type: Literal["video"]
    bucket: str
    key: str


class UrlInput(TypedDict):
    """A video at an http(s) URL, fetched by `prepare` (SSRF guard, size cap, timeout, content type)."""

    type: Literal["url"]
    url: str


class OutputLocation(TypedDict):
    bucket: str
    prefix: str


class JobRequest(TypedDict):
    """A validated submission, as stored with the job."""

    input: FramesInput | VideoInput | UrlInput
    modality: Modality
    beam_size: int
    output: OutputLocation | None
    callback_url: str | None
    speaker: NotRequired[SpeakerMode | SpeakerHint]  # absent: "largest"


class Chunk(TypedDict):
    """Frames `[start, end)` of the 25 fps clip, preprocessed by one task; it owns `[core_start, core_end)`."""

    index: int
    start: int
    end: int
    core_start: int
    core_end: int


class InputPlan(TypedDict):
    """What `prepare` found: the input's objects at 25 fps, its modality and its chunks."""

    type: Literal["frames", "video"]
    bucket: str
    num_frames: int
    modality: Literal["video", "audio", "audiovisual"]
    has_audio: bool
    chunks: list[Chunk]
    keys: NotRequired[list[str]]  # frames: one object per 25 fps frame
    source_frames: NotRequired[int]  # frames: objects found before resampling
    key: NotRequired[str]  # video
    etag: NotRequired[str]  # video: the version every chunk must read
    size: NotRequired[int]  # video


class ChunkSummary(TypedDict):
    index: int
    frames: int
    stats: dict[str, Any]


class SegmentSpan(TypedDict):
    """Frames `[start_frame, end_frame)` of the clip, decoded at once, of face track `track` (1-based id,
    see `FaceTrackInfo`), whose mouth ROIs are stream `stream` of `features.npz` (`rois` is [T,96,96] when
    there is one stream, [S,T,96,96] when several faces are read)."""

    id: int
    start_frame: int
    end_frame: int
    track: NotRequired[int]
    stream: NotRequired[int]


class FaceTrackInfo(TypedDict):
    """One face followed through the clip: frames `[start, end)` seconds, `frames` with the face found, and
    its box `[t, x0, y0, x1, y1]` (seconds, source-video pixels) about once a second."""

    id: int
    start: float
    end: float
    frames: int
    boxes: list[list[float]]


class Quality(TypedDict):
    frames: int
    frames_with_face: int
    face_ratio: float
    face_breaks: list[list[int]]
    corrupt_frames_skipped: int
    tracks: NotRequired[list[FaceTrackInfo]]  # every face track found (at most AVSR_MAX_FACES)
    speaker: NotRequired[str]  # how the track of each segment was chosen


class SegmentPlan(TypedDict):
    """What `assemble` hands to inference: the clip's length, modality, quality and segments."""

    num_frames: int
    modality: Literal["video", "audio", "audiovisual"]
    quality: Quality
    segments: list[SegmentSpan]


class Word(TypedDict):
    """A word of a segment's text: `confidence` = exp(mean log-prob of its `tokens` sentencepiece pieces)."""

    word: str
    confidence: float
    tokens: int


class DecodedSegment(TypedDict):
    """The best hypothesis of one segment: `confidence` = exp(mean token log-prob, `</s>` included), so
    exp((Σ words' tokens·ln confidence + end_logprob) / num_tokens) gives it back."""

    id: int
    text: str
    confidence: float
    score: float
    num_tokens: int
    words: list[Word]
    end_logprob: float  # ln p(</s>)


class PartialSegment(TypedDict):
    """A segment decoded while its job is still running (the job's `partial_segments`)."""

    id: int
    start: float
    end: float
    text: str
    confidence: float
    track: NotRequired[int]


class Transcript(TypedDict):
    """What inference hands to `finalize`: the plan, each segment's text (in plan order), the model."""

    plan: SegmentPlan
    decoded: list[DecodedSegment]
    model: dict[str, Any]
    cancelled: NotRequired[bool]


class ResultSegment(TypedDict):
    id: int
    start: float
    end: float
    text: str
    confidence: float
    words: list[Word]  # no word times: no alignment is computed (see the README)
    track: NotRequired[int]  # the face track read (`quality.tracks`)


class TrackTranscript(TypedDict):
    """The text of one face track (several with speaker "all")."""

    track: int
    text: str
    confidence: float


class JobResult(TypedDict):
    """The public result of a succeeded job."""

    text: str
    confidence: float
    num_frames: int
    duration_s: float
    modality: str
    segments: list[ResultSegment]
    transcripts: NotRequired[list[TrackTranscript]]  # per face track read, in track order
    quality: Quality | dict[str, Any]
    model: dict[str, Any]
    timings: dict[str, float]
