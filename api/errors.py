"""HTTP errors: every failure is JSON `{"error": {"code", "message"}}`, its status from `tasks.errors`."""

from __future__ import annotations

from typing import Any

import kombu.exceptions
import redis
from flask import Flask, Response, jsonify
from werkzeug.exceptions import HTTPException

from tasks.errors import ERROR_CODES, http_status


class ApiError(Exception):
    """A refused request: a machine-readable `code` of `tasks.errors.ERROR_CODES`, answered with its status."""

    def __init__(self, code: str, message: str, **extra: Any):
        super().__init__(message)
        self.status = http_status(code)
        self.code, self.message, self.extra = code, message, extra


def error_body(code: str, message: str, **extra: Any) -> dict[str, Any]:
    return {"error": {"code": code, "message": message}, **extra}


def error_response(code: str, message: str, **extra: Any) -> tuple[Response, int]:
    return jsonify(error_body(code, message, **extra)), http_status(code)


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(ApiError)
    def _api_error(exc: ApiError) -> tuple[Response, int]:
        return jsonify(error_body(exc.code, exc.message, **exc.extra)), exc.status

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> tuple[Response, int]:
        status = exc.code or 500
        code = (exc.name or "").lower().replace(" ", "_")
        if code not in ERROR_CODES:
            code = "invalid_input" if status < 500 else "internal_error"
        response = jsonify(error_body(code, exc.description or exc.name))
        for name, value in exc.get_headers():  # e.g. Allow on 405
            if name.lower() != "content-type":
                response.headers[name] = value
        return response, status

    @app.errorhandler(redis.ConnectionError)
    @app.errorhandler(redis.TimeoutError)
    @app.errorhandler(kombu.exceptions.OperationalError)
    def _broker_down(exc: Exception) -> tuple[Response, int]:
        app.logger.error("broker unavailable: %s", exc)
        return error_response("broker_unavailable", "the job queue is unavailable; retry later")

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> tuple[Response, int]:
        app.logger.exception("unhandled error")
        return error_response("internal_error", "internal server error")
