"""Synthetic talking-face videos for the demo, the tests and the benchmarks.

The face is scikit-image's astronaut (``skimage.data.astronaut()``, a real face that dlib's
frontal detector finds), drifting smoothly over a soft background. Speech comes in
"utterances" of 2–8 s separated by 0.5–1.5 s pauses: during an utterance the jaw opens and
closes at a syllable rate of 3–5 Hz (a warp of the lower lip and chin plus a dark mouth cavity)
and the audio is a harmonic tone (f0 ≈ 125 Hz, 10 harmonics) whose amplitude follows the
syllables; in pauses the mouth is closed and the audio is faint noise (≈ -60 dBFS).

Several people: ``grid=(columns, rows)`` puts one face per cell of the frame, each talking on its
own random schedule; the audio is the voice of the first (top-left) face only, so the others move
their lips out of sync with it (the active-speaker case).

Frames are rendered and encoded one at a time (constant memory). Video is H.264 (libx264,
falling back to MPEG-4 Part 2); audio is 16 kHz mono AAC in .mp4/.mov, 16-bit PCM in .mkv.

    python -m deploy.local.sample_media talk.mp4 --seconds 600      # prints the time it took
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np

SAMPLE_RATE = 16000
UTTERANCE_S = (2.0, 8.0)
PAUSE_S = (0.5, 1.5)
LEAD_IN_S = (0.5, 1.0)
SYLLABLE_HZ = (3.0, 5.0)
RAMP_S = 0.08  # utterance fade in/out

# Head-and-shoulders crop of astronaut() (rows, cols); dlib's 68 landmarks put the mouth corners
# at (201,139) and (246,141) and the inner lips at y≈143..150 of the full image.
_CROP = (slice(10, 250), slice(110, 340))
_MOUTH_X, _MOUTH_Y = 113.0, 136.0  # between the lips, crop coordinates
_MOUTH_HALF_W = 23.0
_JAW_DROP_PX = 8.0  # lower lip/chin displacement at full opening
_CHIN_PX = 45.0  # below the mouth line, the warp fades out over this many pixels


@dataclass(frozen=True)
class Schedule:
    """Utterances ``[starts[i], ends[i])`` in seconds, each with its syllable rate."""

    starts: np.ndarray
    ends: np.ndarray
    rates: np.ndarray

    @classmethod
    def random(cls, seconds: float, seed: int) -> Schedule:
        rng = np.random.default_rng(seed)
        starts, ends, rates = [], [], []
        t = rng.uniform(*LEAD_IN_S)
        while t + 1.0 <= seconds:
            end = min(seconds, t + rng.uniform(*UTTERANCE_S))
            starts.append(t)
            ends.append(end)
            rates.append(rng.uniform(*SYLLABLE_HZ))
            t = end + rng.uniform(*PAUSE_S)
        return cls(np.array(starts), np.array(ends), np.array(rates))

    def intervals(self) -> list[tuple[float, float]]:
        return [(float(a), float(b)) for a, b in zip(self.starts, self.ends, strict=True)]

    def envelopes(self, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(utterance ramp, syllable cycle), both in [0,1], at times ``t`` (seconds); the mouth
        opening is their product."""
        t = np.asarray(t, np.float64)
        i = np.searchsorted(self.starts, t, side="right") - 1
        valid = i >= 0
        j = np.where(valid, i, 0)
        if self.starts.size == 0:
            zeros = np.zeros_like(t)
            return zeros, zeros
        s, e, r = self.starts[j], self.ends[j], self.rates[j]
        inside = valid & (t < e)
        ramp = np.clip(np.minimum(t - s, e - t) / RAMP_S, 0.0, 1.0) * inside
        syllable = 0.5 * (1.0 - np.cos(2 * np.pi * r * (t - s)))
        return ramp, syllable


