"""Frame sources: videos via PyAV and encoded image sequences, resampled to 25 fps."""

from __future__ import annotations

import gc
import io
import struct
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np
import pytest
from av.video.reformatter import VideoReformatter
from PIL import Image

from cpu_worker import audio as audio_lib
from cpu_worker import frames as frames_module
from cpu_worker import stages
from cpu_worker.errors import BadMedia
from cpu_worker.frames import (
    FrameLimits,
    ImageSequence,
    VideoFile,
    audio_samples,
    bgr_array,
    decode_image,
    image_size,
    resample_timed,
    to_mono_16k,
)
from tasks import storage
from tasks.errors import JobError
from tasks.settings import get_settings

ROOT = Path(__file__).resolve().parents[2]

PRE = ROOT / "tests/fixtures/avhubert_reference/preprocess"


def _write_video(path: Path, codec: str, pix_fmt: str, fps: int, n: int, audio: bool) -> None:
    """Flat frames whose green value is 5 × the source index; optional 44.1 kHz stereo tone."""
    with av.open(str(path), "w") as c:
        vs = c.add_stream(codec, rate=fps)
        vs.width, vs.height, vs.pix_fmt = 64, 48, pix_fmt
        if audio:
            aus = c.add_stream("aac", rate=44100)
            aus.layout = "stereo"
        for i in range(n):
            img = np.full((48, 64, 3), 5 * i % 256, np.uint8)
            for p in vs.encode(av.VideoFrame.from_ndarray(img, format="bgr24")):
                c.mux(p)
        for p in vs.encode():
            c.mux(p)
        if audio:
            t = np.arange(int(44100 * n / fps)) / 44100.0
            tone = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
            frame = av.AudioFrame.from_ndarray(np.stack([tone, tone]), format="fltp", layout="stereo")
            frame.sample_rate = 44100
            for p in aus.encode(frame):
                c.mux(p)
            for p in aus.encode():
                c.mux(p)


@pytest.mark.parametrize(
    ("ext", "codec", "pix_fmt", "audio"),
    [
        ("mp4", "libx264", "yuv420p", True),
        ("mov", "mpeg4", "yuv420p", True),
        ("webm", "libvpx-vp9", "yuv420p", False),
        ("avi", "mpeg4", "yuv420p", False),
        ("mkv", "ffv1", "bgr0", True),
    ],
)
def test_video_containers_resampled_to_25fps(tmp_path: Path, ext: str, codec: str, pix_fmt: str, audio: bool) -> None:
    path = tmp_path / f"clip.{ext}"
    _write_video(path, codec, pix_fmt, fps=30, n=45, audio=audio)
    src = VideoFile(path)
    assert src.source_fps == pytest.approx(30.0)
    frames = list(src)
    assert len(frames) == 38  # 1.5 s at 25 fps (45 frames at 30 fps, last one lasting 1/30 s)
    assert frames[0].shape == (48, 64, 3) and frames[0].dtype == np.uint8
    src_index = np.rint(np.array([f[:, :, 1].mean() for f in frames]) / 5.0)
    expected = np.floor(np.arange(38) * 1.2 + 0.5)  # nearest source frame in time
    assert np.abs(src_index - expected).max() <= (0 if codec == "ffv1" else 1)
    assert src.frames_decoded == 45 and src.corrupt_skipped == 0
    wav = src.audio()
    if audio:
        assert wav is not None and wav.dtype == np.int16 and wav.ndim == 1
        assert abs(wav.size - 24000) < 1200  # 1.5 s at 16 kHz, give or take codec priming
        assert 0.2 * 32768 < np.abs(wav).max() < 0.4 * 32768
    else:
        assert wav is None


@pytest.mark.parametrize(("codec", "pix_fmt", "size"), [("libx264", "yuv420p", (64, 48)), ("ffv1", "bgr0", (64, 48)),
                                                   ("ffv1", "yuv420p", (66, 50)), ("mpeg4", "yuv420p", (64, 48))])
