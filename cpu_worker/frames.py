"""Frame sources: encoded image sequences and video files → BGR uint8 frames at 25 fps, streamed.

Frames are placed on a constant 25 fps grid from their real timestamps (nearest frame in time), so
variable-frame-rate phone videos and 30/50/60 fps sources come out at the model's rate.  Corrupt
images / packets / frames are skipped and counted (``corrupt_skipped``) rather than aborting the clip,
and so are frames too small to hold a face (``AVSR_MIN_FRAME_SIDE``). Image and video dimensions are
read from their headers before anything is decoded: a frame over ``AVSR_MAX_FRAME_PIXELS`` fails the
job with ``input_too_large`` (a 875 KB PNG can declare 30000×30000 pixels).
"""

from __future__ import annotations

import io
import itertools
import logging
from collections.abc import Generator, Iterable, Iterator, Sized
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, TypeVar

import av
import cv2
import numpy as np
from av.video.reformatter import VideoReformatter
from PIL import Image

from cpu_worker.errors import BadMedia
from tasks.errors import input_too_large
from tasks.records import FPS
from tasks.settings import get_settings

Image.MAX_IMAGE_PIXELS = None  # our own cap (FrameLimits) applies, before decoding, with our error code

log = logging.getLogger(__name__)

AUDIO_RATE = 16000
AUDIO_MARGIN_S = 1.0  # audio decoded past the video's end (`audio_samples`)
PACKETS_PER_FRAME = 16  # video packets a 25 fps frame may take in `num_frames` (sources up to 400 fps)


T = TypeVar("T")


def resample_timed(
    items: Iterable[tuple[float, T]],
    fps: float = FPS,
    *,
    t0: float | None = None,
    end: float | None = None,
    first_slot: int = 0,
    last_slot: int | None = None,
) -> Iterator[T]:
    """Constant-rate resampling of (timestamp seconds, frame) pairs (any item: frames, S3 objects).

    Output slot k (time ``t0 + k/fps``; ``t0`` defaults to the first timestamp) shows the input frame
    nearest in time (ties → the later one); slots before the first frame show the first frame; the last
    frame lasts until ``end`` (default: as long as the interval before it, or 1/fps).  Non-increasing
    timestamps are dropped.  Only slots ``first_slot <= k < last_slot`` are yielded.
    """
    prev_t: float | None = None
    prev: T | None = None
    origin = t0
    k = 0
    last_dt = 1.0 / fps
    for t, frame in items:
        if prev_t is None:
            prev_t, prev = t, frame
            origin = t if origin is None else origin
            continue
        if t <= prev_t:
            continue
        mid = (prev_t + t) / 2.0
        while origin + k / fps < mid - 1e-9:  # type: ignore[operator]
            if last_slot is not None and k >= last_slot:
                return
            if k >= first_slot:
                yield prev  # type: ignore[misc]  # set with prev_t
            k += 1
        last_dt = t - prev_t
        prev_t, prev = t, frame
    if prev_t is None or prev is None or origin is None:
        return
    stop = end if end is not None else prev_t + last_dt  # the last frame lasts its previous interval
    while origin + k / fps < stop - 1e-9:
        if last_slot is not None and k >= last_slot:
            return
        if k >= first_slot:
            yield prev
        k += 1


def count_slots(t0: float, stop: float, fps: float = FPS) -> int:
    """Number of slots ``k >= 0`` with ``t0 + k/fps < stop`` (as ``resample_timed`` emits them)."""
    k = max(0, int((stop - t0) * fps) - 2)
    while t0 + k / fps < stop - 1e-9:
        k += 1
    return k


@dataclass(frozen=True)
class FrameLimits:
    """What a frame may be before it is decoded: at most `max_pixels`, each side at least `min_side`."""

    max_pixels: int = 4096 * 2304
    min_side: int = 32

    @classmethod
    def from_settings(cls) -> FrameLimits:
        settings = get_settings()
        return cls(max_pixels=settings.max_frame_pixels, min_side=settings.min_frame_side)

    def check(self, width: int, height: int, what: str) -> bool:
        """True if a `width`×`height` frame may be decoded; False if too small to hold a face (skip it);
        `input_too_large` if it is over the pixel cap (a decompression bomb must never be decoded)."""
        if width * height > self.max_pixels:
            raise input_too_large(f"{what} is {width}×{height} px, over AVSR_MAX_FRAME_PIXELS={self.max_pixels}")
        return width >= self.min_side and height >= self.min_side


