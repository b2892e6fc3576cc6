"""Schema migrations: a database made by the previous schema (revision 0001) is upgraded with its
data intact; the head schema is exactly what the code declares; concurrent start-ups are safe."""

from __future__ import annotations

import multiprocessing
import uuid
from datetime import UTC, datetime, timedelta

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, inspect, text

import service.replay  # noqa: F401  (declares jwt_replay on the shared metadata)
import service.store  # noqa: F401
from service.db import metadata
from service.migrations import current_revision, head_revision, upgrade, upgrade_to_head
from tests.test_store import backend_url, bare_store, sqlalchemy_url  # noqa: F401 (fixture)

PREVIOUS = "0001"


def _engine(url: str):
    return create_engine(sqlalchemy_url(url))


def _insert_previous_schema_rows(engine) -> tuple[str, str]:
    card_uuid, suggestion = str(uuid.uuid4()), str(uuid.uuid4())
    issued = datetime.now(UTC) - timedelta(days=3)
    with engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO rpl_card (card_uuid, service_id, hook, rule_id, indicator, "
                "hook_instance, issued_at, patient_pseudonym, order_ref_pseudonym, order_code, "
                "category, suggestions) VALUES (:u, 'rpl-order-select', 'order-select', "
                "'not-recommended-test', 'warning', 'hi-1', :t, :p, NULL, "
                "'http://loinc.org|21668-9', 'thrombophilia-test', :s)"
            ),
            {
                "u": card_uuid,
                "t": issued.replace(tzinfo=None) if engine.dialect.name == "sqlite" else issued,
                "p": "a" * 64,
                "s": f'[{{"uuid": "{suggestion}", "removesOrder": true}}]',
            },
        )
        connection.execute(
            text(
                "INSERT INTO rpl_feedback (dedup_key, card_uuid, outcome, outcome_at, received_at, "
                "accepted_suggestions, override_has_comment) VALUES "
                "(:k, :u, 'accepted', :t, :t, :s, :f)"
            ),
            {
                "k": "k" * 64,
                "u": card_uuid,
                "t": issued.replace(tzinfo=None) if engine.dialect.name == "sqlite" else issued,
                "s": f'["{suggestion}"]',
                "f": False,
            },
        )
        connection.execute(
            text("INSERT INTO jwt_replay (key_hash, expires_at) VALUES (:k, :t)"),
            {"k": "r" * 64, "t": issued.replace(tzinfo=None) if engine.dialect.name == "sqlite" else issued},
        )
    return card_uuid, suggestion


def test_upgrade_from_previous_schema_keeps_the_data(tmp_path, backend_url):
    engine = _engine(backend_url)
    try:
        upgrade(engine, PREVIOUS)
        assert current_revision(engine) == PREVIOUS
        assert "encounter_pseudonym" not in {c["name"] for c in inspect(engine).get_columns("rpl_card")}
        card_uuid, suggestion = _insert_previous_schema_rows(engine)

        upgrade_to_head(engine)
        assert current_revision(engine) == head_revision() != PREVIOUS
        with engine.connect() as connection:
            row = connection.execute(
                text("SELECT rule_id, order_code, encounter_pseudonym, order_hash FROM rpl_card "
                     "WHERE card_uuid = :u"), {"u": card_uuid}
            ).one()
            assert tuple(row) == ("not-recommended-test", "http://loinc.org|21668-9", None, None)
            assert connection.execute(text("SELECT count(*) FROM rpl_feedback")).scalar_one() == 1
            assert connection.execute(text("SELECT count(*) FROM jwt_replay")).scalar_one() == 1
        indexes = {i["name"] for i in inspect(engine).get_indexes("rpl_card")}
        assert "ix_rpl_card_select_sign" in indexes
    finally:
        engine.dispose()

    # The service works on the upgraded database: old card + feedback are counted, new cards
    # are recorded with the new columns.
    store = bare_store(tmp_path, backend_url)
    outcomes = list(store.card_outcomes())
    assert [(o.rule_id, o.outcome, o.removed_order) for o in outcomes] == [
        ("not-recommended-test", "accepted", True)
    ]
    issued = store.issued_cards([card_uuid])
    assert issued[card_uuid].suggestion_uuids == {suggestion}


def test_head_schema_matches_the_declared_tables(backend_url):
    engine = _engine(backend_url)
    try:
        upgrade_to_head(engine)
        with engine.connect() as connection:
            context = MigrationContext.configure(
                connection, opts={"compare_type": True, "compare_server_default": False}
            )
            differences = compare_metadata(context, metadata)
        assert differences == []
    finally:
        engine.dispose()


def test_downgrade_and_upgrade_again(backend_url):
    from alembic import command

    from service.migrations import alembic_config

    engine = _engine(backend_url)
    try:
        upgrade_to_head(engine)
        with engine.begin() as connection:
            command.downgrade(alembic_config(connection), PREVIOUS)
        assert current_revision(engine) == PREVIOUS
        upgrade_to_head(engine)
        assert current_revision(engine) == head_revision()
    finally:
        engine.dispose()


def _upgrade_in_child(url: str, barrier) -> str | None:
    barrier.wait(timeout=30)
    engine = create_engine(url)
    try:
        upgrade_to_head(engine)
        return current_revision(engine)
    finally:
        engine.dispose()


def test_concurrent_start_ups_do_not_break(backend_url):
    """Several processes (as several gunicorn masters or replicas would) upgrade an empty
    database at the same moment: the lock lets one do it, the others find it done."""
    processes = 4
    context = multiprocessing.get_context("spawn")
    with context.Manager() as manager:
        barrier = manager.Barrier(processes)
        with context.Pool(processes) as pool:
            results = pool.starmap(
                _upgrade_in_child, [(sqlalchemy_url(backend_url), barrier)] * processes
            )
    assert results == [head_revision()] * processes
    engine = _engine(backend_url)
    try:
        with engine.connect() as connection:
            versions = connection.execute(text("SELECT version_num FROM alembic_version")).all()
        assert versions == [(head_revision(),)]
    finally:
        engine.dispose()


def test_revisions_form_one_line_with_one_head():
    from alembic.script import ScriptDirectory

    from service.migrations import alembic_config

    scripts = ScriptDirectory.from_config(alembic_config())
    assert scripts.get_heads() == [head_revision()]
    assert [s.revision for s in scripts.walk_revisions()] == [head_revision(), "0001"]


def test_migrate_command(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RPL_CDS_DATABASE_URL", f"sqlite:///{tmp_path / 'cli.sqlite'}")
    monkeypatch.setenv("RPL_CDS_AUTH", "disabled")
    monkeypatch.setenv("RPL_CDS_PSEUDONYM_SECRET", "migrate-test-secret-0123456789")
    from service.cli import main

    assert main(["migrate"]) == 0
    assert f"revision {head_revision()}" in capsys.readouterr().out