def test_bgr_array_is_what_pyav_converts(tmp_path: Path, codec: str, pix_fmt: str, size: tuple[int, int]) -> None:
    """The decoded frames as views of the converted buffers equal PyAV's own copies (rows padded or not)."""
    path = tmp_path / "clip.mkv"
    rng = np.random.default_rng(0)
    with av.open(str(path), "w") as c:
        vs = c.add_stream(codec, rate=25)
        vs.width, vs.height, vs.pix_fmt = *size, pix_fmt
        for _ in range(6):
            img = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            c.mux(vs.encode(av.VideoFrame.from_ndarray(img, format="bgr24")))
        c.mux(vs.encode())
    views, copies = [], []
    reformatter = VideoReformatter()
    with av.open(str(path)) as c:
        for i, frame in enumerate(c.decode(video=0)):
            array = bgr_array(frame, reformatter if i % 2 else None)  # a stream's reformatter, or its own
            assert array.shape == (size[1], size[0], 3) and array.flags.writeable
            np.testing.assert_array_equal(array, frame.to_ndarray(format="bgr24"))
            views.append(array)
            copies.append(array.copy())
    del frame, array
    gc.collect()
    _reuse = [rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8) for _ in range(50)]
    # each view keeps its buffer alive after the frame, the decoder and the container are gone
    assert all(np.array_equal(view, copy) for view, copy in zip(views, copies, strict=True))


def test_a_stream_decodes_through_one_swscale_context_that_follows_size_changes(tmp_path: Path, monkeypatch) -> None:
    """`frame.reformat` makes a swscale context for every frame (4x the conversion's own cost at 640x480):
    a stream's frames go through one reformatter, which re-makes its context when the frame size changes."""
    path = tmp_path / "switch.h264"
    path.write_bytes(_h264(192, 128, 8) + _h264(96, 64, 8))
    made: list[VideoReformatter] = []

    def counting() -> VideoReformatter:
        made.append(VideoReformatter())
        return made[-1]

    video = VideoFile(path)
    monkeypatch.setattr(frames_module, "VideoReformatter", counting)
    decoded = [frame for _, frame in video._timed()]
    assert len(made) == 1
    assert [f.shape for f in decoded] == [(128, 192, 3)] * 8 + [(64, 96, 3)] * 8
    with av.open(str(path)) as c:
        expected = [frame.to_ndarray(format="bgr24") for frame in c.decode(video=0)]
    assert all(np.array_equal(a, b) for a, b in zip(decoded, expected, strict=True))


def test_reference_clip_decodes_exactly_from_bytes() -> None:
    data = (PRE / "face_clip_640x480_ffv1.mkv").read_bytes()
    ref = np.load(PRE / "preprocess_reference.npz")
    frames = list(VideoFile(data))
    assert len(frames) == 50
    np.testing.assert_array_equal(frames[0], ref["frame0_bgr"])


def test_bad_media_raises_with_code(tmp_path: Path) -> None:
    with pytest.raises(BadMedia) as info:
        VideoFile(b"this is not a video at all" * 100)
    assert info.value.code == "bad_media" and isinstance(info.value, JobError)
    garbage = tmp_path / "input-cache-entry"
    garbage.write_bytes(b"\x00not a video" * 100)
    with pytest.raises(BadMedia) as from_file:
        VideoFile(garbage)
    assert from_file.value.message == "cannot open media: Invalid data found when processing input"  # no path
    wav_only = tmp_path / "a.wav"
    with av.open(str(wav_only), "w") as c:
        s = c.add_stream("pcm_s16le", rate=16000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1600), np.int16), format="s16", layout="mono")
        frame.sample_rate = 16000
        for p in s.encode(frame):
            c.mux(p)
    with pytest.raises(BadMedia, match="no video stream"):
        VideoFile(wav_only)


def test_a_video_codec_without_a_decoder_is_bad_media(tmp_path: Path) -> None:
    path = tmp_path / "clip.avi"
    with av.open(str(path), "w") as c:
        _mux_black_frames(c, _black_video_stream(c), 1)
    data = path.read_bytes()
    assert data.count(b"MJPG") == 2  # the AVI's fourcc, in its stream header and its format block
    with pytest.raises(BadMedia, match="cannot be decoded"):
        VideoFile(data.replace(b"MJPG", b"ZZZZ"))


def _tone(rate: int, seconds: float) -> np.ndarray:
    """A 440 Hz tone at 0.3 full scale, mono int16 [1,N]."""
    t = np.arange(int(rate * seconds)) / rate
    return (0.3 * 32767 * np.sin(2 * np.pi * 440 * t)).astype(np.int16)[None]


