"""Errors raised by CPU preprocessing: `JobError`s with the codes of `tasks.errors.ERROR_CODES`."""

from __future__ import annotations

from tasks.errors import JobError


class BadMedia(JobError):
    """The input cannot be decoded (unknown container, no video stream, garbage bytes)."""

    def __init__(self, message: str = "the media could not be decoded") -> None:
        super().__init__("bad_media", message)


class NoFrames(JobError):
    """The input decoded to zero usable frames."""

    def __init__(self, message: str = "no usable frames in the input") -> None:
        super().__init__("no_frames", message)


class NoFaceDetected(JobError):
    """No face was found in any frame of the clip."""

    def __init__(self, message: str = "no face was detected in any frame") -> None:
        super().__init__("no_face_detected", message)
