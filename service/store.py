"""Persistence of issued cards and clinician feedback: the `rpl_store` extension.

What it does for the hooks (service/hooks.py calls it when the extension exists):
- `filter_findings` applies the two memories that need a database:
  * override memory: a `not-recommended-test` / `-treatment` warning the clinician overrode for
    the same patient and guideline category is not repeated for RPL_CDS_OVERRIDE_MEMORY_DAYS
    (default 180). The order hooks drop it. `patient-view` has no order warnings; its summary
    finding (`rpl-summary`) gets `params["remembered_overrides"]` (one entry per remembered
    override) so the card can mention them; a not-recommended finding at patient-view, should
    one ever exist, is kept with `params["suppressed_override"] = True` instead of warning.
  * select/sign de-duplication (the HL7 PDDI-CDS pattern): an order warning shown at
    `order-select` is not shown again at `order-sign` for the same patient, encounter, rule and
    order code, unless the order's relevant content (code, dosage, reason) changed, within 24
    hours. Not disclosed with an extra card: the clinician saw the same warning moments before,
    and an info card would bring back the fatigue the de-duplication removes. PDDI's caution
    (a resident selects, an attending signs and never sees the warning) is why it can be
    switched off: RPL_CDS_SELECT_SIGN_DEDUP=false.
- `record_cards_in_background` writes one row per issued card, so feedback can be checked and
  counted: after the hook has answered, many hooks' cards per transaction (service/batch_writer.py).

Privacy: patient, encounter and order references are stored only as keyed pseudonyms
(HMAC-SHA256 with the pseudonym secret); no tokens, no names, no free text (the clinician's
override comment is reduced to "a comment was given"). See docs/data-retention.md.

Failure policy: the store never makes a hook fail. When the database is down or locked, hooks
answer without the memories (one warning in the log per outage); the card writer waits for a
lock up to RECORD_LOCK_WAIT_MS and loses the batch only when the database is down; the feedback
endpoint answers 503. Every request tries again (after a short back-off on the hook
path), so the service recovers without a restart.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime, timedelta
from enum import Enum
from typing import Any
from zoneinfo import ZoneInfo

from flask import Flask
from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    Connection,
    DateTime,
    Engine,
    ForeignKey,
    Index,
    Integer,
    String,
    Table,
    TypeDecorator,
    UniqueConstraint,
    bindparam,
    delete,
    select,
)
from alembic.util import CommandError
from sqlalchemy.exc import SQLAlchemyError

from cards.findings import ORDER_RULE_IDS

from .batch_writer import BatchWriter
from .config import PREFIX, ConfigError
from .db import database_url, engine_for, metadata, set_busy_timeout

log = logging.getLogger(__name__)

# Rules whose warnings the override memory applies to.
NOT_RECOMMENDED_RULES = ORDER_RULE_IDS
# The patient-view summary card's rule: it mentions remembered overrides.
SUMMARY_RULE = "rpl-summary"
# An order session (select ... sign) is short; a select-time card older than this is not matched.
SELECT_SIGN_WINDOW = timedelta(hours=24)
# Hook-path database limits: a hook must answer within its deadline even when the database is
# slow or locked, so it waits far less than the feedback endpoint does.
HOOK_LOCK_WAIT_MS = 250
HOOK_STATEMENT_TIMEOUT_MS = 500
FEEDBACK_LOCK_WAIT_MS = 3000
# PostgreSQL: the most a hook waits for the database (override memory, de-duplication) before
# answering without it. The wait runs on the store's own threads, so a database that stops
# answering (a silent network) holds those threads, never the request threads. SQLite reads run
# inline, bounded by HOOK_LOCK_WAIT_MS.
HOOK_DB_BUDGET_S = 0.5
# Cards are recorded after the answer by one writer thread per process: they may wait for a busy
# database as long as feedback does, and a lock held for a moment by another process loses no card.
RECORD_LOCK_WAIT_MS = FEEDBACK_LOCK_WAIT_MS
# The writer collects the cards of many hooks into one transaction: at most this many rows, and
# a row waits at most this long. One commit per hook (an fsync, and SQLite's single write lock
# shared by every worker) halved the service's throughput; batches cost one commit per window.
RECORD_BATCH_MAX_ROWS = 500
RECORD_BATCH_DELAY_S = 0.05
# Feedback may name a card that another worker has not written yet (its batch is still open):
# the feedback endpoint looks again once after this pause before calling the card unknown.
UNKNOWN_CARD_RECHECK_S = 4 * RECORD_BATCH_DELAY_S
STORE_THREADS = 2
# After a database failure on the hook path, hooks skip the database this long (seconds) so an
# outage does not add a connection timeout to every hook call. Feedback always tries.
DEFAULT_RETRY_AFTER_FAILURE_S = 2.0
SECRET_FILE_NAME = "pseudonym-secret"


class UtcDateTime(TypeDecorator):
    """Timezone-aware UTC timestamps on every backend (SQLite returns naive values otherwise)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value, dialect):
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value, dialect):
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


_ID = BigInteger().with_variant(Integer, "sqlite")

# One row per card issued. The schema is created and upgraded by service/migrations (keep in
# sync: tests/test_migrations.py compares these tables with the migrated database).
card_table = Table(
    "rpl_card",
    metadata,
    Column("id", _ID, primary_key=True, autoincrement=True),
    Column("card_uuid", String(64), nullable=False),
    Column("service_id", String(64), nullable=False),
    Column("hook", String(32), nullable=False),
    Column("rule_id", String(64), nullable=False),  # = card source.topic.code
    Column("indicator", String(16), nullable=False),
    Column("hook_instance", String(128), nullable=False),
    Column("issued_at", UtcDateTime(), nullable=False),
    Column("patient_pseudonym", String(64), nullable=False),
    Column("encounter_pseudonym", String(64), nullable=True),  # revision 0002
    Column("order_ref_pseudonym", String(64), nullable=True),
    Column("order_code", String(300), nullable=True),  # "system|code" of the matched coding
    Column("category", String(64), nullable=True),  # guideline category (test or treatment)
    Column("order_hash", String(64), nullable=True),  # revision 0002: code + dosage + reason
    # [{"uuid": ..., "removesOrder": bool}, ...]
    Column("suggestions", JSON(), nullable=False),
    UniqueConstraint("card_uuid", name="uq_rpl_card_card_uuid"),
    Index("ix_rpl_card_issued_at", "issued_at"),
    Index("ix_rpl_card_patient_category", "patient_pseudonym", "category"),
    Index("ix_rpl_card_select_sign", "patient_pseudonym", "encounter_pseudonym", "order_code"),
)

