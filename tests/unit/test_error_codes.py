"""One table of error codes (`tasks.errors.ERROR_CODES`): every code the code can emit is in it, and
the README and the OpenAPI description list each one with its status."""

from __future__ import annotations

import re

import pytest

from api.openapi import openapi_spec
from tasks.errors import ERROR_CODES, JobError, http_status
from tests.conftest import ROOT

SOURCES = [p for folder in ("api", "tasks", "cpu_worker", "gpu_worker") for p in (ROOT / folder).rglob("*.py")]
# A code literal handed to whatever builds an error: ApiError(...), JobError(...), bad(...), error_response(...).
EMITTED = re.compile(r"\b(?:ApiError|JobError|bad|error_response)\(\s*\"([a-z_]+)\"")


def emitted_codes() -> set[str]:
    return {code for path in SOURCES for code in EMITTED.findall(path.read_text())}


def test_every_emitted_code_is_in_the_table():
    emitted = emitted_codes()
    assert len(emitted) > 20, emitted  # the pattern still finds the call sites
    assert emitted <= set(ERROR_CODES), emitted - set(ERROR_CODES)


def test_readme_lists_every_code_with_its_status():
    readme = (ROOT / "README.md").read_text()
    for code, entry in ERROR_CODES.items():
        row = re.search(rf"^\| `{code}` \| (\d+) \|", readme, re.M)
        assert row, f"README.md has no error-code row for {code}"
        assert int(row.group(1)) == entry.status, code


def test_openapi_lists_every_code():
    schema = openapi_spec()["components"]["schemas"]["ErrorCode"]
    assert schema["enum"] == list(ERROR_CODES)
    for code, entry in ERROR_CODES.items():
        assert f"`{code}` ({entry.status}" in schema["description"]


def test_job_errors_refuse_codes_outside_the_table():
    with pytest.raises(ValueError):
        JobError("made_up_code", "x")
    with pytest.raises(ValueError):
        JobError("unauthorized", "an API-only code")  # a failed job cannot carry it
    assert http_status("no_face_detected") == 422


def test_internal_errors_carry_no_exception_text():
    from tasks.stage_task import as_job_error

    error = as_job_error(UnicodeEncodeError("utf-8", "\ud800", 0, 1, "surrogates not allowed at /srv/secret"))
    assert error.code == "internal_error" and "surrogate" not in error.message and "/srv" not in error.message
    assert as_job_error(JobError("no_frames", "kept")).message == "kept"


def test_a_full_disk_is_a_retried_insufficient_storage_error_without_its_path():
    import errno

    from tasks.stage_task import as_job_error

    for code in (errno.ENOSPC, errno.EDQUOT):
        error = as_job_error(OSError(code, "No space left on device", "/srv/cache/avsr-input-cache/x.part"))
        assert (error.code, error.retryable) == ("insufficient_storage", True) and "/srv" not in error.message
    assert as_job_error(OSError(errno.EACCES, "Permission denied")).code == "internal_error"
