"""The card/feedback store on its own: pseudonyms, what is (not) stored, the memories, retention,
and the rule that a broken database never breaks a hook. Also home of the database-backend
helpers the other storage tests import (SQLite file / fresh PostgreSQL database)."""

from __future__ import annotations

import contextlib
import os
import stat
import uuid
from datetime import UTC, date, datetime, timedelta
from types import SimpleNamespace

import pytest
from flask import Flask
from sqlalchemy import create_engine, select, text

from cards.findings import Finding
from fhir_mappings.facts import Category, Intervention, InterventionState
from service import store as store_module
from service.config import ConfigError, Settings
from service.db import sqlalchemy_url
from tests.support.postgres import PostgresUnavailable, absent_database, scratch_database
from service.store import (
    Store,
    apply_memories,
    card_table,
    feedback_dedup_key,
    feedback_table,
    order_content_hash,
    pseudonym,
)

# ---------------------------------------------------------------------------------------------
# Backends: every storage test runs on SQLite and on the real PostgreSQL at 127.0.0.1:5432, each
# in a database of its own (a fresh `rplcds_test_<random>` database, dropped afterwards).

@contextlib.contextmanager
def _skipped_without_postgres(database: contextlib.AbstractContextManager):
    """Enter one of tests/support/postgres.py's databases; skip the test where PostgreSQL is not
    running."""
    with contextlib.ExitStack() as stack:
        try:
            entered = stack.enter_context(database)
        except PostgresUnavailable as error:
            pytest.skip(str(error))
        yield entered


def fresh_postgres_database():
    """Yields the URL of a new, empty database; drops it (forcibly) afterwards."""
    return _skipped_without_postgres(scratch_database("rplcds_test"))


def absent_postgres_database():
    """Yields (url, create): a database that does not exist until create() is called."""
    return _skipped_without_postgres(absent_database("rplcds_test"))


@contextlib.contextmanager
def database_url_for(backend: str, tmp_path):
    if backend == "sqlite":
        yield f"sqlite:///{tmp_path / 'store.sqlite'}"
    else:
        with fresh_postgres_database() as url:
            yield url


BACKENDS = [pytest.param("sqlite"), pytest.param("postgresql", marks=pytest.mark.postgres)]


@pytest.fixture(params=BACKENDS)
def backend_url(request, tmp_path):
    with database_url_for(request.param, tmp_path) as url:
        yield url


def count_rows(url: str, table: str) -> int:
    engine = create_engine(sqlalchemy_url(url))
    try:
        with engine.connect() as connection:
            return connection.execute(text(f"SELECT count(*) FROM {table}")).scalar_one()
    finally:
        engine.dispose()


# ---------------------------------------------------------------------------------------------
# A store on a bare Flask app (the hook-level behaviour is tested through the real endpoints in
# tests/test_feedback.py)


def bare_store(tmp_path, url: str, **setting_overrides) -> Store:
    app = Flask("service", instance_path=str(tmp_path / "instance"))
    os.makedirs(app.instance_path, exist_ok=True)
    settings = Settings(database_url=url, pseudonym_secret="store-test-secret-0123456789")
    app.config["RPL_SETTINGS"] = settings
    app.config.update(setting_overrides)
    store_module.init_app(app)
    return app.extensions["rpl_store"]


def hook_call(hook: str, patient_id: str = "patient-42", encounter_id: str | None = "enc-7"):
    service = SimpleNamespace(id=f"rpl-{hook}", hook=hook)
    return SimpleNamespace(
        service=service,
        hook_instance=str(uuid.uuid4()),
        patient_id=patient_id,
        user_id="Practitioner/dr-secret",
        encounter_id=encounter_id,
        today=date(2025, 6, 1),
    )


def draft_order(order_id: str = "order-99", code: str = "21668-9", **resource_extra):
    resource = {
        "resourceType": "ServiceRequest",
        "id": order_id,
        "status": "draft",
        "code": {"coding": [{"system": "http://loinc.org", "code": code}]},
        **resource_extra,
    }
    return Intervention(
        category=Category.THROMBOPHILIA_TEST,
        state=InterventionState.DRAFT,
        resource_ref=f"ServiceRequest/{order_id}",
        code_display="Factor V Leiden",
        code=("http://loinc.org", code),
        when=None,
        in_focus=True,
        resource=resource,
    )


