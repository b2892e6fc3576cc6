"""One large hook at a time per worker (service/large_bodies.py): memory stays bounded, small
hooks never wait, answers that need no body never wait, and a request that cannot get a turn
gets a 503 OperationOutcome."""

from __future__ import annotations

import threading
import time

from service.errors import ApiError, operation_outcome
from service.large_bodies import LARGE_BODY_BYTES, LargeBodyGate
from service.validation import validator


class SlowApp:
    """Work that takes 0.2 s inside the gate and records how many requests it held at once."""

    def __init__(self):
        self.active = 0
        self.most_at_once = 0
        self.lock = threading.Lock()

    def __call__(self):
        with self.lock:
            self.active += 1
            self.most_at_once = max(self.most_at_once, self.active)
        time.sleep(0.2)
        with self.lock:
            self.active -= 1


def call(gate, app, length: int | None, results: list, chunked: bool = False):
    """One request through the gate, as the hook view takes it: (status, OperationOutcome)."""
    environ = {"CONTENT_LENGTH": "" if length is None else str(length)}
    if chunked:
        environ["HTTP_TRANSFER_ENCODING"] = "chunked"
    try:
        with gate.turn(environ):
            app()
        results.append((200, None))
    except ApiError as error:
        results.append((error.status, (operation_outcome(error.status, error.message), error.headers)))


def run_at_once(gate, app, lengths, chunked=False):
    results: list = []
    threads = [threading.Thread(target=call, args=(gate, app, n, results, chunked)) for n in lengths]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_large_bodies_take_turns_and_small_ones_do_not_wait():
    app = SlowApp()
    run_at_once(LargeBodyGate(at_once=1), app, [LARGE_BODY_BYTES + 1] * 3)
    assert app.most_at_once == 1
    app = SlowApp()
    run_at_once(LargeBodyGate(at_once=1), app, [LARGE_BODY_BYTES] * 3)  # not over the threshold
    assert app.most_at_once == 3


def test_a_chunked_body_of_unknown_length_counts_as_large():
    app = SlowApp()
    run_at_once(LargeBodyGate(at_once=1), app, [None] * 2, chunked=True)
    assert app.most_at_once == 1


def test_a_request_that_gets_no_turn_in_time_is_answered_503_with_an_outcome():
    gate = LargeBodyGate(at_once=1, wait_limit_s=0.05)
    results = run_at_once(gate, SlowApp(), [LARGE_BODY_BYTES + 1] * 2)
    statuses = sorted(status for status, _ in results)
    assert statuses == [200, 503]
    body, headers = next(detail for status, detail in results if status == 503)
    assert headers == {"Retry-After": "1"}
    # The same OperationOutcome shape as every other error (service/errors.py).
    assert body["resourceType"] == "OperationOutcome" and "busy" in body["issue"][0]["details"]["text"]
    validator("operation-outcome.schema.json").validate(body)


def test_answers_that_need_no_body_never_wait_for_a_large_hooks_turn(app, client):
    """A declared size over the limit (413), another media type (415), an unknown service (404)
    are answered at once while another large hook holds the worker's only turn."""
    gate = app.extensions["rpl_large_bodies"]
    held = threading.Event()
    release = threading.Event()

    def hold_the_turn():
        with gate.turn({"CONTENT_LENGTH": str(LARGE_BODY_BYTES + 1)}):
            held.set()
            release.wait(10)

    holder = threading.Thread(target=hold_the_turn)
    holder.start()
    try:
        assert held.wait(5)
        too_large = b" " * (app.config["RPL_SETTINGS"].max_body_bytes + 1)
        response = client.post("/cds-services/rpl-patient-view", data=too_large,
                               headers={"Content-Type": "application/json"})
        assert response.status_code == 413
        response = client.post("/cds-services/rpl-patient-view", data=b"x" * (LARGE_BODY_BYTES + 1),
                               headers={"Content-Type": "text/plain"})
        assert response.status_code == 415
        response = client.post("/cds-services/no-such-service", data=b"x" * (LARGE_BODY_BYTES + 1),
                               headers={"Content-Type": "application/json"})
        assert response.status_code == 404
    finally:
        release.set()
        holder.join()


def test_the_service_answers_a_large_hook_through_the_gate(client, monkeypatch):
    from service import large_bodies
    from tests.hookdata import full_prefetch, hook_request

    turns_ended = []
    monkeypatch.setattr(large_bodies, "give_back_free_memory", lambda: turns_ended.append(True))
    body = hook_request("patient-view", prefetch=full_prefetch([]))
    body["extension"] = {"padding": "x" * (LARGE_BODY_BYTES + 10)}
    response = client.post("/cds-services/rpl-patient-view", json=body)
    assert response.status_code == 200, response.get_data(as_text=True)
    assert "cards" in response.get_json()
    assert turns_ended == [True]  # it took (and gave back) the gate's one turn


def test_worker_malloc_settings_apply_on_glibc():
    import platform

    from service.malloc_tuning import tune_worker_malloc

    if platform.libc_ver()[0] != "glibc":
        import pytest

        pytest.skip("glibc only")
    assert tune_worker_malloc() is True


def test_freed_memory_is_handed_back_after_a_large_hook_only(monkeypatch):
    import service.large_bodies as large_bodies

    trims = []
    monkeypatch.setattr(large_bodies, "give_back_free_memory", lambda: trims.append(1))
    gate = LargeBodyGate(at_once=1)
    run_at_once(gate, SlowApp(), [100])
    assert trims == []
    run_at_once(gate, SlowApp(), [LARGE_BODY_BYTES + 1])
    assert trims == [1]