class FaceRenderer:
    """Renders frame ``i`` (BGR uint8 [H,W,3]) of the synthetic talking face for a schedule."""

    def __init__(
        self, schedule: Schedule, size: tuple[int, int] = (640, 480), fps: float = 25.0, seed: int = 0
    ) -> None:
        from skimage.data import astronaut

        self.schedule, self.size, self.fps = schedule, size, fps
        width, height = size
        rng = np.random.default_rng(seed + 1)
        low = rng.uniform(40, 200, (4, 5, 3)).astype(np.float32)
        smooth = cv2.resize(low, (width, height), interpolation=cv2.INTER_CUBIC)
        self.background = smooth.clip(0, 255).astype(np.uint8)
        self.face = np.ascontiguousarray(astronaut()[_CROP][:, :, ::-1])
        self.scale = 0.5 * height / self.face.shape[0]
        fh, fw = self.face.shape[:2]
        yy, xx = np.mgrid[0:fh, 0:fw].astype(np.float32)
        self.grid_x, self.grid_y = xx, yy
        self.alpha = self._head_mask(fh, fw)
        jaw = self._jaw_weights(xx, yy)
        rows, cols = np.flatnonzero(jaw.any(axis=1)), np.flatnonzero(jaw.any(axis=0))
        self.band = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))  # where the jaw moves
        self.jaw = jaw[self.band]
        self.phase = rng.uniform(0, 2 * np.pi, 2)

    @staticmethod
    def _head_mask(h: int, w: int) -> np.ndarray:
        mask = np.zeros((h, w), np.float32)
        cv2.ellipse(mask, (w // 2, h // 2 + 5), (w // 2 - 8, h // 2 - 4), 0, 0, 360, 1.0, -1)
        return cv2.GaussianBlur(mask, (0, 0), 5)

    @staticmethod
    def _jaw_weights(xx: np.ndarray, yy: np.ndarray) -> np.ndarray:
        """How far each pixel moves down with the jaw: 1 at the lower lip, fading to the sides
        and the chin, 0 above the mouth line."""
        across = np.clip(1 - ((xx - _MOUTH_X) / (1.6 * _MOUTH_HALF_W)) ** 2, 0, 1) ** 2
        below = yy - _MOUTH_Y
        down = np.clip(below / 3.0, 0, 1) * np.clip(1 - below / _CHIN_PX, 0, 1)
        return (across * down).astype(np.float32)

    def opening(self, i: int) -> float:
        ramp, syllable = self.schedule.envelopes(np.array([i / self.fps]))
        return float(ramp[0] * syllable[0])

    def _talking_face(self, opening: float) -> np.ndarray:
        if opening <= 1e-3:
            return self.face
        drop = _JAW_DROP_PX * opening
        face = self.face.copy()
        gx, gy = self.grid_x[self.band], self.grid_y[self.band] - drop * self.jaw
        face[self.band] = cv2.remap(self.face, gx, gy, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        x0, y0 = round(_MOUTH_X - 1.5 * _MOUTH_HALF_W), round(_MOUTH_Y - 10)
        patch = face[y0 : y0 + 40, x0 : x0 + round(3 * _MOUTH_HALF_W)]  # a view: edited in place
        cavity = np.zeros(patch.shape[:2], np.float32)
        center = (round(_MOUTH_X) - x0, round(_MOUTH_Y + drop / 2) - y0)
        axes = (round(_MOUTH_HALF_W * 0.75), max(1, round(drop / 2 + 1)))
        cv2.ellipse(cavity, center, axes, 0, 0, 360, 0.9, -1)
        cavity = cv2.GaussianBlur(cavity, (0, 0), 1.2)
        dark = np.full(patch.shape, (30, 20, 60), np.uint8)  # BGR: dark red inside of the mouth
        patch[:] = cv2.blendLinear(dark, patch, cavity, 1 - cavity)
        return face

    def render(self, i: int) -> np.ndarray:
        t = i / self.fps
        face = self._talking_face(self.opening(i))
        alpha = self.alpha
        if self.scale != 1.0:
            dsize = (round(face.shape[1] * self.scale), round(face.shape[0] * self.scale))
            face = cv2.resize(face, dsize, interpolation=cv2.INTER_AREA)
            alpha = cv2.resize(self.alpha, dsize, interpolation=cv2.INTER_AREA)
        width, height = self.size
        fh, fw = face.shape[:2]
        cx = width / 2 + 0.12 * width * math.sin(2 * math.pi * t / 9.0 + self.phase[0])
        cy = height / 2 + 0.06 * height * math.sin(2 * math.pi * t / 6.5 + self.phase[1])
        x0 = int(np.clip(round(cx - fw / 2), 0, width - fw))
        y0 = int(np.clip(round(cy - fh / 2), 0, height - fh))
        frame = self.background.copy()
        region = frame[y0 : y0 + fh, x0 : x0 + fw]
        region[:] = cv2.blendLinear(face, region, alpha, 1 - alpha)
        return frame


def synth_audio(schedule: Schedule, start: int, stop: int, rng: np.random.Generator) -> np.ndarray:
    """Samples ``[start, stop)`` at 16 kHz (float32 in [-1, 1]): syllable-modulated harmonic tone
    in utterances, faint noise in pauses. Closed form in time, so chunks join seamlessly."""
    t = np.arange(start, stop) / SAMPLE_RATE
    ramp, syllable = schedule.envelopes(t)
    phase = 2 * np.pi * 125.0 * t - (15.0 / 0.7) * np.cos(2 * np.pi * 0.7 * t)  # f0 = 125 ± 15 Hz
    harmonics = np.arange(1, 11)
    tone = (np.sin(np.outer(phase, harmonics)) / harmonics).sum(axis=1) / np.sum(1.0 / harmonics)
    amplitude = 0.3 * ramp * (0.25 + 0.75 * syllable)
    noise = rng.normal(0.0, 0.001, t.size)
    return (amplitude * tone + noise).astype(np.float32)


class GridRenderer:
    """One ``FaceRenderer`` per cell of a ``grid`` (columns, rows) of the frame; cell ``k`` (row-major)
    talks on ``Schedule.random(seconds, seed + 7 k)``. ``schedules[0]`` is the voice's."""

    def __init__(self, seconds: float, size: tuple[int, int], fps: float, seed: int,
                 grid: tuple[int, int] = (1, 1)) -> None:
        cols, rows = grid
        self.size, self.grid = size, grid
        self.cell = (size[0] // cols, size[1] // rows)
        self.schedules = [Schedule.random(seconds, seed + 7 * k) for k in range(cols * rows)]
        self.renderers = [FaceRenderer(sched, self.cell, fps, seed + 7 * k) for k, sched in enumerate(self.schedules)]

    def render(self, i: int) -> np.ndarray:
        if len(self.renderers) == 1:
            return self.renderers[0].render(i)
        cols = self.grid[0]
        (cw, ch), (width, height) = self.cell, self.size
        frame = np.zeros((height, width, 3), np.uint8)
        for k, renderer in enumerate(self.renderers):
            x, y = (k % cols) * cw, (k // cols) * ch
            frame[y : y + ch, x : x + cw] = renderer.render(i)
        return frame


def make_face_frames(
    n: int, size: tuple[int, int] = (640, 480), seed: int = 0, fps: float = 25.0, grid: tuple[int, int] = (1, 1)
) -> Iterator[np.ndarray]:
    """The first ``n`` frames (BGR uint8) of the synthetic video ``write_face_video`` writes."""
    renderer = GridRenderer(n / fps, size, fps, seed, grid)
    for i in range(n):
        yield renderer.render(i)


def _video_stream(container: av.container.OutputContainer, fps: Fraction, size: tuple[int, int]):
    try:
        stream = container.add_stream("libx264", rate=fps, options={"preset": "veryfast", "crf": "20"})
    except (av.error.FFmpegError, ValueError):
        stream = container.add_stream("mpeg4", rate=fps)
        stream.bit_rate = 4_000_000
    stream.width, stream.height = size
    stream.pix_fmt = "yuv420p"
    stream.thread_type = "AUTO"
    return stream


def write_face_video(
    path: str | Path,
    seconds: float,
    fps: float = 25,
    size: tuple[int, int] = (640, 480),
    with_audio: bool = True,
    seed: int = 0,
    grid: tuple[int, int] = (1, 1),
) -> list[tuple[float, float]]:
    """Write the synthetic talking-face video; returns the utterance intervals (seconds) of the voice
    (the first face).

    ``round(seconds * fps)`` frames; the audio (16 kHz mono) lasts ``seconds``. AAC in .mp4/.mov,
    PCM in .mkv. Streams frame by frame, so memory does not grow with the length.
    """
    path = Path(path)
    rate = Fraction(fps).limit_denominator(1001)
    n = round(seconds * fps)
    renderer = GridRenderer(n / fps, size, fps, seed, grid)
    schedule = renderer.schedules[0]
    rng = np.random.default_rng(seed + 2)
    with av.open(str(path), "w") as container:
        video = _video_stream(container, rate, size)
        audio = None
        if with_audio:
            codec = "pcm_s16le" if path.suffix.lower() == ".mkv" else "aac"
            audio = container.add_stream(codec, rate=SAMPLE_RATE, layout="mono")
        for i in range(n):
            frame = av.VideoFrame.from_ndarray(renderer.render(i), format="bgr24")
            frame.pts = i
            container.mux(video.encode(frame))
            if audio is not None:
                a, b = round(i * SAMPLE_RATE / fps), round((i + 1) * SAMPLE_RATE / fps)
                container.mux(audio.encode(_audio_frame(synth_audio(schedule, a, b, rng), a, audio)))
        container.mux(video.encode(None))
        if audio is not None:
            container.mux(audio.encode(None))
    return schedule.intervals()


def _audio_frame(samples: np.ndarray, pts: int, stream) -> av.AudioFrame:
    if stream.codec_context.name == "pcm_s16le":
        data = (np.clip(samples, -1, 1) * 32767).astype(np.int16)[None]
        frame = av.AudioFrame.from_ndarray(data, format="s16", layout="mono")
    else:
        frame = av.AudioFrame.from_ndarray(samples[None], format="fltp", layout="mono")
    frame.sample_rate, frame.pts = SAMPLE_RATE, pts
    return frame


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path")
    parser.add_argument("--seconds", type=float, default=600.0)
    parser.add_argument("--fps", type=float, default=25.0)
    parser.add_argument("--size", type=int, nargs=2, default=(640, 480), metavar=("W", "H"))
    parser.add_argument("--no-audio", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--grid", type=int, nargs=2, default=(1, 1), metavar=("COLS", "ROWS"),
                        help="one talking face per cell; the voice is the top-left face's")
    args = parser.parse_args()
    t0 = time.perf_counter()
    size = (args.size[0], args.size[1])
    utterances = write_face_video(args.path, args.seconds, args.fps, size, not args.no_audio, args.seed,
                                  (args.grid[0], args.grid[1]))
    elapsed = time.perf_counter() - t0
    mb = Path(args.path).stat().st_size / 1e6
    print(f"{args.path}: {args.seconds:.0f} s, {len(utterances)} utterances, {mb:.1f} MB in {elapsed:.1f} s "
          f"({args.seconds * args.fps / elapsed:.0f} frames/s)")


if __name__ == "__main__":
    main()