def _audio_frame(samples: np.ndarray, rate: int) -> av.AudioFrame:
    frame = av.AudioFrame.from_ndarray(samples, format="s16", layout="mono")
    frame.sample_rate = rate
    return frame


def _black_video_stream(c: av.container.OutputContainer) -> av.VideoStream:
    """A 64x48 MJPEG stream at 25 fps in `c` (add every stream before muxing the first packet)."""
    vs = c.add_stream("mjpeg", rate=25)
    vs.width, vs.height, vs.pix_fmt = 64, 48, "yuvj420p"
    return vs


def _mux_black_frames(c: av.container.OutputContainer, vs: av.VideoStream, n: int) -> None:
    for _ in range(n):
        for p in vs.encode(av.VideoFrame.from_ndarray(np.zeros((48, 64, 3), np.uint8), format="bgr24")):
            c.mux(p)
    for p in vs.encode():
        c.mux(p)


def test_audio_whose_sample_rate_changes_mid_stream_is_decoded_whole(tmp_path: Path) -> None:
    path = tmp_path / "two_rates.mkv"  # 2 s of video; 1 s of MP2 at 48 kHz, then 1 s at 22.05 kHz
    with av.open(str(path), "w") as c:
        vs = _black_video_stream(c)
        aus = c.add_stream("mp2", rate=48000)
        aus.layout = "mono"
        _mux_black_frames(c, vs, 50)
        later = av.CodecContext.create("mp2", "w")
        later.sample_rate, later.layout, later.format = 22050, "mono", "s16"
        for enc, rate in ((aus.codec_context, 48000), (later, 22050)):
            for p in [*enc.encode(_audio_frame(_tone(rate, 1.0), rate)), *enc.encode(None)]:
                p.stream, p.time_base = aus, Fraction(1, rate)
                p.pts = p.dts = None if enc is later else p.pts
                c.mux(p)
    with av.open(str(path)) as c:
        assert {f.sample_rate for f in c.decode(audio=0)} == {48000, 22050}
    wav = VideoFile(path).audio()
    assert wav is not None and abs(wav.size - 32000) < 1600  # both seconds, at 16 kHz
    assert 0.2 * 32768 < np.abs(wav[-8000:]).max() < 0.4 * 32768  # the second rate's tone is there


def test_to_mono_16k_follows_changes_after_a_passthrough_start() -> None:
    # 16 kHz mono s16 needs no conversion: a later 32 kHz frame must still be converted, not passed through
    frames = [_audio_frame(_tone(16000, 0.5), 16000), _audio_frame(_tone(32000, 0.5), 32000)]
    wav = np.concatenate(list(to_mono_16k(frames)))
    assert abs(wav.size - 16000) < 200
    np.testing.assert_array_equal(wav[:8000], _tone(16000, 0.5)[0])


def _long_audio_clip(path: Path) -> Path:
    """1 s of video, 120 s of 8 kHz noise."""
    with av.open(str(path), "w") as c:
        vs = _black_video_stream(c)
        aus = c.add_stream("pcm_s16le", rate=8000)
        aus.layout = "mono"
        _mux_black_frames(c, vs, 25)
        noise = np.random.default_rng(0).integers(-8000, 8000, (1, 8000), dtype=np.int16)
        for _ in range(120):
            for p in aus.encode(_audio_frame(noise, 8000)):
                c.mux(p)
    return path


def test_audio_past_the_video_is_not_decoded(tmp_path: Path, monkeypatch) -> None:
    video = VideoFile(_long_audio_clip(tmp_path / "long_audio.mkv"))
    num_frames = video.num_frames()
    assert num_frames == 25
    full = video.audio()
    assert full is not None and full.size > 100 * 16000
    decoded: list[int] = []
    frames_of = VideoFile._audio_frames

    def counted(self: VideoFile, c: av.container.InputContainer):
        for frame in frames_of(self, c):
            decoded.append(frame.samples)
            yield frame

    monkeypatch.setattr(VideoFile, "_audio_frames", counted)
    wav = video.audio(audio_samples(num_frames))
    assert wav is not None and wav.size == audio_samples(num_frames) == 32000  # 1 s + AUDIO_MARGIN_S
    assert sum(decoded) <= 3 * 8000  # decoding stopped a packet or so past 2 s, not after 120 s
    # what the clip reads of its audio features and energy is unchanged
    np.testing.assert_array_equal(audio_lib.audio_features(wav)[:num_frames],
                                  audio_lib.audio_features(full)[:num_frames])
    np.testing.assert_array_equal(audio_lib.frame_energy_db(wav)[:num_frames],
                                  audio_lib.frame_energy_db(full)[:num_frames])


