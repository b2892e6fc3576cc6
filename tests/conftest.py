"""Shared fixtures in the shape of Flask's flaskr tutorial: `app`, `client`, plus settings."""

from __future__ import annotations

import dataclasses

import pytest

from service import create_app
from service.config import Settings

pytest_plugins = ["tests.support.fhir_server"]


@pytest.fixture
def settings(tmp_path) -> Settings:
    """Test defaults: JWT checks off (the trust tests turn them on), a fresh SQLite database."""
    return Settings(
        auth="disabled",
        local_mode=True,
        database_url=f"sqlite:///{tmp_path / 'rpl-cds-test.sqlite'}",
        pseudonym_secret="test-pseudonym-secret",
    )


def make_app(settings: Settings, **overrides):
    if overrides:
        settings = dataclasses.replace(settings, **overrides)
    return create_app({"TESTING": True, "RPL_SETTINGS": settings})


@pytest.fixture
def app(settings):
    return make_app(settings)


@pytest.fixture
def client(app):
    return app.test_client()
