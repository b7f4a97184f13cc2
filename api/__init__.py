"""The HTTP API: `create_app()` is the Flask application factory (gunicorn "api:create_app()")."""

from __future__ import annotations

from flask import Flask

from tasks.settings import Settings, get_settings


def create_app(settings: Settings | None = None) -> Flask:
    """Build the Flask app with the job and operations blueprints."""
    from api import jobs, ops, ui, uploads
    from api.errors import register_error_handlers
    from api.limits import init_limits
    from tasks.logs import configure_logging

    settings = settings or get_settings()
    configure_logging(settings.log_level, settings.log_json)
    app = Flask(__name__)
    app.config.update(AVSR_SETTINGS=settings, MAX_CONTENT_LENGTH=settings.max_request_bytes)
    app.json.sort_keys = False  # type: ignore[attr-defined]  # DefaultJSONProvider
    register_error_handlers(app)
    init_limits(app, settings, jobs.bp, uploads.bp)
    app.register_blueprint(jobs.bp)
    app.register_blueprint(ops.bp)
    app.register_blueprint(uploads.bp)
    app.register_blueprint(ui.bp)
    if not settings.tenants:
        app.logger.warning("AVSR_API_KEYS and AVSR_TENANTS are empty: the API accepts unauthenticated requests")
    return app