def test_prepare_keeps_the_audio_the_clip_reads(tmp_path: Path, monkeypatch) -> None:
    path = _long_audio_clip(tmp_path / "long_audio.mkv")
    stored: dict[str, np.ndarray] = {}
    monkeypatch.setattr(stages.storage, "head", lambda bucket, key: storage.S3Object(key, path.stat().st_size))
    monkeypatch.setattr(stages.storage, "cached_download", lambda obj, bucket: path)
    monkeypatch.setattr(stages.storage, "put_arrays", lambda bucket, key, **arrays: stored.update(arrays))
    plan = stages._prepare_video("job", {"type": "video", "bucket": "in", "key": "clip.mkv"}, {"modality": "auto"})
    assert plan["num_frames"] == 25 and plan["has_audio"]
    # 1 s of video + AUDIO_MARGIN_S at 25 Hz, not the 120 s of the audio track
    assert stored["features"].shape == (50, 104) and stored["energy_db"].shape == (50,)


def test_a_video_of_many_tiny_packets_is_refused_before_they_are_all_kept(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "fast.mkv"  # 200 frames at 1000 fps: 5 frames at 25 fps, in 200 packets
    with av.open(str(path), "w") as c:
        vs = c.add_stream("mjpeg", rate=1000)
        vs.width, vs.height, vs.pix_fmt = 64, 48, "yuvj420p"
        for _ in range(200):
            for p in vs.encode(av.VideoFrame.from_ndarray(np.zeros((48, 64, 3), np.uint8), format="bgr24")):
                c.mux(p)
        for p in vs.encode():
            c.mux(p)
    video = VideoFile(path)
    assert video.num_frames(max_frames=13) == video.num_frames() == 5  # 200 <= 16 × 13 packets
    monkeypatch.setattr(stages.storage, "head", lambda bucket, key: storage.S3Object(key, path.stat().st_size))
    monkeypatch.setattr(stages.storage, "cached_download", lambda obj, bucket: path)
    monkeypatch.setenv("AVSR_MAX_FRAMES", "12")  # 5 frames pass it; 200 packets are over 16 × 12
    get_settings.cache_clear()
    try:
        with pytest.raises(JobError) as info:
            stages._prepare_video("job", {"type": "video", "bucket": "in", "key": "fast.mkv"}, {"modality": "auto"})
        assert info.value.code == "input_too_large" and "over 192 packets" in info.value.message
    finally:
        get_settings.cache_clear()


def test_resample_timed_variable_rate() -> None:
    # timestamps with jitter and a duplicate: every 25 fps slot gets the nearest frame
    ts = [0.0, 0.03, 0.09, 0.09, 0.12, 0.2]
    out = list(resample_timed(((t, np.array([i])) for i, t in enumerate(ts)), 25.0))
    # slots 0, .04, .08, .12, .16 (tie → the later frame), .2, .24 (the last frame lasts 0.08 s)
    assert [int(o[0]) for o in out] == [0, 1, 2, 4, 5, 5, 5]
    assert list(resample_timed([], 25.0)) == []


def _png(img: np.ndarray) -> bytes:
    return cv2.imencode(".png", img)[1].tobytes()


def _jpeg_with_orientation(img: np.ndarray, orientation: int) -> bytes:
    jpg = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes()
    entry = struct.pack(">HHIHH", 0x0112, 3, 1, orientation, 0)
    tiff = b"MM\x00*" + struct.pack(">I", 8) + struct.pack(">H", 1) + entry + struct.pack(">I", 0)
    app1 = b"Exif\x00\x00" + tiff
    return jpg[:2] + b"\xff\xe1" + struct.pack(">H", len(app1) + 2) + app1 + jpg[2:]


def test_image_formats_and_exif_orientation() -> None:
    base = np.zeros((40, 60, 3), np.uint8)
    base[:10, :20] = (0, 0, 255)  # red block top-left
    assert decode_image(_png(base)).shape == (40, 60, 3)
    grey = decode_image(_png(base[:, :, 2]))
    assert grey.shape == (40, 60, 3) and grey.dtype == np.uint8
    rgba = decode_image(_png(np.dstack([base, np.full((40, 60), 128, np.uint8)])))
    assert rgba.shape == (40, 60, 3)
    deep = decode_image(_png(base.astype(np.uint16) * 257))
    assert deep.dtype == np.uint8 and deep[0, 0, 2] == 255
    rotated = decode_image(_jpeg_with_orientation(base, 6))  # 6 = rotate 90° clockwise to display
    assert rotated.shape == (60, 40, 3)
    assert rotated[:20, -10:, 2].mean() > 200  # the red block ends up top-right
    assert decode_image(b"\xff\xd8garbage") is None and decode_image(b"") is None
    pfm = io.BytesIO()  # grey float PFM ("Pf"): OpenCV decodes it to one channel even with IMREAD_COLOR
    Image.fromarray(base[:, :, 2]).convert("F").save(pfm, "PPM")
    from_pfm = decode_image(pfm.getvalue())
    assert from_pfm.shape == (40, 60, 3) and from_pfm.dtype == np.uint8


def test_image_sequence_skips_corrupt_and_resamples() -> None:
    imgs = [_png(np.full((32, 32, 3), 10 * i, np.uint8)) for i in range(10)]
    imgs[3] = b"\x89PNG broken"
    seq = ImageSequence(imgs, fps=25.0)
    frames = list(seq)
    assert seq.corrupt_skipped == 1 and seq.frames_decoded == 9
    assert len(frames) == 10  # the slot of the corrupt image is filled by its nearest neighbour (tie → later)
    assert [int(f[0, 0, 0]) for f in frames] == [0, 10, 20, 40, 40, 50, 60, 70, 80, 90]
    slow = list(ImageSequence(imgs[:5] + imgs[4:5], fps=12.5))
    assert len(slow) == 12


@pytest.mark.parametrize(
    ("ext", "codec", "pix_fmt"), [("mp4", "libx264", "yuv420p"), ("webm", "libvpx-vp9", "yuv420p")]
)
def test_num_frames_and_windows_match_full_iteration(tmp_path: Path, ext: str, codec: str, pix_fmt: str) -> None:
    path = tmp_path / f"long.{ext}"
    with av.open(str(path), "w") as c:  # 6 s at 30 fps, key frame every 30 frames (x264: with B-frames)
        vs = c.add_stream(codec, rate=30)
        vs.width, vs.height, vs.pix_fmt, vs.gop_size = 64, 48, pix_fmt, 30
        for i in range(180):
            img = np.zeros((48, 64, 3), np.uint8)
            img[:, : 1 + i % 64] = 255 - i  # each frame differs
            for p in vs.encode(av.VideoFrame.from_ndarray(img, format="bgr24")):
                c.mux(p)
        for p in vs.encode():
            c.mux(p)
    video = VideoFile(path)
    full = list(video)
    assert video.num_frames() == len(full)
    assert abs(len(full) - 150) <= 1  # 6 s at 25 fps (webm's millisecond timestamps may add one)
    for start, end in [(0, 40), (60, 110), (120, 150), (140, 200)]:
        part = list(video.window(start, end))
        assert len(part) == len(full[start:end])
        for a, b in zip(part, full[start:end], strict=True):
            np.testing.assert_array_equal(a, b)


def test_image_sequence_with_corrupt_first_and_last_images_keeps_its_length() -> None:
    imgs = [_png(np.full((32, 32, 3), 10 * i, np.uint8)) for i in range(8)]
    imgs[0] = imgs[-1] = b"broken"
    frames = list(ImageSequence(imgs, fps=25.0))
    assert [int(f[0, 0, 0]) for f in frames] == [10, 10, 20, 30, 40, 50, 60, 60]


def test_corrupt_video_packets_are_skipped_and_counted(tmp_path: Path) -> None:
    path = tmp_path / "mj.avi"
    with av.open(str(path), "w") as c:
        vs = c.add_stream("mjpeg", rate=25)
        vs.width, vs.height, vs.pix_fmt = 64, 48, "yuvj420p"
        for i in range(10):
            for p in vs.encode(av.VideoFrame.from_ndarray(np.full((48, 64, 3), 20 * i, np.uint8), format="bgr24")):
                c.mux(p)
        for p in vs.encode():
            c.mux(p)
    data = bytearray(path.read_bytes())
    soi = [i for i in range(len(data) - 1) if data[i] == 0xFF and data[i + 1] == 0xD8]
    assert len(soi) == 10
    garbage = np.random.default_rng(0).integers(0, 256, 800, dtype=np.uint8).tobytes()
    data[soi[4] : soi[4] + 800] = garbage  # wreck the 5th JPEG (and the start of the 6th)
    video = VideoFile(bytes(data))
    frames = list(video)
    assert video.corrupt_skipped >= 1
    assert 8 <= len(frames) <= 10 and video.frames_decoded <= 9
    assert all(f.shape == (48, 64, 3) for f in frames)


def _png_header(width: int, height: int) -> bytes:
    """A PNG that declares `width`×`height` and holds a few deflated rows (a decompression bomb's shape)."""
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grey
    rows = zlib.compress(b"\x00" * (width + 1) * 4, 9)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


def test_an_image_over_the_pixel_cap_fails_before_it_is_decoded(monkeypatch) -> None:
    bomb = _png_header(30000, 30000)
    assert len(bomb) < 200_000 and image_size(bomb) == (30000, 30000)
    decoded = []
    monkeypatch.setattr(cv2, "imdecode", lambda *a: decoded.append(a))
    with pytest.raises(JobError) as info:
        list(ImageSequence([bomb], fps=25.0))
    assert info.value.code == "input_too_large" and "30000×30000" in info.value.message
    assert decoded == []  # refused from the header alone


def test_frames_too_small_for_a_face_are_skipped_and_counted() -> None:
    imgs = [_png(np.full((1, 1, 3), 10, np.uint8)), _png(np.full((48, 48, 3), 20, np.uint8)),
            _png(np.full((8, 200, 3), 30, np.uint8))]
    source = ImageSequence(imgs, fps=25.0)
    frames = list(source)
    assert {int(f[0, 0, 0]) for f in frames} == {20}
    assert source.corrupt_skipped == 2


def test_a_video_over_the_pixel_cap_fails_from_its_header(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "big.mkv"
    with av.open(str(path), "w") as c:
        vs = c.add_stream("ffv1", rate=25)
        vs.width, vs.height, vs.pix_fmt = 320, 240, "yuv420p"
        for p in vs.encode(av.VideoFrame.from_ndarray(np.zeros((240, 320, 3), np.uint8), format="bgr24")):
            c.mux(p)
        for p in vs.encode():
            c.mux(p)
    monkeypatch.setenv("AVSR_MAX_FRAME_PIXELS", str(320 * 240 - 1))
    get_settings.cache_clear()
    try:
        with pytest.raises(JobError) as info:
            VideoFile(path)
        assert info.value.code == "input_too_large" and "320×240" in info.value.message
    finally:
        get_settings.cache_clear()


def _h264(width: int, height: int, n: int) -> bytes:
    """An H.264 Annex B stream of `n` frames (two concatenated make a stream that switches sizes)."""
    with av.open(buffer := io.BytesIO(), "w", format="h264") as c:
        vs = c.add_stream("libx264", rate=25)
        vs.width, vs.height, vs.pix_fmt = width, height, "yuv420p"
        for i in range(n):
            frame = av.VideoFrame.from_ndarray(np.full((height, width, 3), 40 + i, np.uint8), format="bgr24")
            for p in vs.encode(frame):
                c.mux(p)
        for p in vs.encode():
            c.mux(p)
    return buffer.getvalue()


def test_a_stream_that_grows_past_the_pixel_cap_is_refused_by_the_decoder(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "switch.h264"
    path.write_bytes(_h264(192, 128, 8) + _h264(384, 256, 8))
    monkeypatch.setenv("AVSR_MAX_FRAME_PIXELS", str(192 * 128))
    get_settings.cache_clear()
    try:
        with pytest.raises(JobError) as info:
            list(VideoFile(path))
        assert info.value.code == "input_too_large" and "384×256" in info.value.message
        # FFmpeg itself refuses the larger frames, before allocating them: without our check none come out
        monkeypatch.setattr(FrameLimits, "check", lambda self, width, height, what: True)
        sizes = {frame.shape[:2] for _, frame in VideoFile(path)._timed()}
        assert sizes == {(128, 192)}
    finally:
        get_settings.cache_clear()