# One row per distinct feedback item (duplicates collapse on dedup_key).
feedback_table = Table(
    "rpl_feedback",
    metadata,
    Column("id", _ID, primary_key=True, autoincrement=True),
    # sha256 of card | outcome | outcomeTimestamp (UTC) | sorted accepted suggestion ids
    Column("dedup_key", String(64), nullable=False),
    Column(
        "card_uuid",
        String(64),
        ForeignKey("rpl_card.card_uuid", name="fk_rpl_feedback_card", ondelete="CASCADE"),
        nullable=False,
    ),
    Column("outcome", String(16), nullable=False),
    # The client's outcomeTimestamp, but never later than received_at (a clock far ahead must
    # not stretch the override memory).
    Column("outcome_at", UtcDateTime(), nullable=False),
    Column("received_at", UtcDateTime(), nullable=False),
    Column("accepted_suggestions", JSON(), nullable=False),  # sorted suggestion uuids
    Column("override_reason_system", String(300), nullable=True),
    Column("override_reason_code", String(200), nullable=True),
    Column("override_has_comment", Boolean(), nullable=False),
    UniqueConstraint("dedup_key", name="uq_rpl_feedback_dedup_key"),
    Index("ix_rpl_feedback_card_uuid", "card_uuid"),
)


# What "the database is unusable" looks like: driver/SQL errors, and a schema revision this
# release does not know (a newer release migrated the database; rolled back since).
DATABASE_ERRORS = (SQLAlchemyError, CommandError)


# The hook-path queries, built once (building a statement costs more than running it).
# One statement per memory, the same on both backends (the SQLite text below is this, written
# out): categories and order codes are filtered in Python, a patient has few such rows.
_MEMORY_QUERY = (
    select(
        card_table.c.category,
        card_table.c.rule_id,
        feedback_table.c.outcome,
        feedback_table.c.outcome_at,
    )
    .join(card_table, card_table.c.card_uuid == feedback_table.c.card_uuid)
    .where(
        card_table.c.patient_pseudonym == bindparam("patient"),
        card_table.c.rule_id.in_(NOT_RECOMMENDED_RULES),
        card_table.c.category.is_not(None),
        feedback_table.c.outcome_at >= bindparam("since"),
        feedback_table.c.outcome_at <= bindparam("now"),
    )
    .order_by(feedback_table.c.outcome_at.desc(), feedback_table.c.id.desc())
)
_SHOWN_AT_SELECT = select(
    card_table.c.rule_id, card_table.c.order_code, card_table.c.order_hash
).where(
    card_table.c.patient_pseudonym == bindparam("patient"),
    # Equal, or both NULL (a hook without an encounter).
    card_table.c.encounter_pseudonym.is_not_distinct_from(bindparam("encounter")),
    card_table.c.hook == "order-select",
    card_table.c.issued_at >= bindparam("since"),
    card_table.c.issued_at <= bindparam("now"),
)


_SQLITE_MEMORY_SQL = f"""
SELECT c.category, c.rule_id, f.outcome, f.outcome_at
FROM rpl_feedback AS f JOIN rpl_card AS c ON c.card_uuid = f.card_uuid
WHERE c.patient_pseudonym = ?
  AND c.rule_id IN ({", ".join(f"'{rule}'" for rule in NOT_RECOMMENDED_RULES)})
  AND c.category IS NOT NULL AND f.outcome_at >= ? AND f.outcome_at <= ?
ORDER BY f.outcome_at DESC, f.id DESC
"""
# `IS`: equal, or both NULL (a hook without an encounter); uses ix_rpl_card_select_sign.
_SQLITE_SHOWN_AT_SELECT_SQL = """
SELECT rule_id, order_code, order_hash FROM rpl_card
WHERE patient_pseudonym = ? AND encounter_pseudonym IS ? AND hook = 'order-select'
  AND issued_at >= ? AND issued_at <= ?
"""
_CARD_COLUMNS = tuple(column.name for column in card_table.columns if column.name != "id")
# One multi-row INSERT per chunk, not executemany: the driver releases the GIL around every row
# of an executemany, and a writer thread that has to win the GIL back from busy request threads
# after each row (up to the 5 ms switch interval each time) fell seconds behind under load.
# Chunks of a few fixed sizes only: the driver keeps each distinct statement compiled in its cache,
# and a statement per batch size (1 to 500 rows) held tens of megabytes per worker.
_SQLITE_INSERT_CHUNK_ROWS = (64, 8, 1)  # 64 x 14 parameters, far below SQLite's 32,766


def _sqlite_insert_cards_sql(rows: int) -> str:
    one = f"({', '.join('?' for _ in _CARD_COLUMNS)})"
    return (
        f"INSERT INTO rpl_card ({', '.join(_CARD_COLUMNS)}) VALUES {', '.join([one] * rows)}"
        " ON CONFLICT (card_uuid) DO NOTHING"
    )


_SQLITE_INSERT_CARDS_SQL = {rows: _sqlite_insert_cards_sql(rows) for rows in _SQLITE_INSERT_CHUNK_ROWS}