def warning(order=None) -> Finding:
    order = order or draft_order()
    return Finding("not-recommended-test", {}, order, Category.THROMBOPHILIA_TEST)


def card_for(finding: Finding, *, removes: bool = True) -> dict:
    return {
        "uuid": str(uuid.uuid4()),
        "summary": "Not recommended",
        "indicator": "warning",
        "source": {"label": "x", "topic": {"code": finding.rule_id}},
        "suggestions": [
            {
                "label": "Remove",
                "uuid": str(uuid.uuid4()),
                "actions": [
                    {"type": "delete" if removes else "update", "description": "d",
                     "resourceId": "ServiceRequest/order-99"}
                ],
            }
        ],
        "selectionBehavior": "at-most-one",
    }


def feedback_row(card: dict, outcome: str = "overridden", at: datetime | None = None):
    at = at or datetime.now(UTC)
    suggestions = (card["suggestions"][0]["uuid"],) if outcome == "accepted" else ()
    return store_module.FeedbackRow(
        dedup_key=feedback_dedup_key(card["uuid"], outcome, at, suggestions),
        card_uuid=card["uuid"],
        outcome=outcome,
        outcome_at=at,
        accepted_suggestions=suggestions,
        override_reason_system=None,
        override_reason_code=None,
        override_has_comment=False,
    )


# ---------------------------------------------------------------------------------------------
# Pure parts


def test_pseudonym_is_keyed_and_stable():
    a = pseudonym(b"key-one", "patient", "123")
    assert a == pseudonym(b"key-one", "patient", "123")
    assert a != pseudonym(b"key-two", "patient", "123")
    assert a != pseudonym(b"key-one", "encounter", "123")
    assert "123" not in a and len(a) == 64


def test_dedup_key_ignores_timestamp_spelling_and_suggestion_order():
    z = datetime(2021, 12, 11, 10, 5, 31, tzinfo=UTC)
    plus_one = z.astimezone(__import__("zoneinfo").ZoneInfo("Europe/Amsterdam"))
    assert feedback_dedup_key("c", "accepted", z, ["b", "a"]) == feedback_dedup_key(
        "c", "accepted", plus_one, ["a", "b", "a"]
    )
    assert feedback_dedup_key("c", "accepted", z, ["a"]) != feedback_dedup_key(
        "c", "accepted", z + timedelta(seconds=1), ["a"]
    )


def test_order_hash_follows_code_dosage_and_reason_not_identity():
    base = draft_order("o1")
    same_content = draft_order("o2", status="active", authoredOn="2025-01-01")
    with_reason = draft_order("o1", reasonCode=[{"text": "venous thrombosis"}])
    other_code = draft_order("o1", code="13590-5")
    assert order_content_hash(base) == order_content_hash(same_content)
    assert order_content_hash(base) != order_content_hash(with_reason)
    assert order_content_hash(base) != order_content_hash(other_code)


def test_remembered_override_is_mentioned_at_patient_view_and_dropped_at_order_hooks():
    finding = warning()
    other = Finding("tsh-missing", {"variant": "default"})
    summary = Finding("rpl-summary", {"loss_count": 2})
    at = datetime(2025, 3, 4, 9, 0, tzinfo=UTC)
    remembered = {
        "thrombophilia-test": store_module.RememberedOverride(
            "not-recommended-test", "thrombophilia-test", at, at + timedelta(days=180)
        )
    }
    mentioned, kept_other, kept_summary = apply_memories(
        [finding, other, summary], "patient-view", remembered, set()
    )
    assert mentioned.rule_id == "not-recommended-test"
    assert mentioned.params["suppressed_override"] is True
    assert mentioned.params["overridden_on"] == "2025-03-04"
    assert mentioned.order is finding.order and mentioned.category == finding.category
    assert kept_other == other
    assert kept_summary.params == {
        "loss_count": 2,
        "remembered_overrides": [
            {"rule_id": "not-recommended-test", "category": "thrombophilia-test",
             "overridden_on": "2025-03-04", "remembered_until": "2025-08-31"}
        ],
    }
    assert apply_memories([summary], "patient-view", {}, set()) == [summary]
    for hook in ("order-select", "order-sign"):
        assert apply_memories([finding, other], hook, remembered, set()) == [other]


# ---------------------------------------------------------------------------------------------
# With a database


