"""rpl-cds: a CDS Hooks 2.0 service for the Dutch adaptation of the ESHRE 2022 guideline on
recurrent pregnancy loss. `create_app` is the application factory (Flask's own style)."""

from __future__ import annotations

import logging
import os

from flask import Flask

from .config import Settings, settings_from_env

log = logging.getLogger("rpl_cds")

AUTH_DISABLED_WARNING = (
    "\n" + "!" * 78 + "\n"
    "!! RPL_CDS_AUTH=disabled: CDS Hooks JWTs are NOT checked. Anyone who can reach this\n"
    "!! port can call the service. Local demonstration only; never expose it to a network.\n"
    + "!" * 78
)


def create_app(test_config: dict | None = None) -> Flask:
    """Build the Flask application.

    `test_config` may hold Flask settings and `RPL_SETTINGS` (a `Settings`), which replaces the
    environment; without it the RPL_CDS_* environment variables are read.
    """
    app = Flask(__name__, instance_relative_config=True)
    test_config = dict(test_config or {})
    settings: Settings = test_config.pop("RPL_SETTINGS", None) or settings_from_env()
    app.config.update(
        RPL_SETTINGS=settings,
        MAX_CONTENT_LENGTH=settings.max_body_bytes,
        **settings.as_flask_config(),
    )
    app.config.update(test_config)
    app.json.sort_keys = False
    app.json.compact = True
    os.makedirs(app.instance_path, exist_ok=True)
    _configure_logging(settings.log_level)

    from fhir_mappings.codes import load_code_tables

    from . import hooks
    from .errors import register_error_handlers
    from .services import load_services
    from .validation import check_all_schemas

    # Knowledge is loaded and validated once, at start-up: a broken data file stops the service.
    check_all_schemas()
    codes = load_code_tables(settings.extra_codes_file)
    app.extensions["rpl_codes"] = codes
    app.extensions["rpl_services"] = load_services(codes.observation_search_codes())
    _load_guideline_knowledge()

    register_error_handlers(app)
    app.register_blueprint(hooks.bp)
    _init_optional_parts(app)

    if settings.large_bodies_at_once > 0:
        from .large_bodies import LargeBodyGate

        app.extensions["rpl_large_bodies"] = LargeBodyGate(settings.large_bodies_at_once)
    if settings.auth == "disabled":
        log.warning(AUTH_DISABLED_WARNING)
    return app


def _load_guideline_knowledge() -> None:
    from cards.build import warm_up
    from cards.knowledge import load_knowledge

    load_knowledge()
    warm_up()  # compiles templates and validates suggestion shapes once, not on the first call


def _init_optional_parts(app: Flask) -> None:
    """Security, persistence and operations register themselves here."""
    from . import analytics, feedback, operations, playground, security, store

    security.init_app(app)  # first: JWT checks, CORS and headers wrap everything below
    store.init_app(app)
    feedback.init_app(app)
    analytics.init_app(app)
    operations.init_app(app)
    playground.init_app(app)


def _configure_logging(level: str) -> None:
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=level, format="%(message)s")
    logging.getLogger("rpl_cds").setLevel(level)
