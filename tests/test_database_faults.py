"""The database fails while the service runs; the service must not.

Policy under test (service/store.py, docs/reliability.md):
- hooks keep answering 200 with their cards, quickly, whatever the database does (they lose only
  the override memory, the select/sign de-duplication and the recording of the cards);
- feedback answers 503 with Retry-After, and is acknowledged (200) only after its commit: nothing
  acknowledged is ever lost;
- when the database is back the service recovers by itself (no restart): feedback is stored again
  and hooks record their cards again.

Faults, on real databases:
- SQLite: another connection holds the write lock (BEGIN EXCLUSIVE), as a backup or a purge
  running in another process would.
- PostgreSQL (127.0.0.1:5432, a database created for each test): connections refused
  (ALLOW_CONNECTIONS false, existing sessions terminated); the port closed then reopened, and the
  network going silent, both through a TCP proxy the test controls (`TcpProxy`).

tests/test_feedback.py covers the database that does not exist yet at start-up; tests/test_store.py
the store's own unit behaviour on a locked file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import select
import socket
import sqlite3
import threading
import time
from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit

import pytest
from sqlalchemy import create_engine, text

from service import create_app
from service.db import sqlalchemy_url
from tests.assertions import assert_outcome
from tests.hookdata import hook_request
from tests.test_feedback import overridden, post_feedback, rpl_prefetch, stamp, thrombophilia_order, warnings
from tests.test_store import count_rows, fresh_postgres_database

HOOK_URL = "/cds-services/rpl-order-select"
# A hook during a database fault may wait for the hook-path lock timeout (250 ms per statement),
# never for the feedback path's limits (seconds) or for the network.
HOOK_BUDGET_S = 1.5
RECOVERY_WAIT_S = 15.0  # the hook path retries the database 2 s after a failure

# The bugs these tests found and their fixes: docs/reliability.md section 4.


# ------------------------------------------------------------------------------------------------
# Helpers


def store_app(settings, url: str):
    app = create_app({"TESTING": True, "RPL_SETTINGS": dataclasses.replace(settings, database_url=url)})
    assert "rpl_store" in app.extensions
    return app


def call_hook(client, patient_id: str) -> tuple[list[dict], float]:
    """order-select for a thrombophilia test: one warning card. Returns (cards, seconds)."""
    body = hook_request("order-select", patient_id=patient_id, prefetch=rpl_prefetch(patient_id),
                        draft_orders=[thrombophilia_order(patient_id)])
    started = time.monotonic()
    with client.post(HOOK_URL, json=body) as response:  # closed: work after the answer runs now
        elapsed = time.monotonic() - started
        assert response.status_code == 200, response.get_data(as_text=True)[:1000]
        cards = response.get_json()["cards"]
    assert len(warnings(cards)) == 1, "the warning must be shown even without the database"
    return cards, elapsed


def feedback_item(card: dict, index: int) -> dict:
    """An override of `card` with its own outcomeTimestamp: a distinct feedback row."""
    moment = datetime(2025, 1, 1, tzinfo=UTC) + timedelta(milliseconds=index)
    return overridden(card, when=stamp(moment))


def assert_503(response) -> None:
    assert_outcome(response, 503)
    assert int(response.headers["Retry-After"]) > 0


def rows(url: str, query: str) -> list[tuple]:
    engine = create_engine(sqlalchemy_url(url))
    try:
        with engine.connect() as connection:
            return [tuple(row) for row in connection.execute(text(query))]
    finally:
        engine.dispose()


def stored_feedback_times(url: str) -> set[str]:
    found = set()
    for (moment,) in rows(url, "SELECT outcome_at FROM rpl_feedback"):
        if isinstance(moment, str):  # SQLite returns text for a raw query
            moment = datetime.fromisoformat(moment)
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        found.add(stamp(moment.astimezone(UTC)))
    return found


def eventually(check, timeout: float = RECOVERY_WAIT_S, interval: float = 0.25):
    """Call `check` until it returns a truthy value (returned) or the time is up (AssertionError)."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not recovered within {timeout} s")
        time.sleep(interval)