def test_recorded_rows_hold_no_clear_identifiers(tmp_path, backend_url):
    store = bare_store(tmp_path, backend_url)
    call = hook_call("order-select", patient_id="Patient-clear-id-777", encounter_id="Enc-555")
    finding = warning(draft_order("Order-clear-333"))
    card = card_for(finding)
    store.record_cards(call, [(finding, card)])
    store.store_feedback(
        [
            store_module.FeedbackRow(
                dedup_key="k" * 64, card_uuid=card["uuid"], outcome="overridden",
                outcome_at=datetime.now(UTC), accepted_suggestions=(),
                override_reason_system="http://example.org/reasons", override_reason_code="x",
                override_has_comment=True,
            )
        ]
    )
    with store.engine.connect() as connection:
        dump = repr(connection.execute(select(card_table)).all())
        dump += repr(connection.execute(select(feedback_table)).all())
    assert card["uuid"] in dump and "http://loinc.org|21668-9" in dump and "thrombophilia" in dump
    for clear in ("Patient-clear-id-777", "Enc-555", "Order-clear-333", "dr-secret"):
        assert clear not in dump


def test_override_memory_follows_latest_feedback_and_period(tmp_path, backend_url):
    store = bare_store(tmp_path, backend_url, RPL_OVERRIDE_MEMORY_DAYS=30)
    now = datetime.now(UTC)
    call = hook_call("order-select")
    shown = warning()
    card = card_for(shown)
    store.record_cards(call, [(shown, card)])
    assert store.filter_findings(hook_call("order-select"), None, [warning()]) == [warning()]

    store.store_feedback([feedback_row(card, "overridden", now - timedelta(minutes=5))])
    assert store.filter_findings(hook_call("order-sign"), None, [warning()]) == []
    # Another patient, or the same patient after the (configured) 30 days: warned again.
    assert store.filter_findings(hook_call("order-select", "someone-else"), None, [warning()])
    store.clock = lambda: now + timedelta(days=31)
    assert store.filter_findings(hook_call("order-select"), None, [warning()]) == [warning()]
    # Back to now: a later "accepted" (the clinician removed the order after all) ends it.
    store.clock = lambda: now
    store.store_feedback([feedback_row(card, "accepted", now - timedelta(minutes=1))])
    assert store.filter_findings(hook_call("order-select"), None, [warning()]) == [warning()]


def test_override_memory_can_be_switched_off(tmp_path):
    store = bare_store(tmp_path, f"sqlite:///{tmp_path / 'x.sqlite'}", RPL_OVERRIDE_MEMORY_DAYS=0)
    shown = warning()
    card = card_for(shown)
    store.record_cards(hook_call("order-select"), [(shown, card)])
    store.store_feedback([feedback_row(card, "overridden")])
    assert store.filter_findings(hook_call("order-select"), None, [warning()]) == [warning()]


def test_future_outcome_timestamp_does_not_stretch_the_memory(tmp_path):
    store = bare_store(tmp_path, f"sqlite:///{tmp_path / 'x.sqlite'}")
    now = datetime.now(UTC)
    shown = warning()
    card = card_for(shown)
    store.record_cards(hook_call("order-select"), [(shown, card)])
    store.store_feedback([feedback_row(card, "overridden", now + timedelta(days=365))])
    store.clock = lambda: now + timedelta(days=181)
    assert store.filter_findings(hook_call("order-select"), None, [warning()]) == [warning()]


def test_purge_deletes_old_cards_with_their_feedback(tmp_path, backend_url):
    store = bare_store(tmp_path, backend_url, RPL_RETENTION_DAYS=100)
    now = datetime.now(UTC)
    old, new = warning(), warning()
    old_card, new_card = card_for(old), card_for(new)
    store.clock = lambda: now - timedelta(days=101)
    store.record_cards(hook_call("order-select"), [(old, old_card)])
    store.store_feedback([feedback_row(old_card, "overridden", now - timedelta(days=101))])
    store.clock = lambda: now - timedelta(days=99)
    store.record_cards(hook_call("order-select"), [(new, new_card)])
    store.store_feedback([feedback_row(new_card, "overridden", now - timedelta(days=99))])
    store.clock = lambda: now
    assert store.purge() == (1, 1)
    assert count_rows(backend_url, "rpl_card") == 1
    assert count_rows(backend_url, "rpl_feedback") == 1
    assert store.purge(98) == (1, 1)
    assert count_rows(backend_url, "rpl_card") == 0


