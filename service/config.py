"""Configuration from the environment (RPL_CDS_*), checked once at start-up.

A bad value stops the service with a message naming the variable: a misconfigured clinical
service must not start half-working.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

PREFIX = "RPL_CDS_"
SUPPORTED_LANGUAGES = ("nl", "en")


def is_loopback_host(host: str | None) -> bool:
    """localhost or a loopback address (127.0.0.0/8, ::1): where local-only shortcuts are allowed."""
    import ipaddress

    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the variable."""


def _parse_bool(name: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ConfigError(f"{PREFIX}{name}: expected true/false, got {raw!r}")


def _parse_positive_int(name: str, raw: str, *, minimum: int = 1) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{PREFIX}{name}: expected a whole number, got {raw!r}") from None
    if value < minimum:
        raise ConfigError(f"{PREFIX}{name}: must be at least {minimum}, got {value}")
    return value


def _parse_url_list(name: str, raw: str) -> tuple[str, ...]:
    urls = []
    for item in raw.split(","):
        item = item.strip()
        if not item:
            continue
        parts = urlsplit(item)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ConfigError(f"{PREFIX}{name}: {item!r} is not an absolute http(s) URL")
        urls.append(item.rstrip("/"))
    return tuple(urls)


@dataclass(frozen=True)
class Settings:
    auth: str = "required"  # 'required' | 'disabled'
    local_mode: bool = False  # `make run`: loopback FHIR servers allowed, CORS *, playground on
    fhir_servers: tuple[str, ...] = ()
    database_url: str | None = None  # None: SQLite file in the instance folder
    language: str = "nl"
    public_url: str | None = None  # external base URL (behind proxies), e.g. https://cds.example.org
    deadline_ms: int = 2000
    # A 10,000-resource prefetch is about 7 MB; memory stays bounded (service/large_bodies.py).
    max_body_bytes: int = 16 * 1024 * 1024
    large_bodies_at_once: int = 1  # per worker process; 0 = no limit (service/large_bodies.py)
    max_fhir_pages: int = 20
    timezone: str = "Europe/Amsterdam"
    trusted_clients_file: str | None = None
    cors_origins: tuple[str, ...] = ()
    extra_codes_file: str | None = None
    pseudonym_secret: str | None = None
    override_memory_days: int = 180  # 0 = no override memory
    select_sign_dedup: bool = True
    retention_days: int = 730
    log_level: str = "INFO"

    def as_flask_config(self) -> dict:
        return {f"RPL_{key.upper()}": value for key, value in self.__dict__.items()}


def settings_from_env(environ: Mapping[str, str] | None = None) -> Settings:
    env = os.environ if environ is None else environ

    def get(name: str) -> str | None:
        value = env.get(PREFIX + name)
        return None if value is None or value.strip() == "" else value.strip()

    values: dict = {}
    if (raw := get("AUTH")) is not None:
        if raw not in ("required", "disabled"):
            raise ConfigError(f"{PREFIX}AUTH: expected 'required' or 'disabled', got {raw!r}")
        values["auth"] = raw
    if (raw := get("LOCAL_MODE")) is not None:
        values["local_mode"] = _parse_bool("LOCAL_MODE", raw)
    if (raw := get("FHIR_SERVERS")) is not None:
        values["fhir_servers"] = _parse_url_list("FHIR_SERVERS", raw)
    if (raw := get("DATABASE_URL")) is not None:
        values["database_url"] = raw
    if (raw := get("LANGUAGE")) is not None:
        if raw not in SUPPORTED_LANGUAGES:
            raise ConfigError(f"{PREFIX}LANGUAGE: expected one of {SUPPORTED_LANGUAGES}, got {raw!r}")
        values["language"] = raw
    if (raw := get("PUBLIC_URL")) is not None:
        values["public_url"] = _parse_url_list("PUBLIC_URL", raw)[0]
    if (raw := get("DEADLINE_MS")) is not None:
        values["deadline_ms"] = _parse_positive_int("DEADLINE_MS", raw, minimum=50)
    if (raw := get("MAX_BODY_BYTES")) is not None:
        values["max_body_bytes"] = _parse_positive_int("MAX_BODY_BYTES", raw, minimum=1024)
    if (raw := get("LARGE_BODIES_AT_ONCE")) is not None:
        values["large_bodies_at_once"] = _parse_positive_int("LARGE_BODIES_AT_ONCE", raw, minimum=0)
    if (raw := get("MAX_FHIR_PAGES")) is not None:
        values["max_fhir_pages"] = _parse_positive_int("MAX_FHIR_PAGES", raw)
    if (raw := get("TIMEZONE")) is not None:
        values["timezone"] = raw
    if (raw := get("TRUSTED_CLIENTS")) is not None:
        if not Path(raw).is_file():
            raise ConfigError(f"{PREFIX}TRUSTED_CLIENTS: no such file {raw!r}")
        values["trusted_clients_file"] = raw
    if (raw := get("CORS_ORIGINS")) is not None:
        values["cors_origins"] = tuple(o.strip() for o in raw.split(",") if o.strip())
    if (raw := get("EXTRA_CODES")) is not None:
        if not Path(raw).is_file():
            raise ConfigError(f"{PREFIX}EXTRA_CODES: no such file {raw!r}")
        values["extra_codes_file"] = raw
    if (raw := get("PSEUDONYM_SECRET")) is not None:
        values["pseudonym_secret"] = raw
    if (raw := get("OVERRIDE_MEMORY_DAYS")) is not None:
        values["override_memory_days"] = _parse_positive_int("OVERRIDE_MEMORY_DAYS", raw, minimum=0)
    if (raw := get("SELECT_SIGN_DEDUP")) is not None:
        values["select_sign_dedup"] = _parse_bool("SELECT_SIGN_DEDUP", raw)
    if (raw := get("RETENTION_DAYS")) is not None:
        values["retention_days"] = _parse_positive_int("RETENTION_DAYS", raw)
    if (raw := get("LOG_LEVEL")) is not None:
        values["log_level"] = raw.upper()
    settings = Settings(**values)
    _check_timezone(settings.timezone)
    return settings


def _check_timezone(name: str) -> None:
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError(f"{PREFIX}TIMEZONE: unknown time zone {name!r}") from None
