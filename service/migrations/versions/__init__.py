"""Alembic revision files (a package only so that installs include them)."""
