"""The web page at `/` (upload a video, watch its job, play it with captions) and the API
reference at `/docs` (Swagger UI, its assets from the flask-swagger-ui package: no CDN).

Every page is a static file of `api/static/` (no inline scripts, no secrets: the user types the
API key, which stays in the page's memory) served with a strict Content-Security-Policy.
"""

from __future__ import annotations

import os
from urllib.parse import urlparse

from flask import Blueprint, Response, current_app, send_from_directory

bp = Blueprint("ui", __name__)

STATIC = os.path.join(os.path.dirname(__file__), "static")


def _swagger_dist() -> str:
    import flask_swagger_ui

    return os.path.join(os.path.dirname(flask_swagger_ui.__file__), "dist")


def _s3_origin() -> str:
    """Where the page PUTs uploads (the presigned URLs' endpoint), for `connect-src`."""
    settings = current_app.config["AVSR_SETTINGS"]
    endpoint = settings.s3_public_url or settings.s3_endpoint_url
    if not endpoint:
        return "https://*.amazonaws.com"
    parsed = urlparse(endpoint)
    return f"{parsed.scheme}://{parsed.netloc}"


def _page(name: str, csp: str) -> Response:
    response = send_from_directory(STATIC, name, max_age=0)
    response.headers["Content-Security-Policy"] = csp
    return response


@bp.get("/")
def index():
    return _page("index.html", "default-src 'self'; "
                 f"connect-src 'self' {_s3_origin()}; media-src 'self' blob:; img-src 'self' data: blob:; "
                 "object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


@bp.get("/docs")
def docs():
    # Swagger UI sets element styles and shows data: images; it runs no inline script.
    return _page("docs.html", "default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
                 "object-src 'none'; base-uri 'none'; frame-ancestors 'none'")


@bp.get("/docs/assets/<path:name>")
def docs_asset(name: str):
    return send_from_directory(_swagger_dist(), name)


@bp.after_app_request
def _security_headers(response: Response) -> Response:
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("Referrer-Policy", "no-referrer")
    response.headers.setdefault("X-Frame-Options", "DENY")
    return response
