"""Errors a job can end with: a machine-readable code, a message, and whether a retry may help."""

from __future__ import annotations


class JobError(Exception):
    """A job failure with a stable machine-readable `code` (what clients switch on)."""

    def __init__(self, code: str, message: str, retryable: bool = False, http_status: int = 422):
        super().__init__(code, message)  # both in args: Celery rebuilds exceptions from args
        self.code = code
        self.message = message
        self.retryable = retryable
        self.http_status = http_status

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"

    def to_dict(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


def input_not_found(what: str) -> JobError:
    return JobError("input_not_found", f"no input found at {what}", http_status=404)


def access_denied(what: str) -> JobError:
    return JobError("access_denied", f"access denied to {what}", http_status=403)


def input_too_large(message: str) -> JobError:
    return JobError("input_too_large", message, http_status=413)


def transient(message: str) -> JobError:
    """A failure worth retrying (network, throttling, 5xx)."""
    return JobError("transient_error", message, retryable=True, http_status=503)