def with_watchdog(function, timeout: float):
    """Run `function` in a thread; (finished, result). A hung call leaves a daemon thread behind
    instead of hanging the test run."""
    outcome: dict = {}

    def run():
        try:
            outcome["result"] = function()
        except BaseException as error:  # noqa: BLE001 - re-raised in the test thread
            outcome["error"] = error

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        return False, None
    if "error" in outcome:
        raise outcome["error"]
    return True, outcome["result"]


# ------------------------------------------------------------------------------------------------
# Faults


@contextlib.contextmanager
def sqlite_write_lock(url: str, release_after: float | None = None):
    """Another connection holds the write lock until the block ends, or for `release_after`
    seconds (released from a timer thread, while the code under test may be waiting for it)."""
    blocker = sqlite3.connect(url.removeprefix("sqlite:///"), isolation_level=None, check_same_thread=False)
    blocker.execute("BEGIN EXCLUSIVE")
    released = threading.Event()

    def release():
        if not released.is_set():
            released.set()
            blocker.execute("ROLLBACK")
            blocker.close()

    timer = threading.Timer(release_after, release) if release_after is not None else None
    if timer is not None:
        timer.start()
    try:
        yield
    finally:
        if timer is not None:
            timer.join()
        release()


def _pg_admin_connection(url: str):
    import psycopg

    parts = urlsplit(url)
    return psycopg.connect(host=parts.hostname, port=5432, user=parts.username, dbname="postgres",
                           autocommit=True, connect_timeout=5)


@contextlib.contextmanager
def postgres_refusing(url: str):
    """The database refuses every connection, and its open sessions are killed."""
    name = urlsplit(url).path.lstrip("/")
    with _pg_admin_connection(url) as admin:
        admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                      "WHERE datname = %s AND pid <> pg_backend_pid()", (name,))
        try:
            yield
        finally:
            admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')


