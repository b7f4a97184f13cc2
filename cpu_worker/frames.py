"""Frame sources: encoded image sequences and video files → BGR uint8 frames at 25 fps, streamed.

Frames are placed on a constant 25 fps grid from their real timestamps (nearest frame in time), so
variable-frame-rate phone videos and 30/50/60 fps sources come out at the model's rate.  Corrupt
images / packets / frames are skipped and counted (``corrupt_skipped``) rather than aborting the clip.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

import av
import cv2
import numpy as np

from cpu_worker.errors import BadMedia

log = logging.getLogger(__name__)

TARGET_FPS = 25.0
AUDIO_RATE = 16000


def resample_timed(items: Iterable[tuple[float, np.ndarray]], fps: float = TARGET_FPS) -> Iterator[np.ndarray]:
    """Constant-rate resampling of (timestamp seconds, frame) pairs: output frame k (time t0 + k/fps)
    is the input frame nearest in time (ties → the later one); the last frame lasts as long as the
    interval before it (or 1/fps).  Non-increasing timestamps are dropped."""
    prev_t: float | None = None
    prev: np.ndarray | None = None
    t0 = 0.0
    k = 0
    last_dt = 1.0 / fps
    for t, frame in items:
        if prev_t is None:
            prev_t, prev, t0 = t, frame, t
            continue
        if t <= prev_t:
            continue
        mid = (prev_t + t) / 2.0
        while t0 + k / fps < mid - 1e-9:
            yield prev
            k += 1
        last_dt = t - prev_t
        prev_t, prev = t, frame
    if prev_t is None or prev is None:
        return
    end = prev_t + last_dt  # the last frame is shown for as long as the interval before it
    while t0 + k / fps < end - 1e-9:
        yield prev
        k += 1


def decode_image(data: bytes | bytearray | memoryview) -> np.ndarray | None:
    """Encoded image (JPEG/PNG/…, any depth/channels) → BGR uint8, EXIF orientation applied; None if corrupt.

    ``cv2.IMREAD_COLOR`` converts grey/RGBA/16-bit to 8-bit BGR and honours the EXIF orientation tag.
    """
    buf = np.frombuffer(data, dtype=np.uint8)
    if buf.size == 0:
        return None
    try:
        img = cv2.imdecode(buf, cv2.IMREAD_COLOR)
    except cv2.error:
        return None
    return img if img is not None and img.size else None


class ImageSequence:
    """Iterable of 25 fps BGR frames from encoded images (bytes or file paths) shot at ``fps``."""

    def __init__(self, images: Iterable[bytes | bytearray | memoryview | str | Path], fps: float = TARGET_FPS) -> None:
        if fps <= 0:
            raise ValueError("fps must be positive")
        self.images, self.fps = images, fps
        self.corrupt_skipped = 0
        self.frames_decoded = 0

    def _timed(self) -> Iterator[tuple[float, np.ndarray]]:
        for i, item in enumerate(self.images):
            data = Path(item).read_bytes() if isinstance(item, str | Path) else item
            img = decode_image(data)
            if img is None:
                self.corrupt_skipped += 1
                log.debug("image %d is corrupt, skipped", i)
                continue
            self.frames_decoded += 1
            yield i / self.fps, img

    def __iter__(self) -> Iterator[np.ndarray]:
        return resample_timed(self._timed(), TARGET_FPS)


def _open(source: str | Path | bytes | BinaryIO) -> av.container.InputContainer:
    try:
        if isinstance(source, bytes | bytearray | memoryview):
            return av.open(io.BytesIO(bytes(source)), mode="r")
        return av.open(source if not isinstance(source, Path) else str(source), mode="r")
    except (av.FFmpegError, OSError, ValueError) as exc:
        raise BadMedia(f"cannot open media: {exc}") from exc


class VideoFile:
    """A video file (mp4/mov/webm/avi/mkv, path or bytes): 25 fps BGR frames and 16 kHz mono audio.

    Iterating decodes lazily (one frame at a time).  ``corrupt_skipped`` counts packets that failed to
    decode and frames flagged corrupt; ``source_fps`` is the stream's average rate.
    """

    def __init__(self, source: str | Path | bytes | BinaryIO) -> None:
        if hasattr(source, "read"):  # a file object is read once so the file can be opened several times
            source = source.read()
        self.source: str | Path | bytes = source
        self.corrupt_skipped = 0
        self.frames_decoded = 0
        with _open(source) as c:
            if not c.streams.video:
                raise BadMedia("no video stream")
            vs = c.streams.video[0]
            rate = vs.average_rate or vs.guessed_rate
            self.source_fps = float(rate) if rate else TARGET_FPS
            self.has_audio = bool(c.streams.audio)
            self.width, self.height = vs.codec_context.width, vs.codec_context.height

    def _timed(self) -> Iterator[tuple[float, np.ndarray]]:
        with _open(self.source) as c:
            stream = c.streams.video[0]
            stream.thread_type = "AUTO"
            n = 0
            for packet in c.demux(stream):
                try:
                    decoded = packet.decode()
                except av.FFmpegError:
                    self.corrupt_skipped += 1
                    continue
                for frame in decoded:
                    if getattr(frame, "is_corrupt", False):
                        self.corrupt_skipped += 1
                        continue
                    t = frame.time if frame.time is not None else n / self.source_fps
                    n += 1
                    self.frames_decoded += 1
                    yield float(t), frame.to_ndarray(format="bgr24")

    def __iter__(self) -> Iterator[np.ndarray]:
        return resample_timed(self._timed(), TARGET_FPS)

    def audio(self) -> np.ndarray | None:
        """The first audio stream as 16 kHz mono int16 (``av.AudioResampler``), or None if there is none."""
        if not self.has_audio:
            return None
        chunks: list[np.ndarray] = []
        resampler = av.AudioResampler(format="s16", layout="mono", rate=AUDIO_RATE)
        with _open(self.source) as c:
            stream = c.streams.audio[0]
            for packet in c.demux(stream):
                try:
                    frames = packet.decode()
                except av.FFmpegError:
                    self.corrupt_skipped += 1
                    continue
                for frame in frames:
                    chunks.extend(f.to_ndarray().reshape(-1) for f in resampler.resample(frame))
            chunks.extend(f.to_ndarray().reshape(-1) for f in resampler.resample(None))
        return np.concatenate(chunks).astype(np.int16) if chunks else np.zeros(0, np.int16)