def image_size(data: bytes | bytearray | memoryview) -> tuple[int, int] | None:
    """(width, height) from an encoded image's header, without decoding it; None if unreadable."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.size
    except (OSError, ValueError, Image.DecompressionBombError):
        return None


def decode_image(data: bytes | bytearray | memoryview, limits: FrameLimits | None = None) -> np.ndarray | None:
    """Encoded image (JPEG/PNG/…, any depth/channels) → BGR uint8, EXIF orientation applied; None if corrupt
    or too small to hold a face. Its header is checked against `limits` before anything is decoded.

    ``cv2.IMREAD_COLOR`` converts grey/RGBA/16-bit to 8-bit BGR and honours the EXIF orientation tag.
    """
    buf = np.frombuffer(data, dtype=np.uint8)
    if buf.size == 0:
        return None
    size = image_size(data)
    if size is None or not (limits or FrameLimits()).check(*size, "an image"):
        return None
    try:
        img = cv2.imdecode(buf, cv2.IMREAD_COLOR)
    except cv2.error:
        return None
    if img is None or not img.size or img.dtype != np.uint8:
        return None
    # IMREAD_COLOR still gives one channel for some formats (a grey float PFM): BGR, as every frame
    return cv2.cvtColor(img, cv2.COLOR_GRAY2BGR) if img.ndim == 2 else img


class ImageSequence:
    """Iterable of 25 fps BGR frames from encoded images (bytes or file paths) shot at ``fps``."""

    def __init__(self, images: Iterable[bytes | bytearray | memoryview | str | Path], fps: float = FPS) -> None:
        if fps <= 0:
            raise ValueError("fps must be positive")
        self.images, self.fps = images, fps
        self.limits = FrameLimits.from_settings()
        self.corrupt_skipped = 0  # corrupt images, and images too small to hold a face
        self.frames_decoded = 0

    def _timed(self) -> Generator[tuple[float, np.ndarray]]:
        for i, item in enumerate(self.images):
            data = Path(item).read_bytes() if isinstance(item, str | Path) else item
            img = decode_image(data, self.limits)
            if img is None:
                self.corrupt_skipped += 1
                log.debug("image %d is corrupt, skipped", i)
                continue
            self.frames_decoded += 1
            yield i / self.fps, img

    def __iter__(self) -> Iterator[np.ndarray]:
        # grid anchored at image 0 and ending after the last image, so corrupt images at either end do
        # not shift or shorten the clip (their slots show the nearest good image)
        end = len(self.images) / self.fps if isinstance(self.images, Sized) else None
        return resample_timed(self._timed(), FPS, t0=0.0, end=end)


def _open(source: str | Path | bytes | BinaryIO) -> av.container.InputContainer:
    try:
        if isinstance(source, bytes | bytearray | memoryview):
            return av.open(io.BytesIO(bytes(source)), mode="r")
        return av.open(source if not isinstance(source, Path) else str(source), mode="r")
    except (av.FFmpegError, OSError, ValueError) as exc:
        # FFmpeg's reason without the file name it adds (a path on the worker, not the customer's)
        reason = getattr(exc, "strerror", None) or type(exc).__name__
        raise BadMedia(f"cannot open media: {reason}") from exc


def bgr_array(frame: av.VideoFrame, reformatter: VideoReformatter | None = None) -> np.ndarray:
    """The frame as BGR uint8 ``[H, W, 3]``: the pixels of ``frame.to_ndarray(format="bgr24")``, as a
    view of the converted frame's buffer (which it keeps alive) instead of PyAV's copy of it, which
    cost more than the conversion itself (0.45 against 0.19 ms a 640x480 H.264 frame).

    Pass one ``reformatter`` for all the frames of a stream: ``frame.reformat`` makes a new one, and so a
    new swscale context, for every frame (0.59 against 0.14 ms a 640x480 frame; the same pixels)."""
    converted = (reformatter or VideoReformatter()).reformat(frame, format="bgr24")
    plane = converted.planes[0]
    rows = np.frombuffer(memoryview(plane), np.uint8).reshape(converted.height, plane.line_size)
    return rows[:, : converted.width * 3].reshape(converted.height, converted.width, 3)


def audio_samples(num_frames: int) -> int:
    """The 16 kHz samples a clip of `num_frames` 25 fps frames reads, with AUDIO_MARGIN_S to spare (its audio
    features and energy are cut to the clip's frames: a filterbank row reads 15 ms past its frame)."""
    return round((num_frames / FPS + AUDIO_MARGIN_S) * AUDIO_RATE)


def to_mono_16k(frames: Iterable[av.AudioFrame]) -> Iterator[np.ndarray]:
    """16 kHz mono int16 chunks of audio frames whose rate, layout or format may change mid-stream: a change
    flushes the resampler and starts a new one (``av.AudioResampler`` refuses a frame unlike its first)."""
    resampler: av.AudioResampler | None = None
    source: tuple[str, str, int] | None = None
    for frame in frames:
        kind = (frame.format.name, frame.layout.name, frame.sample_rate)
        if kind != source:
            if resampler is not None:
                yield from (f.to_ndarray().reshape(-1) for f in resampler.resample(None))
            resampler, source = av.AudioResampler(format="s16", layout="mono", rate=AUDIO_RATE), kind
        assert resampler is not None
        yield from (f.to_ndarray().reshape(-1) for f in resampler.resample(frame))
    if resampler is not None:
        yield from (f.to_ndarray().reshape(-1) for f in resampler.resample(None))


class VideoFile:
    """A video file (mp4/mov/webm/avi/mkv, path or bytes): 25 fps BGR frames and 16 kHz mono audio.

    Iterating decodes lazily (one frame at a time).  ``corrupt_skipped`` counts packets that failed to
    decode and frames flagged corrupt; ``source_fps`` is the stream's average rate.
    """

    def __init__(self, source: str | Path | bytes | BinaryIO) -> None:
        if hasattr(source, "read"):  # a file object is read once so the file can be opened several times
            source = source.read()
        self.source: str | Path | bytes = source
        self.corrupt_skipped = 0  # undecodable packets, corrupt frames, frames too small to hold a face
        self.frames_decoded = 0
        self.limits = FrameLimits.from_settings()
        with _open(source) as c:
            if not c.streams.video:
                raise BadMedia("no video stream")
            vs = c.streams.video[0]
            if vs.codec_context is None:  # PyAV has no decoder for its codec (e.g. an unknown fourcc)
                raise BadMedia("the video stream's codec cannot be decoded")
            rate = vs.average_rate or vs.guessed_rate
            self.source_fps = float(rate) if rate else FPS
            self.has_audio = bool(c.streams.audio)
            self.width, self.height = vs.codec_context.width, vs.codec_context.height
            self.limits.check(self.width, self.height, "the video")  # before any frame is decoded
        self._t0: float | None = None  # timestamp of the first decodable frame: origin of the 25 fps grid
        probe = self._timed()
        first = next(probe, None)
        probe.close()
        self._t0 = None if first is None else first[0]
        self.corrupt_skipped = self.frames_decoded = 0

    def _timed(self, seek_to: float | None = None) -> Generator[tuple[float, np.ndarray]]:
        with _open(self.source) as c:
            stream = c.streams.video[0]
            stream.thread_type = "AUTO"
            # FFmpeg refuses a frame far over the limit before allocating it (a stream may switch sizes mid-way);
            # it counts the allocated size (1920x1080 codes as 1920x1088, widths round up to 64), so 1/16 to
            # spare for frames near any real limit; `check` is exact
            stream.codec_context.options = {"max_pixels": str(self.limits.max_pixels + self.limits.max_pixels // 16)}
            if seek_to is not None and stream.time_base:
                c.seek(max(0, int(seek_to / stream.time_base)), stream=stream, backward=True, any_frame=False)
            n = 0
            reformatter = VideoReformatter()  # one swscale context for the stream (re-made if the size changes)
            for packet in c.demux(stream):
                try:
                    decoded = packet.decode()
                except av.FFmpegError:
                    # refused for its size: the context holds the new size, over AVSR_MAX_FRAME_PIXELS
                    self.limits.check(stream.codec_context.width, stream.codec_context.height, "a video frame")
                    self.corrupt_skipped += 1
                    continue
                for frame in decoded:
                    if getattr(frame, "is_corrupt", False) or not self.limits.check(frame.width, frame.height,
                                                                                    "a video frame"):
                        self.corrupt_skipped += 1
                        continue
                    t = frame.time if frame.time is not None else n / self.source_fps
                    n += 1
                    self.frames_decoded += 1
                    yield float(t), bgr_array(frame, reformatter)

    def __iter__(self) -> Iterator[np.ndarray]:
        return resample_timed(self._timed(), FPS, t0=self._t0)

    def num_frames(self, max_frames: int | None = None) -> int:
        """Frames the 25 fps stream will have, from packet timestamps (no decoding; exact unless the last
        frames turn out corrupt).  Falls back to decoding when the container has no timestamps.  With
        `max_frames`, over PACKETS_PER_FRAME × `max_frames` packets are refused (input_too_large) before
        their timestamps are all kept (a stream of tiny packets would take GBs)."""
        times: list[float] = []
        max_packets = None if max_frames is None else PACKETS_PER_FRAME * max_frames
        with _open(self.source) as c:
            stream = c.streams.video[0]
            for packet in c.demux(stream):
                if packet.size == 0:
                    continue
                if packet.pts is None or packet.time_base is None:
                    times = []
                    break
                times.append(float(packet.pts * packet.time_base))
                if max_packets is not None and len(times) > max_packets:
                    raise input_too_large(f"the video has over {max_packets} packets, more than {PACKETS_PER_FRAME} "
                                          f"per frame of AVSR_MAX_FRAMES={max_frames}")
        if not times:
            return sum(1 for _ in self)
        times = sorted(set(times))
        last_dt = times[-1] - times[-2] if len(times) > 1 else 1.0 / FPS
        return count_slots(self._t0 if self._t0 is not None else times[0], times[-1] + last_dt)

    def window(self, start: int, end: int) -> VideoWindow:
        """Frames ``start <= k < end`` of the 25 fps stream (same frames as slicing the full iteration),
        decoded from the key frame before ``start`` rather than from the beginning."""
        return VideoWindow(self, start, end)

    def audio(self, max_samples: int | None = None) -> np.ndarray | None:
        """The first audio stream as 16 kHz mono int16 (``av.AudioResampler``), or None if there is none;
        at most its first `max_samples` (decoding stops there: hours of audio behind a short video)."""
        if not self.has_audio:
            return None
        chunks: list[np.ndarray] = []
        total = 0
        with _open(self.source) as c:
            for chunk in to_mono_16k(self._audio_frames(c)):
                chunks.append(chunk)
                total += chunk.size
                if max_samples is not None and total >= max_samples:
                    break
        wave = np.concatenate(chunks).astype(np.int16) if chunks else np.zeros(0, np.int16)
        return wave[:max_samples]

    def _audio_frames(self, c: av.container.InputContainer) -> Iterator[av.AudioFrame]:
        """The decoded frames of `c`'s first audio stream; undecodable packets are skipped and counted."""
        for packet in c.demux(c.streams.audio[0]):
            try:
                frames = packet.decode()
            except av.FFmpegError:
                self.corrupt_skipped += 1
                continue
            yield from frames


class VideoWindow:
    """A slice ``[start, end)`` of a ``VideoFile``'s 25 fps frames, decoded after a seek."""

    SEEK_MARGIN_S = 1.0

    def __init__(self, video: VideoFile, start: int, end: int) -> None:
        if start < 0 or end < start:
            raise ValueError(f"bad window [{start}, {end})")
        self.video, self.start, self.end = video, start, end

    @property
    def corrupt_skipped(self) -> int:
        return self.video.corrupt_skipped

    def __iter__(self) -> Iterator[np.ndarray]:
        v = self.video
        if v._t0 is None or self.end == self.start:
            return iter(())
        target = v._t0 + self.start / FPS
        timed = v._timed(seek_to=target - self.SEEK_MARGIN_S) if self.start else v._timed()
        first = next(timed, None)
        if first is None:
            return iter(())
        if first[0] > target - 1.0 / FPS + 1e-9 and self.start:
            # the seek landed too late (no usable key frame before the window): decode from the start
            timed.close()
            timed, first = v._timed(), None
        items = timed if first is None else itertools.chain([first], timed)
        return resample_timed(items, FPS, t0=v._t0, first_slot=self.start, last_slot=self.end)