def _insert_chunks(count: int) -> Iterator[tuple[int, int]]:
    """(first row, rows) of each chunk: as many of the largest size as fit, then smaller ones."""
    start = 0
    for size in _SQLITE_INSERT_CHUNK_ROWS:
        while count - start >= size:
            yield start, size
            start += size


SQLITE_ERRORS = (sqlite3.Error, *DATABASE_ERRORS)


def _sqlite_time(moment: datetime) -> str:
    """A UTC instant as SQLAlchemy's SQLite DateTime stores it (text; compared as text)."""
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")


def _from_sqlite_time(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def _sqlite_card_value(row: dict, column: str) -> object:
    value = row.get(column)
    if column == "issued_at":
        return _sqlite_time(value)
    if column == "suggestions":
        return json.dumps(value)
    return value


class StoreUnavailable(Exception):
    """The database cannot be used right now (down, locked, schema not yet created)."""


@dataclass(frozen=True)
class StoreOptions:
    """From Settings (service/config.py holds the defaults)."""

    override_memory_days: int  # 0 = no override memory
    select_sign_dedup: bool
    retention_days: int


@dataclass(frozen=True)
class IssuedCard:
    """What the feedback endpoint needs to know about a card it receives feedback on."""

    card_uuid: str
    service_id: str
    rule_id: str
    suggestion_uuids: frozenset[str]


@dataclass(frozen=True)
class FeedbackRow:
    """One validated feedback item, ready to store."""

    dedup_key: str
    card_uuid: str
    outcome: str
    outcome_at: datetime
    accepted_suggestions: tuple[str, ...]
    override_reason_system: str | None
    override_reason_code: str | None
    override_has_comment: bool


@dataclass(frozen=True)
class RememberedOverride:
    """A not-recommended warning the clinician overrode for this patient and category."""

    rule_id: str
    category: str
    overridden_at: datetime
    remembered_until: datetime

    def as_param(self) -> dict:
        return {
            "rule_id": self.rule_id,
            "category": self.category,
            "overridden_on": self.overridden_at.date().isoformat(),
            "remembered_until": self.remembered_until.date().isoformat(),
        }


@dataclass(frozen=True)
class CardOutcome:
    """A card and the clinician's final answer to it (None: no feedback), for analytics."""

    rule_id: str
    issued_at: datetime
    outcome: str | None
    override_reason: str | None  # "system|code", None without a reason
    removed_order: bool  # accepted a suggestion that removes the draft order


# --------------------------------------------------------------------------------------------
# Pure helpers


def pseudonym(secret: bytes, kind: str, value: str) -> str:
    """Keyed pseudonym: HMAC-SHA256 over "kind:value". Without the secret it cannot be reversed
    by trying candidate patient ids; with it the same id always gives the same pseudonym."""
    return hmac.new(secret, f"{kind}:{value}".encode(), hashlib.sha256).hexdigest()


def category_value(finding: Any) -> str | None:
    category = getattr(finding, "category", None)
    if category is None and getattr(finding, "order", None) is not None:
        category = finding.order.category
    if isinstance(category, Enum):
        return str(category.value)
    return category


def order_code_text(order: Any) -> str | None:
    code = getattr(order, "code", None) if order is not None else None
    if not code:
        return None
    system, value = code
    return f"{system}|{value}"[:300]


def order_content_hash(order: Any) -> str | None:
    """Hash of what makes an order "the same order" for select/sign de-duplication: its code,
    dosage and reason. Identity, status and dates are left out: they change between select and
    sign without changing what is ordered."""
    if order is None:
        return None
    resource = getattr(order, "resource", None) or {}
    content = {
        "code": resource.get("code")
        or resource.get("medicationCodeableConcept")
        or resource.get("medicationReference")
        or list(order.code or ()),
        "dosage": resource.get("dosageInstruction") or order.dosage_text,
        "reason": [resource.get("reasonCode"), resource.get("reasonReference")]
        if resource
        else [list(c) for c in order.reason_codes],
        "category": category_value(order),
    }
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def suggestion_summaries(card: Mapping[str, Any]) -> list[dict]:
    summaries = []
    for suggestion in card.get("suggestions") or ():
        if not isinstance(suggestion, Mapping) or not suggestion.get("uuid"):
            continue
        actions = suggestion.get("actions") or ()
        removes = any(isinstance(a, Mapping) and a.get("type") == "delete" for a in actions)
        summaries.append({"uuid": str(suggestion["uuid"]), "removesOrder": removes})
    return summaries


def _topic(card: Mapping) -> str | None:
    source = card.get("source") or {}
    topic = source.get("topic") or {}
    return topic.get("code")


def feedback_dedup_key(
    card_uuid: str, outcome: str, outcome_at: datetime, suggestion_ids: Iterable[str]
) -> str:
    stamp = outcome_at.astimezone(UTC).isoformat(timespec="microseconds")
    joined = ",".join(sorted(set(suggestion_ids)))
    return hashlib.sha256(f"{card_uuid}|{outcome}|{stamp}|{joined}".encode()).hexdigest()


# --------------------------------------------------------------------------------------------
# Settings: RPL_CDS_* are parsed once by service.config; the RPL_* app config keys (set from the
# settings by create_app) may be overridden by tests.


def store_options(app: Flask) -> StoreOptions:
    settings = app.config["RPL_SETTINGS"]
    config = app.config
    return StoreOptions(
        override_memory_days=int(
            config.get("RPL_OVERRIDE_MEMORY_DAYS", settings.override_memory_days)
        ),
        select_sign_dedup=bool(config.get("RPL_SELECT_SIGN_DEDUP", settings.select_sign_dedup)),
        retention_days=int(config.get("RPL_RETENTION_DAYS", settings.retention_days)),
    )


def pseudonym_secret(app: Flask) -> bytes:
    """The configured secret; or, for the embedded SQLite database only, a random one generated
    once and kept in the instance folder (mode 0600).

    With an external database (PostgreSQL) several hosts share the data and must share the
    secret, and it must not live in the database it protects: the service refuses to start
    without RPL_CDS_PSEUDONYM_SECRET.
    """
    configured = app.config["RPL_SETTINGS"].pseudonym_secret
    if configured:
        if len(configured) < 16:
            log.warning("%sPSEUDONYM_SECRET is shorter than 16 characters; use 32+.", PREFIX)
        return configured.encode()
    url = database_url(app)
    if not url.startswith("sqlite"):
        raise ConfigError(
            f"{PREFIX}PSEUDONYM_SECRET must be set when {PREFIX}DATABASE_URL names an external "
            "database: every instance must use the same secret, and it must not be kept in the "
            "database itself. Generate one with `python -c 'import secrets; "
            "print(secrets.token_urlsafe(32))'`."
        )
    return _instance_secret(os.path.join(app.instance_path, SECRET_FILE_NAME)).encode()


def _instance_secret(path: str) -> str:
    try:
        with open(path, encoding="ascii") as handle:
            value = handle.read().strip()
        if value:
            return value
    except FileNotFoundError:
        pass
    # Write to a private temporary file, then link it into place: concurrent start-ups agree on
    # whichever secret was linked first.
    value = secrets.token_urlsafe(32)
    temporary = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(descriptor, "w", encoding="ascii") as handle:
            handle.write(value + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(temporary, path)
            log.warning(
                "generated a pseudonym secret in %s (set %sPSEUDONYM_SECRET to manage it "
                "yourself; losing it ends the override memory, not the data).",
                path,
                PREFIX,
            )
        except FileExistsError:
            pass
    finally:
        os.unlink(temporary)
    with open(path, encoding="ascii") as handle:
        return handle.read().strip()


# --------------------------------------------------------------------------------------------
# The extension

# Database URLs this process has brought to the newest schema. Inherited across a gunicorn fork
# on purpose: with preload the master migrates once and the workers need not check again.
_migrated: set[str] = set()
_migrated_lock = threading.Lock()


class Store:
    def __init__(self, app: Flask, secret: bytes, options: StoreOptions) -> None:
        self._app = app
        self._secret = secret
        self.options = options
        self.url = database_url(app)
        self.dialect = "sqlite" if self.url.startswith("sqlite") else "postgresql"
        self.zone = ZoneInfo(app.config["RPL_SETTINGS"].timezone)
        # Injectable clock (tests move time forward); always timezone-aware UTC.
        self.clock: Callable[[], datetime] = lambda: datetime.now(UTC)
        self.retry_after_failure_s = DEFAULT_RETRY_AFTER_FAILURE_S
        self._skip_until = 0.0
        self._outage = False
        self._last_contention_log = 0.0
        self._state_lock = threading.Lock()
        self._inserts: dict[tuple[str, str], Any] = {}
        self._pool: ThreadPoolExecutor | None = None
        self._pool_pid = 0
        # Cards issued by this process, written in batches after the hooks have answered.
        self.card_writer = BatchWriter(
            self._insert_card_rows,
            max_rows=RECORD_BATCH_MAX_ROWS,
            max_delay_s=RECORD_BATCH_DELAY_S,
            name="rpl-card-writer",
            # Queued order-select cards, by patient: order-sign de-duplication looks them up.
            index=lambda row: row["patient_pseudonym"] if row["hook"] == "order-select" else None,
        )

    def _executor(self) -> ThreadPoolExecutor:
        """The store's threads for hook-path reads from a network database, per process (a
        gunicorn fork gets its own)."""
        with self._state_lock:
            if self._pool is None or self._pool_pid != os.getpid():
                self._pool = ThreadPoolExecutor(STORE_THREADS, thread_name_prefix="rpl-store")
                self._pool_pid = os.getpid()
            return self._pool

    def wait_for_recording(self, timeout: float = 5.0) -> None:
        """Write this process's queued cards now (at most `timeout` seconds): feedback and
        analytics look cards up after them."""
        self.card_writer.flush(timeout)

    # -- infrastructure ------------------------------------------------------------------------

    @property
    def engine(self) -> Engine:
        return engine_for(self._app)

    def pseudonym(self, kind: str, value: str) -> str:
        return pseudonym(self._secret, kind, value)

    def ensure_schema(self) -> None:
        """Upgrade the database to the newest revision, once per process and database URL."""
        if self.url in _migrated:
            return
        with _migrated_lock:
            if self.url in _migrated:
                return
            from .migrations import upgrade_to_head

            upgrade_to_head(self.engine)
            # No pooled connection may cross a gunicorn fork (preload runs this in the master).
            self.engine.dispose()
            _migrated.add(self.url)

    def _ready_engine(self) -> Engine:
        self.ensure_schema()
        return self.engine

    def _note_failure(self, error: Exception, where: str) -> None:
        if _is_contention(error):
            # Locked or slow, not down: this request goes without; the next one tries again.
            now = time.monotonic()
            if now - self._last_contention_log > 60:
                self._last_contention_log = now
                log.warning(
                    "database busy (%s during %s): this request went without the store",
                    type(error).__name__,
                    where,
                )
            return
        first = self._start_outage()
        # The database may come back empty or restored from an older backup: check the schema
        # again on the next attempt (cheap when it is current).
        _migrated.discard(self.url)
        if isinstance(error, CommandError):
            log.error("database schema cannot be upgraded: %s", error)
        if first:
            # The message of a DBAPI error may quote parameters; those are pseudonyms only.
            log.warning(
                "database unavailable (%s during %s): hooks answer without override memory and "
                "select/sign de-duplication, cards are not recorded, feedback answers 503",
                type(error).__name__,
                where,
            )

    def _start_outage(self) -> bool:
        """Hooks leave the database alone for the back-off period; True if the outage is new."""
        with self._state_lock:
            self._skip_until = time.monotonic() + self.retry_after_failure_s
            first = not self._outage
            self._outage = True
        return first

    def _note_success(self) -> None:
        if self._outage:
            with self._state_lock:
                was_down, self._outage = self._outage, False
                self._skip_until = 0.0
            if was_down:
                log.warning("database available again")

    @contextmanager
    def _transaction(self, *, lock_wait_ms: int, statement_timeout_ms: int | None):
        engine = self._ready_engine()
        with engine.begin() as connection:
            if self.dialect == "sqlite":
                set_busy_timeout(connection.connection, lock_wait_ms)
            else:
                # Transaction-local settings. synchronous_commit=on: an acknowledged commit is on
                # disk whatever the server default is (feedback is acknowledged after commit).
                connection.exec_driver_sql(
                    "SELECT set_config('lock_timeout', %(lock)s, true),"
                    " set_config('statement_timeout', %(statement)s, true),"
                    " set_config('synchronous_commit', 'on', true)",
                    {"lock": str(lock_wait_ms), "statement": str(statement_timeout_ms or 0)},
                )
            yield connection

    @contextmanager
    def _hook_transaction(
        self, where: str, lock_wait_ms: int = HOOK_LOCK_WAIT_MS,
        statement_timeout_ms: int = HOOK_STATEMENT_TIMEOUT_MS,
    ) -> Iterator[Connection | None]:
        """A transaction with the given lock wait and statement timeout (by default the hook
        path's short ones), or None when the database is unusable. Errors are logged and
        swallowed: the hook answers regardless, the card writer goes on with the next batch.
        The back-off after a failure (`_skip_until`) is the hook's to honour, not this one's:
        the card writer works after the answer and keeps trying, so a slow read costs no cards
        and its first success ends the outage."""
        stack = ExitStack()
        try:
            connection = stack.enter_context(
                self._transaction(lock_wait_ms=lock_wait_ms, statement_timeout_ms=statement_timeout_ms)
            )
        except DATABASE_ERRORS as error:  # cannot connect or begin: yield None, do not raise
            self._note_failure(error, where)
            yield None
            return
        try:
            with stack:
                yield connection
        except DATABASE_ERRORS as error:
            self._note_failure(error, where)
            return
        self._note_success()

    def _note_too_slow(self, where: str) -> None:
        """The database did not answer within the hook budget: treat it as down for the back-off
        period, so the following hooks do not each wait for it."""
        if self._start_outage():
            log.warning(
                "database did not answer within %.1f s (%s): hooks answer without it for now",
                HOOK_DB_BUDGET_S, where,
            )

    @contextmanager
    def feedback_transaction(self) -> Iterator[Connection]:
        """A transaction for the feedback endpoint; raises StoreUnavailable (-> 503)."""
        try:
            with self._transaction(
                lock_wait_ms=FEEDBACK_LOCK_WAIT_MS, statement_timeout_ms=10_000
            ) as connection:
                yield connection
        except DATABASE_ERRORS as error:
            self._note_failure(error, "feedback")
            raise StoreUnavailable(str(type(error).__name__)) from error
        self._note_success()

    # -- hook path -----------------------------------------------------------------------------

    def filter_findings(self, call: Any, facts: Any, findings: Sequence[Any]) -> list:
        """Apply override memory and select/sign de-duplication (see the module docstring).
        Never raises: on any problem the findings come back unfiltered."""
        if time.monotonic() < self._skip_until:
            return list(findings)
        try:
            if self.dialect == "sqlite":
                # A local file: a read in WAL mode never waits for writers, and lock waits are
                # bounded by busy_timeout. Asking another thread would only add a GIL hand-off.
                return self._filter_findings(call, list(findings))
            # A network database can stop answering without closing the connection: the query
            # runs on the store's threads so that it holds those, never the request thread.
            future = self._executor().submit(self._filter_findings, call, list(findings))
            return future.result(timeout=HOOK_DB_BUDGET_S)
        except FutureTimeout:
            self._note_too_slow("filter_findings")
            return list(findings)
        except Exception:  # noqa: BLE001 - a bug here must not cost the clinician the cards
            log.exception("filter_findings failed; answering without the store's memories")
            return list(findings)

    def _filter_findings(self, call: Any, findings: list) -> list:
        hook = call.service.hook
        categories = {
            category_value(f) for f in findings if f.rule_id in NOT_RECOMMENDED_RULES
        } - {None}
        # patient-view has no order warnings; its summary mentions every remembered override.
        summary = hook == "patient-view" and any(f.rule_id == SUMMARY_RULE for f in findings)
        use_memory = (bool(categories) or summary) and self.options.override_memory_days > 0
        dedup_codes = (
            {order_code_text(f.order) for f in findings if f.order is not None} - {None}
            if hook == "order-sign" and self.options.select_sign_dedup
            else set()
        )
        if not use_memory and not dedup_codes:
            return findings
        now = self.clock()
        patient = self.pseudonym("patient", call.patient_id)
        encounter = self.pseudonym("encounter", call.encounter_id) if call.encounter_id else None
        remember = (None if summary else categories) if use_memory else set()
        if self.dialect == "sqlite":
            try:
                with self._sqlite_reader() as read:
                    memories = self._memories(read, patient, encounter, remember, dedup_codes, now)
            except SQLITE_ERRORS as error:
                self._note_failure(error, "filter_findings")
                return findings
            self._note_success()
            return apply_memories(findings, hook, *memories)
        with self._hook_transaction("filter_findings") as connection:
            if connection is None:
                return findings
            memories = self._memories(
                lambda query, parameters: connection.execute(query, parameters).all(),
                patient, encounter, remember, dedup_codes, now,
            )
        return apply_memories(findings, hook, *memories)

    def _memories(
        self,
        read: Callable[[Any, dict], list],
        patient: str,
        encounter: str | None,
        categories: set[str] | None,
        codes: set[str],
        now: datetime,
    ) -> tuple[dict[str, RememberedOverride], set[tuple[str, str, str]]]:
        """(remembered overrides, order-select cards shown) for one hook. `read(statement,
        parameters)` runs one of the two statements on the backend. `categories`: those to
        remember (None: every one; empty: no memory query); `codes`: the order codes to
        de-duplicate (empty: no query)."""
        remembered: dict[str, RememberedOverride] = {}
        if categories is None or categories:
            since = now - timedelta(days=self.options.override_memory_days)
            rows = read(_MEMORY_QUERY, {"patient": patient, "since": since, "now": now})
            remembered = self._overrides_from_rows(
                row for row in rows if categories is None or row[0] in categories
            )
        shown: set[tuple[str, str, str]] = set()
        if codes:
            since = now - SELECT_SIGN_WINDOW
            parameters = {"patient": patient, "encounter": encounter, "since": since, "now": now}
            shown = {
                (rule_id, order_code, order_hash)
                for rule_id, order_code, order_hash in read(_SHOWN_AT_SELECT, parameters)
                if order_code in codes
            }
            shown |= self._unwritten_select_cards(patient, encounter, codes, since, now)
        return remembered, shown

    # SQLite: the hook path's reads and the card writer's inserts go straight to the pooled DBAPI
    # connection. Through SQLAlchemy Core each read cost ~95 us (transaction, compile cache,
    # bind processing) against ~13 us; with two reads per hook and a batch insert that was a
    # quarter of a hook's CPU (bench/README.md). The SQL is the Core statements above, written
    # out; the PostgreSQL path runs the Core statements. The store tests run on both backends.

    @contextmanager
    def _sqlite_reader(self) -> Iterator[Callable[[Any, dict], list[tuple]]]:
        """A reader for `_memories` on one pooled SQLite connection, checked out once for both
        statements (UTC timestamps as SQLAlchemy stores them)."""
        raw = self._ready_engine().raw_connection()
        try:
            set_busy_timeout(raw, HOOK_LOCK_WAIT_MS)
            driver = raw.driver_connection

            def read(statement: Any, parameters: dict) -> list[tuple]:
                since, now = _sqlite_time(parameters["since"]), _sqlite_time(parameters["now"])
                if statement is _MEMORY_QUERY:
                    rows = driver.execute(_SQLITE_MEMORY_SQL, (parameters["patient"], since, now))
                    return [(c, r, o, _from_sqlite_time(at)) for c, r, o, at in rows]
                return driver.execute(
                    _SQLITE_SHOWN_AT_SELECT_SQL,
                    (parameters["patient"], parameters["encounter"], since, now),
                ).fetchall()

            yield read
        finally:
            raw.close()

    def _overrides_from_rows(self, rows: Iterable[tuple]) -> dict[str, RememberedOverride]:
        """Rows (category, rule_id, outcome, outcome_at), newest first -> remembered overrides."""
        days = self.options.override_memory_days
        latest: dict[str, tuple] = {}
        for category, rule_id, outcome, outcome_at in rows:
            latest.setdefault(category, (rule_id, outcome, outcome_at))
        return {
            category: RememberedOverride(
                rule_id=rule_id,
                category=category,
                # Local time, so the card's "overridden on" date is the clinician's date.
                overridden_at=at.astimezone(self.zone),
                remembered_until=(at + timedelta(days=days)).astimezone(self.zone),
            )
            for category, (rule_id, outcome, at) in sorted(latest.items())
            if outcome == "overridden"
        }

    def _unwritten_select_cards(
        self, patient: str, encounter: str | None, codes: set[str], since: datetime, now: datetime
    ) -> set[tuple[str, str, str]]:
        """Order-select cards of this process still waiting for their batch count as recorded."""
        return {
            (row["rule_id"], row["order_code"], row["order_hash"])
            for row in self.card_writer.unwritten(patient)
            if row["encounter_pseudonym"] == encounter
            and row["order_code"] in codes
            and since <= row["issued_at"] <= now
        }

    def record_cards(self, call: Any, pairs: Sequence[tuple[Any, Mapping]]) -> None:
        """Record each issued card (pairs of finding and card, as cards.build makes them) now,
        without the card writer's queue, waiting for a lock only HOOK_LOCK_WAIT_MS. Never
        raises. The hook path uses record_cards_in_background; this synchronous form is for the
        tests of what a recorded card holds and of lock and outage handling."""
        try:
            self._insert_card_rows(self.card_rows(call, pairs), lock_wait_ms=HOOK_LOCK_WAIT_MS)
        except Exception:  # noqa: BLE001
            log.exception("record_cards failed; the cards were answered but not recorded")

    def record_cards_in_background(self, call: Any, pairs: Sequence[tuple[Any, Mapping]]) -> None:
        """Queue the cards for the card writer (service/batch_writer.py), which records them
        after the hook has answered, many hooks per transaction. Never raises. A busy database
        (another process writing for a moment) delays the recording, it does not lose the card;
        a database that is down loses it (logged once per outage)."""
        try:
            self.card_writer.add(self.card_rows(call, pairs))
        except Exception:  # noqa: BLE001
            log.exception("record_cards failed; the cards were answered but not recorded")

    def _insert_card_rows(self, rows: list, lock_wait_ms: int = RECORD_LOCK_WAIT_MS) -> None:
        if not rows:
            return
        if self.dialect == "sqlite":
            self._sqlite_insert_card_rows(rows, lock_wait_ms)
            return
        try:
            with self._hook_transaction(
                "record_cards", lock_wait_ms=lock_wait_ms, statement_timeout_ms=10_000
            ) as connection:
                if connection is None:
                    return
                connection.execute(self._insert_ignoring_duplicates(card_table, "card_uuid"), rows)
        except Exception:  # noqa: BLE001
            log.exception("record_cards failed; the cards were answered but not recorded")

    def _sqlite_insert_card_rows(self, rows: list, lock_wait_ms: int) -> None:
        """One transaction for all rows; a card already recorded is skipped. Never raises."""
        values = [_sqlite_card_value(row, column) for row in rows for column in _CARD_COLUMNS]
        width = len(_CARD_COLUMNS)
        try:
            raw = self._ready_engine().raw_connection()
        except DATABASE_ERRORS as error:
            self._note_failure(error, "record_cards")
            return
        try:
            set_busy_timeout(raw, lock_wait_ms)
            driver = raw.driver_connection
            try:
                for first, size in _insert_chunks(len(rows)):
                    part = values[first * width : (first + size) * width]
                    driver.execute(_SQLITE_INSERT_CARDS_SQL[size], part)
                driver.commit()
            except BaseException:
                driver.rollback()
                raise
        except SQLITE_ERRORS as error:
            self._note_failure(error, "record_cards")
            return
        except Exception:  # noqa: BLE001
            log.exception("record_cards failed; the cards were answered but not recorded")
            return
        finally:
            raw.close()
        self._note_success()

    def card_rows(self, call: Any, pairs: Sequence[tuple[Any, Mapping]]) -> list:
        now = self.clock()
        patient = self.pseudonym("patient", call.patient_id)
        encounter = self.pseudonym("encounter", call.encounter_id) if call.encounter_id else None
        rows = []
        for finding, card in pairs:
            if not card.get("uuid"):
                continue  # no uuid, no feedback (CDS Hooks 2.0): nothing worth recording
            order = finding.order
            rows.append(
                {
                    "card_uuid": str(card["uuid"])[:64],
                    "service_id": call.service.id,
                    "hook": call.service.hook,
                    "rule_id": str(_topic(card) or finding.rule_id)[:64],
                    "indicator": str(card.get("indicator", "info"))[:16],
                    "hook_instance": str(call.hook_instance)[:128],
                    "issued_at": now,
                    "patient_pseudonym": patient,
                    "encounter_pseudonym": encounter,
                    "order_ref_pseudonym": self.pseudonym("order", order.resource_ref)
                    if order is not None and order.resource_ref
                    else None,
                    "order_code": order_code_text(order),
                    "category": category_value(finding),
                    "order_hash": order_content_hash(order),
                    "suggestions": suggestion_summaries(card),
                }
            )
        return rows

    def _insert_ignoring_duplicates(self, table: Table, key: str):
        statement = self._inserts.get((table.name, key))
        if statement is None:
            if self.dialect == "sqlite":
                from sqlalchemy.dialects.sqlite import insert
            else:
                from sqlalchemy.dialects.postgresql import insert
            statement = insert(table).on_conflict_do_nothing(index_elements=[key])
            self._inserts[(table.name, key)] = statement
        return statement

    # -- feedback ------------------------------------------------------------------------------

    def issued_cards(self, card_uuids: Iterable[str]) -> dict[str, IssuedCard]:
        """The recorded cards among `card_uuids` (raises StoreUnavailable)."""
        wanted = sorted(set(card_uuids))
        self.wait_for_recording()
        found = self._issued_cards(wanted)
        if len(found) < len(wanted):
            # Another worker may still hold the card in its open batch: look once more.
            time.sleep(UNKNOWN_CARD_RECHECK_S)
            found.update(self._issued_cards([u for u in wanted if u not in found]))
        return found

    def _issued_cards(self, wanted: list[str]) -> dict[str, IssuedCard]:
        found: dict[str, IssuedCard] = {}
        with self.feedback_transaction() as connection:
            for start in range(0, len(wanted), 500):
                chunk = wanted[start : start + 500]
                query = select(
                    card_table.c.card_uuid,
                    card_table.c.service_id,
                    card_table.c.rule_id,
                    card_table.c.suggestions,
                ).where(card_table.c.card_uuid.in_(chunk))
                for card_uuid, service_id, rule_id, suggestions in connection.execute(query):
                    found[card_uuid] = IssuedCard(
                        card_uuid=card_uuid,
                        service_id=service_id,
                        rule_id=rule_id,
                        suggestion_uuids=frozenset(s["uuid"] for s in suggestions or ()),
                    )
        return found

    def store_feedback(self, rows: Sequence[FeedbackRow]) -> int:
        """Insert all rows in one transaction (all or nothing); duplicates are skipped. Returns
        how many rows were new. Returns only after the commit (raises StoreUnavailable)."""
        received_at = self.clock()
        values = [
            {
                "dedup_key": row.dedup_key,
                "card_uuid": row.card_uuid,
                "outcome": row.outcome,
                "outcome_at": min(row.outcome_at, received_at),
                "received_at": received_at,
                "accepted_suggestions": list(row.accepted_suggestions),
                "override_reason_system": row.override_reason_system,
                "override_reason_code": row.override_reason_code,
                "override_has_comment": row.override_has_comment,
            }
            for row in {r.dedup_key: r for r in rows}.values()
        ]
        if not values:
            return 0
        inserted = 0
        # RETURNING names the rows actually inserted (rowcount is not reliable for INSERT on
        # every driver); conflicting duplicates return nothing.
        statement = self._insert_ignoring_duplicates(feedback_table, "dedup_key").returning(
            feedback_table.c.dedup_key
        )
        with self.feedback_transaction() as connection:
            for start in range(0, len(values), 200):
                result = connection.execute(statement.values(values[start : start + 200]))
                inserted += len(result.all())
        return inserted

    # -- analytics and retention ---------------------------------------------------------------

    def card_outcomes(self, since: datetime | None = None) -> Iterator[CardOutcome]:
        """Every card issued since `since` with its final feedback (the newest by outcome time).
        Raises StoreUnavailable."""
        query = (
            select(
                card_table.c.card_uuid,
                card_table.c.rule_id,
                card_table.c.issued_at,
                card_table.c.suggestions,
                feedback_table.c.outcome,
                feedback_table.c.accepted_suggestions,
                feedback_table.c.override_reason_system,
                feedback_table.c.override_reason_code,
            )
            .select_from(
                card_table.outerjoin(
                    feedback_table, feedback_table.c.card_uuid == card_table.c.card_uuid
                )
            )
            .order_by(card_table.c.id, feedback_table.c.outcome_at, feedback_table.c.id)
        )
        if since is not None:
            query = query.where(card_table.c.issued_at >= since)
        self.wait_for_recording()
        with self.feedback_transaction() as connection:
            # Streamed in batches: two years of cards need not fit in memory at once.
            rows = connection.execution_options(yield_per=2000).execute(query)
            yield from _final_outcomes(rows)

    def purge(self, older_than_days: int | None = None) -> tuple[int, int]:
        """Delete cards issued more than `older_than_days` (default: the retention setting) ago,
        with their feedback. Returns (cards, feedback) deleted. Raises StoreUnavailable."""
        days = self.options.retention_days if older_than_days is None else older_than_days
        cutoff = self.clock() - timedelta(days=days)
        old_cards = select(card_table.c.card_uuid).where(card_table.c.issued_at < cutoff)
        with self.feedback_transaction() as connection:
            feedback = connection.execute(
                delete(feedback_table).where(feedback_table.c.card_uuid.in_(old_cards))
            ).rowcount
            cards = connection.execute(
                delete(card_table).where(card_table.c.issued_at < cutoff)
            ).rowcount
        return cards, feedback


# SQLite "database is locked"; PostgreSQL lock_not_available, query_canceled (our timeouts).
_CONTENTION_SQLSTATES = {"55P03", "57014"}


def _is_contention(error: Exception) -> bool:
    original = getattr(error, "orig", None) or error
    if getattr(original, "sqlstate", None) in _CONTENTION_SQLSTATES:
        return True
    return "database is locked" in str(original)


def apply_memories(
    findings: Sequence[Any],
    hook: str,
    remembered: Mapping[str, RememberedOverride],
    shown_at_select: set[tuple[str, str, str]],
) -> list:
    """Pure part of `filter_findings`:
    - a not-recommended finding whose category the clinician overrode is dropped at the order
      hooks; at patient-view it stays, marked `suppressed_override` (to be mentioned, not warned);
    - the patient-view summary (`rpl-summary`) gets `remembered_overrides`, one entry per
      remembered override, so the summary card can mention them;
    - at order-sign, an order finding shown at order-select for the same order content is dropped.
    """
    kept = []
    for finding in findings:
        category = category_value(finding)
        if finding.rule_id in NOT_RECOMMENDED_RULES and category in remembered:
            if hook == "patient-view":
                override = remembered[category]
                params = dict(finding.params)
                params["suppressed_override"] = True
                params["overridden_on"] = override.overridden_at.date().isoformat()
                params["remembered_until"] = override.remembered_until.date().isoformat()
                kept.append(replace(finding, params=params))
            continue  # the order hooks do not repeat an overridden warning
        if finding.rule_id == SUMMARY_RULE and hook == "patient-view" and remembered:
            params = dict(finding.params)
            params["remembered_overrides"] = [o.as_param() for o in remembered.values()]
            kept.append(replace(finding, params=params))
            continue
        order = finding.order
        if order is not None and shown_at_select:
            key = (finding.rule_id, order_code_text(order), order_content_hash(order))
            if key in shown_at_select:
                continue
        kept.append(finding)
    return kept


def _final_outcomes(rows: Iterable) -> Iterator[CardOutcome]:
    current = None
    final: tuple | None = None
    for row in rows:
        if current is not None and row.card_uuid != current.card_uuid:
            yield _card_outcome(current, final)
            final = None
        current = row
        if row.outcome is not None:
            final = row
    if current is not None:
        yield _card_outcome(current, final)


def _card_outcome(card_row, final) -> CardOutcome:
    if final is None:
        return CardOutcome(card_row.rule_id, card_row.issued_at, None, None, False)
    reason = (
        f"{final.override_reason_system or ''}|{final.override_reason_code}"
        if final.outcome == "overridden" and final.override_reason_code
        else None
    )
    removing = {s["uuid"] for s in card_row.suggestions or () if s.get("removesOrder")}
    removed = final.outcome == "accepted" and bool(removing & set(final.accepted_suggestions or ()))
    return CardOutcome(card_row.rule_id, card_row.issued_at, final.outcome, reason, removed)


def init_app(app: Flask) -> None:
    """Register the `rpl_store` extension and bring the database schema up to date.

    A database that cannot be reached at start-up does not stop the service (hooks work without
    it); the upgrade is retried on the next request that needs the database.
    """
    store = Store(app, pseudonym_secret(app), store_options(app))
    if store.options.retention_days < store.options.override_memory_days:
        log.warning(
            "%sRETENTION_DAYS (%d) is shorter than %sOVERRIDE_MEMORY_DAYS (%d): overrides are "
            "forgotten when their cards are purged",
            PREFIX,
            store.options.retention_days,
            PREFIX,
            store.options.override_memory_days,
        )
    app.extensions["rpl_store"] = store
    try:
        store.ensure_schema()
    except DATABASE_ERRORS as error:
        store._note_failure(error, "start-up schema upgrade")


def get_store(app: Flask) -> Store:
    return app.extensions["rpl_store"]


def parse_since(value: str | None) -> datetime | None:
    """`YYYY-MM-DD` (start of that day, UTC) or a full RFC 3339 timestamp; None for None."""
    if value is None or value == "":
        return None
    try:
        if len(value) == 10:
            day = date.fromisoformat(value)
            return datetime(day.year, day.month, day.day, tzinfo=UTC)
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"not a date (YYYY-MM-DD): {value!r}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)
