"""Errors raised by the CPU preprocessing stage, each with a machine-readable ``code``."""

from __future__ import annotations


class PreprocessingError(Exception):
    """Base class: ``code`` is a stable machine-readable string, ``message`` is for humans."""

    code: str = "preprocessing_error"

    def __init__(self, code: str | None = None, message: str = "") -> None:
        if code is not None:
            self.code = code
        self.message = message or self.code
        super().__init__(f"{self.code}: {self.message}")


class BadMedia(PreprocessingError):
    """The input cannot be decoded (unknown container, no video stream, garbage bytes)."""

    code = "bad_media"

    def __init__(self, message: str = "the media could not be decoded") -> None:
        super().__init__(None, message)


class NoFrames(PreprocessingError):
    """The input decoded to zero usable frames."""

    code = "no_frames"

    def __init__(self, message: str = "no usable frames in the input") -> None:
        super().__init__(None, message)


class NoFaceDetected(PreprocessingError):
    """No face was found in any frame of the clip."""

    code = "no_face_detected"

    def __init__(self, message: str = "no face was detected in any frame") -> None:
        super().__init__(None, message)