class TcpProxy:
    """A TCP forwarder on 127.0.0.1 in front of PostgreSQL that a test can break and mend:
    `close_port()` / `open_port()` (connection refused, same port afterwards), `cut()` (reset
    every open connection), and `mode = "silent"` (the network goes quiet: open connections
    carry nothing, new ones are accepted and never answered)."""

    def __init__(self, target: tuple[str, int] = ("127.0.0.1", 5432)):
        self.target = target
        self.mode = "forward"
        self.port = 0
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self._closed = threading.Event()
        self.open_port()

    def open_port(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(128)
        self.port = listener.getsockname()[1]
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def close_port(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        self.cut()

    def cut(self) -> None:
        with self._lock:
            sockets, self._sockets = self._sockets, set()
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                sock.close()

    def close(self) -> None:
        self._closed.set()
        self.close_port()

    def _track(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.add(sock)

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            self._track(client)
            if self.mode == "silent":
                continue  # accepted, never answered
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            self._track(upstream)
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()

    def _pump(self, one: socket.socket, other: socket.socket) -> None:
        try:
            while not self._closed.is_set():
                if self.mode == "silent":
                    time.sleep(0.02)
                    continue
                ready, _, _ = select.select([one, other], [], [], 0.05)
                for sock in ready:
                    data = sock.recv(65536)
                    if not data:
                        raise OSError("closed")
                    (other if sock is one else one).sendall(data)
        except (OSError, ValueError):
            for sock in (one, other):
                with contextlib.suppress(OSError):
                    sock.close()


@pytest.fixture
def postgres_url():
    with fresh_postgres_database() as url:
        yield url


@pytest.fixture
def proxied_postgres():
    """(service URL through the proxy, direct URL for checking, proxy)."""
    with fresh_postgres_database() as url:
        parts = urlsplit(url)
        proxy = TcpProxy((parts.hostname, parts.port or 5432))
        try:
            yield url.replace(f":{parts.port}/", f":{proxy.port}/"), url, proxy
        finally:
            proxy.close()


# ------------------------------------------------------------------------------------------------
# The common story: before, during and after the fault


def run_outage_story(settings, service_url: str, check_url: str, fault) -> None:
    app = store_app(settings, service_url)
    client = app.test_client()

    # Before: a card is issued and its feedback acknowledged.
    cards, _ = call_hook(client, "before")
    card = warnings(cards)[0]
    acknowledged = feedback_item(card, 1)
    assert post_feedback(client, [acknowledged]).status_code == 200
    cards_before = count_rows(check_url, "rpl_card")

    # During: hooks answer quickly with their warning; feedback is refused with 503.
    pending = feedback_item(card, 2)
    with fault():
        for index in range(3):
            _, elapsed = call_hook(client, f"during-{index}")
            assert elapsed < HOOK_BUDGET_S, f"hook took {elapsed:.2f} s during the fault"
        assert_503(post_feedback(client, [pending]))

    # After, without a restart: the client's retry is stored, hooks record their cards again.
    eventually(lambda: post_feedback(client, [pending]).status_code == 200)
    eventually(lambda: call_hook(client, "after") and count_rows(check_url, "rpl_card") > cards_before)
    assert stored_feedback_times(check_url) == {acknowledged["outcomeTimestamp"], pending["outcomeTimestamp"]}


def test_sqlite_write_lock_hooks_answer_feedback_503_then_recovery(settings, tmp_path):
    url = f"sqlite:///{tmp_path / 'locked.sqlite'}"
    run_outage_story(settings, url, url, lambda: sqlite_write_lock(url))


def test_cards_issued_while_sqlite_is_briefly_busy_still_take_feedback(settings, tmp_path):
    """Another process writes for 0.6 s (a purge, a backup, a burst of feedback in the other
    worker). Cards shown meanwhile must still be recorded, or the clinician's feedback on them is
    refused as "no such card" (400, which an EHR does not retry): feedback lost under load."""
    url = f"sqlite:///{tmp_path / 'busy.sqlite'}"
    client = store_app(settings, url).test_client()
    call_hook(client, "warm-up")
    with sqlite_write_lock(url, release_after=0.6):
        cards, elapsed = call_hook(client, "busy")
        assert elapsed < HOOK_BUDGET_S
    time.sleep(0.5)
    card = warnings(cards)[0]
    eventually(lambda: post_feedback(client, [feedback_item(card, 1)]).status_code == 200, timeout=5)


@pytest.mark.postgres
def test_postgres_refusing_connections_hooks_answer_feedback_503_then_recovery(settings, postgres_url):
    run_outage_story(settings, postgres_url, postgres_url, lambda: postgres_refusing(postgres_url))


@pytest.mark.postgres
def test_postgres_port_closed_then_back(settings, proxied_postgres):
    service_url, check_url, proxy = proxied_postgres

    @contextlib.contextmanager
    def port_closed():
        proxy.close_port()
        try:
            yield
        finally:
            proxy.open_port()

    run_outage_story(settings, service_url, check_url, port_closed)


@pytest.mark.postgres
def test_postgres_connections_reset_are_replaced_transparently(settings, proxied_postgres):
    """A database restart or failover resets every pooled connection. The next requests must not
    fail because of the dead connections: they are replaced (pre-ping) and work at once."""
    service_url, check_url, proxy = proxied_postgres
    client = store_app(settings, service_url).test_client()
    cards, _ = call_hook(client, "reset")
    assert post_feedback(client, [feedback_item(warnings(cards)[0], 1)]).status_code == 200
    proxy.cut()
    cards, _ = call_hook(client, "reset")
    assert post_feedback(client, [feedback_item(warnings(cards)[0], 2)]).status_code == 200
    assert len(stored_feedback_times(check_url)) == 2


@pytest.mark.postgres
def test_postgres_silent_network_hooks_still_answer(settings, proxied_postgres):
    """The network to the database goes quiet (no answer, no reset: a partition, a dropped VPN).
    Hooks must still answer within their budget; feedback must answer (503) rather than hang."""
    service_url, check_url, proxy = proxied_postgres
    client = store_app(settings, service_url).test_client()
    call_hook(client, "silent")  # pooled connections exist now
    proxy.mode = "silent"
    try:
        finished, result = with_watchdog(lambda: call_hook(client, "silent-2"), timeout=HOOK_BUDGET_S + 3)
        assert finished, "the hook hung on the silent database connection"
        assert result[1] < HOOK_BUDGET_S + 2
        finished, response = with_watchdog(
            lambda: post_feedback(client, [feedback_item({"uuid": "x" * 36}, 9)]), timeout=15)
        assert finished, "feedback hung on the silent database connection"
        assert response.status_code == 503
    finally:
        proxy.mode = "forward"  # lets any hung call finish
        proxy.cut()


# ------------------------------------------------------------------------------------------------
# The log during an outage: one warning, not a traceback per hook


@pytest.mark.postgres
def test_an_outage_is_logged_once_without_tracebacks(settings, postgres_url, caplog):
    client = store_app(settings, postgres_url).test_client()
    call_hook(client, "log")
    with postgres_refusing(postgres_url), caplog.at_level(logging.WARNING):
        caplog.clear()
        for index in range(3):
            call_hook(client, f"log-{index}")
            time.sleep(0.1)
    store_records = [r for r in caplog.records if r.name.startswith("service.store")]
    assert [r for r in store_records if r.levelno >= logging.ERROR] == [], [r.getMessage() for r in store_records]
    assert sum("database unavailable" in r.getMessage() for r in store_records) == 1


# ------------------------------------------------------------------------------------------------
# Concurrent feedback while the database fails and comes back: nothing acknowledged is lost


CLIENTS = 4


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def test_acknowledged_feedback_survives_an_outage_under_load(settings, tmp_path, backend):
    with contextlib.ExitStack() as stack:
        if backend == "sqlite":
            url = f"sqlite:///{tmp_path / 'load.sqlite'}"
            fault = lambda: sqlite_write_lock(url)  # noqa: E731
        else:
            url = stack.enter_context(fresh_postgres_database())
            fault = lambda: postgres_refusing(url)  # noqa: E731
        app = store_app(settings, url)
        cards, _ = call_hook(app.test_client(), "load")
        card = warnings(cards)[0]

        acknowledged: list[str] = []
        statuses: dict[int, int] = {}
        lock = threading.Lock()
        stop = threading.Event()

        def post_until_stopped(worker: int) -> None:
            client = app.test_client()
            index = 0
            while not stop.is_set():
                item = feedback_item(card, worker * 100_000 + index)
                index += 1
                response = post_feedback(client, [item])
                with lock:
                    statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
                    if response.status_code == 200:
                        acknowledged.append(item["outcomeTimestamp"])

        threads = [threading.Thread(target=post_until_stopped, args=(n,)) for n in range(CLIENTS)]
        for thread in threads:
            thread.start()
        time.sleep(0.7)
        with fault():
            time.sleep(1.0)
        time.sleep(1.0)
        stop.set()
        for thread in threads:
            thread.join(30)
        assert not any(thread.is_alive() for thread in threads)

        # Only 200 and 503 (while the fault lasted); every 200 is in the database.
        assert set(statuses) <= {200, 503}, statuses
        assert statuses.get(200, 0) > 10, statuses
        missing = set(acknowledged) - stored_feedback_times(url)
        assert not missing, f"{len(missing)} of {len(acknowledged)} acknowledged feedback items are lost"