def test_a_broken_database_never_breaks_the_hook_path(tmp_path, caplog):
    url = f"sqlite:///{tmp_path / 'missing-dir' / 'db.sqlite'}"
    store = bare_store(tmp_path, url)
    store.retry_after_failure_s = 0
    finding = warning()
    assert store.filter_findings(hook_call("order-sign"), None, [finding]) == [finding]
    store.record_cards(hook_call("order-sign"), [(finding, card_for(finding))])  # no exception
    assert "database unavailable" in caplog.text
    with pytest.raises(store_module.StoreUnavailable):
        store.issued_cards(["x"])
    (tmp_path / "missing-dir").mkdir()
    store.record_cards(hook_call("order-sign"), [(finding, card_for(finding))])
    assert count_rows(url, "rpl_card") == 1
    assert "database available again" in caplog.text


def test_hook_path_gives_up_quickly_on_a_locked_sqlite_database(tmp_path):
    url = f"sqlite:///{tmp_path / 'locked.sqlite'}"
    store = bare_store(tmp_path, url)
    import sqlite3
    import time

    blocker = sqlite3.connect(tmp_path / "locked.sqlite", isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    try:
        finding = warning()
        started = time.monotonic()
        store.record_cards(hook_call("order-select"), [(finding, card_for(finding))])
        assert time.monotonic() - started < 2
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert count_rows(url, "rpl_card") == 0
    # Busy is not down: the very next call uses the database again (no back-off).
    store.record_cards(hook_call("order-select"), [(finding, card_for(finding))])
    assert count_rows(url, "rpl_card") == 1


def test_generated_secret_for_embedded_sqlite(tmp_path):
    app = Flask("service", instance_path=str(tmp_path / "instance"))
    os.makedirs(app.instance_path)
    app.config["RPL_SETTINGS"] = Settings(database_url=f"sqlite:///{tmp_path / 'x.sqlite'}")
    first = store_module.pseudonym_secret(app)
    assert first == store_module.pseudonym_secret(app)
    path = tmp_path / "instance" / store_module.SECRET_FILE_NAME
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and len(first) >= 32


def test_external_database_requires_a_configured_secret(tmp_path):
    app = Flask("service", instance_path=str(tmp_path / "instance"))
    app.config["RPL_SETTINGS"] = Settings(database_url="postgresql://u@127.0.0.1:1/db")
    with pytest.raises(ConfigError, match="RPL_CDS_PSEUDONYM_SECRET"):
        store_module.pseudonym_secret(app)


def test_bad_environment_values_name_the_variable(tmp_path, monkeypatch):
    from service.config import settings_from_env

    def app_from_env():
        app = Flask("service", instance_path=str(tmp_path / "instance"))
        settings = settings_from_env()
        app.config.update(RPL_SETTINGS=settings, **settings.as_flask_config())
        return app

    monkeypatch.setenv("RPL_CDS_OVERRIDE_MEMORY_DAYS", "half a year")
    with pytest.raises(ConfigError, match="RPL_CDS_OVERRIDE_MEMORY_DAYS"):
        store_module.store_options(app_from_env())
    monkeypatch.setenv("RPL_CDS_OVERRIDE_MEMORY_DAYS", "90")
    monkeypatch.setenv("RPL_CDS_SELECT_SIGN_DEDUP", "off")
    monkeypatch.setenv("RPL_CDS_RETENTION_DAYS", "365")
    assert store_module.store_options(app_from_env()) == store_module.StoreOptions(90, False, 365)


def test_purge_command(tmp_path, monkeypatch, capsys):
    url = f"sqlite:///{tmp_path / 'purge.sqlite'}"
    store = bare_store(tmp_path, url)
    now = datetime.now(UTC)
    for age in (800, 400, 10):
        store.clock = lambda age=age: now - timedelta(days=age)
        finding = warning()
        store.record_cards(hook_call("order-select"), [(finding, card_for(finding))])
    monkeypatch.setenv("RPL_CDS_DATABASE_URL", url)
    monkeypatch.setenv("RPL_CDS_AUTH", "disabled")
    monkeypatch.setenv("RPL_CDS_PSEUDONYM_SECRET", "store-test-secret-0123456789")
    from service.cli import main

    assert main(["purge"]) == 0  # default retention: 730 days
    assert "deleted 1 cards and 0 feedback items older than 730 days" in capsys.readouterr().out
    assert main(["purge", "--older-than", "30"]) == 0
    assert "deleted 1 cards" in capsys.readouterr().out
    assert count_rows(url, "rpl_card") == 1
    with pytest.raises(SystemExit):
        main(["purge", "--older-than", "0"])
    assert main(["report", "--since", "yesterday"]) == 2


def test_a_database_from_a_newer_release_disables_the_store_not_the_service(tmp_path, caplog):
    url = f"sqlite:///{tmp_path / 'newer.sqlite'}"
    engine = create_engine(url)
    with engine.begin() as connection:
        connection.execute(text("CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL)"))
        connection.execute(text("INSERT INTO alembic_version VALUES ('9999')"))
    engine.dispose()
    store = bare_store(tmp_path, url)
    finding = warning()
    assert store.filter_findings(hook_call("order-sign"), None, [finding]) == [finding]
    with pytest.raises(store_module.StoreUnavailable):
        store.issued_cards(["x"])
    assert "9999" in caplog.text


def test_a_large_batch_of_cards_is_written_in_full_and_duplicates_are_skipped(tmp_path, backend_url):
    """The card writer's batches span several multi-row INSERTs (service/store.py); a card
    already recorded (a client resending the same hook answer) is skipped, not an error."""
    store = bare_store(tmp_path, backend_url)
    findings = [warning(draft_order(f"order-{n}")) for n in range(450)]
    cards = [card_for(finding) for finding in findings]
    for finding, card in zip(findings, cards):
        store.record_cards_in_background(hook_call("order-select"), [(finding, card)])
    store.record_cards_in_background(hook_call("order-select"), [(findings[0], cards[0])])
    store.wait_for_recording()
    assert count_rows(backend_url, "rpl_card") == 450
    assert set(store.issued_cards(card["uuid"] for card in cards[:3])) == {c["uuid"] for c in cards[:3]}


def test_cards_issued_while_the_hook_path_backs_off_are_still_recorded(tmp_path, backend_url):
    """The back-off after a failed or too slow read spares the hooks; the card writer works after
    the answer and must not drop the cards queued meanwhile. Its success ends the outage."""
    store = bare_store(tmp_path, backend_url)
    store.retry_after_failure_s = 60
    store._note_too_slow("filter_findings")  # as a read that overran the hook's budget does
    finding = warning(draft_order("order-during-back-off"))
    assert store.filter_findings(hook_call("order-sign"), None, [finding]) == [finding]  # skipped
    store.record_cards_in_background(hook_call("order-select"), [(finding, card_for(finding))])
    store.wait_for_recording()
    assert count_rows(backend_url, "rpl_card") == 1
    assert not store._outage


def test_the_jwt_replay_check_waits_its_own_time_for_a_sqlite_lock_not_a_hooks(tmp_path):
    """A pooled SQLite connection keeps the lock wait its last user set (a hook reads with
    250 ms); the JWT replay check sets its own (service/db.py set_busy_timeout), so a write lock
    held for under a second does not make it fail closed."""
    import sqlite3
    import threading
    import time

    from service.db import engine_for, set_busy_timeout
    from service.replay import ReplayStore

    url = f"sqlite:///{tmp_path / 'replay.sqlite'}"
    store = bare_store(tmp_path, url)
    engine = engine_for(store._app)
    replay = ReplayStore(lambda: engine)
    assert replay.claim("a" * 64, int(time.time()) + 60)  # schema ready, connection pooled
    raw = engine.raw_connection()
    set_busy_timeout(raw, store_module.HOOK_LOCK_WAIT_MS)  # as a hook leaves it
    raw.close()
    locked = threading.Event()

    def hold_the_write_lock():
        blocker = sqlite3.connect(tmp_path / "replay.sqlite", isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")
        locked.set()
        time.sleep(0.8)
        blocker.execute("ROLLBACK")
        blocker.close()

    holder = threading.Thread(target=hold_the_write_lock)
    holder.start()
    assert locked.wait(5), "the other connection never took the write lock"
    try:
        assert replay.claim("b" * 64, int(time.time()) + 60)
    finally:
        holder.join()
