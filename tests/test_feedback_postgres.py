"""Feedback under the production server: gunicorn with several workers (each its own process and
connection pool), many clients posting at once, on PostgreSQL and on SQLite. Nothing that was
acknowledged with 200 may be missing, and nothing may be stored twice."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import pytest
import requests

from tests.hookdata import hook_request
from tests.test_feedback import rpl_prefetch, thrombophilia_order, warnings
from tests.test_gunicorn import start_gunicorn, stop
from tests.test_store import count_rows, database_url_for

pytestmark = pytest.mark.slow

CARDS = 12
THREADS = 8
POSTS_PER_THREAD = 25


def issue_cards(base: str, count: int) -> list[dict]:
    cards = []
    for index in range(count):
        patient_id = f"gp{index}"
        body = hook_request(
            "order-select",
            patient_id=patient_id,
            prefetch=rpl_prefetch(patient_id),
            draft_orders=[thrombophilia_order(patient_id)],
        )
        response = requests.post(f"{base}/cds-services/rpl-order-select", json=body, timeout=10)
        assert response.status_code == 200, response.text
        cards.extend(warnings(response.json()["cards"]))
    assert len(cards) == count
    return cards


@pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]
)
def test_concurrent_feedback_from_several_workers_loses_nothing(tmp_path, backend):
    with database_url_for(backend, tmp_path) as url:
        proc, base = start_gunicorn(tmp_path, {"RPL_CDS_DATABASE_URL": url}, workers=2)
        try:
            cards = issue_cards(base, CARDS)
            start = datetime(2025, 1, 1, tzinfo=UTC)
            acknowledged = 0
            statuses: dict[int, int] = {}
            lock = threading.Lock()

            def post_many(thread: int) -> None:
                nonlocal acknowledged
                session = requests.Session()
                for index in range(POSTS_PER_THREAD):
                    card = cards[(thread + index) % len(cards)]
                    # Distinct timestamps make every item a distinct feedback; every fifth post
                    # also repeats the previous item (a client retry) in the same batch.
                    when = start + timedelta(milliseconds=thread * 10_000 + index)
                    item = {
                        "card": card["uuid"],
                        "outcome": "overridden",
                        "outcomeTimestamp": when.isoformat(timespec="milliseconds").replace(
                            "+00:00", "Z"
                        ),
                    }
                    batch = [item, item] if index % 5 == 0 else [item]
                    response = session.post(
                        f"{base}/cds-services/rpl-order-select/feedback",
                        json={"feedback": batch},
                        timeout=30,
                    )
                    with lock:
                        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
                        if response.status_code == 200:
                            assert response.json()["stored"] == 1
                            acknowledged += 1

            with ThreadPoolExecutor(THREADS) as pool:
                list(pool.map(post_many, range(THREADS)))
        finally:
            stop(proc)
        assert statuses == {200: THREADS * POSTS_PER_THREAD}, statuses
        assert count_rows(url, "rpl_feedback") == acknowledged
        assert count_rows(url, "rpl_card") == CARDS


@pytest.mark.postgres
def test_gunicorn_start_up_migrates_postgres_once_with_preload(tmp_path):
    """With preload the master migrates before forking; the workers find the schema current."""
    with database_url_for("postgresql", tmp_path) as url:
        proc, base = start_gunicorn(tmp_path, {"RPL_CDS_DATABASE_URL": url}, workers=3)
        try:
            (card,) = issue_cards(base, 1)
            response = requests.post(
                f"{base}/cds-services/rpl-order-select/feedback",
                json={"feedback": [{"card": card["uuid"], "outcome": "overridden",
                                    "outcomeTimestamp": "2025-01-01T00:00:00Z"}]},
                timeout=10,
            )
            assert response.status_code == 200
        finally:
            stop(proc)
        output = proc.log_path.read_text()
        assert output.count("database schema upgraded") == 1, output
        assert "Traceback" not in output, output
        assert count_rows(url, "alembic_version") == 1


@pytest.mark.postgres
def test_service_refuses_postgres_without_a_pseudonym_secret(tmp_path):
    with database_url_for("postgresql", tmp_path) as url:
        with pytest.raises(AssertionError, match="RPL_CDS_PSEUDONYM_SECRET"):
            start_gunicorn(
                tmp_path, {"RPL_CDS_DATABASE_URL": url, "RPL_CDS_PSEUDONYM_SECRET": ""}, workers=1
            )
