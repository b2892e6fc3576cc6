"""Placeholder: JWT authentication, CORS and security headers (issue: Trust) register here."""

from flask import Flask


def init_app(app: Flask) -> None:  # pragma: no cover - replaced by the trust work
    return None
