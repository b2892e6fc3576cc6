"""SIGTERM to gunicorn while hook calls are in flight (a deploy, a scale-down, `docker stop`):
every request already being handled is finished and answered (200 or 412, never a connection
reset), and the master exits 0 within gunicorn's graceful timeout.

The in-flight requests are made slow by the FHIR fallback: no prefetch, and a real FHIR-like server
on 127.0.0.1 that answers each query after ~500 ms (RPL_CDS_DEADLINE_MS=2000, local mode).
"""

from __future__ import annotations

import re
import signal
import threading
import time
from urllib.parse import parse_qs, urlsplit

import pytest
import requests

from tests.hookdata import hook_request, miscarriage, patient, searchset
from tests.support.scripted_server import ScriptedServer
from tests.test_gunicorn import start_gunicorn

pytestmark = pytest.mark.slow

SLOW_ANSWER_S = 0.5
IN_FLIGHT = 8  # 2 workers x 4 threads (gunicorn.conf.py): every request has a thread
GRACEFUL_TIMEOUT_S = 20  # gunicorn.conf.py default (RPL_CDS_GRACEFUL_TIMEOUT)


def patient_of(path: str) -> str | None:
    """The patient a FHIR query is about: 'Patient/p3' or '...?patient=p3'."""
    parts = urlsplit(path)
    if "/Patient/" in parts.path:
        return parts.path.rsplit("/", 1)[1]
    return parse_qs(parts.query).get("patient", [None])[0]


def slow_fhir(handler) -> None:
    """A correct FHIR server that takes SLOW_ANSWER_S for every answer."""
    if handler.scripted.release.wait(SLOW_ANSWER_S):
        return
    path = urlsplit(handler.path).path
    who = patient_of(handler.path) or "p0"
    if "/Patient/" in path:
        handler.send_json(200, patient(who))
    elif "/Practitioner/" in path:
        handler.send_json(404, {"resourceType": "OperationOutcome",
                                "issue": [{"severity": "error", "code": "not-found"}]})
    elif path.endswith("/Condition"):
        handler.send_json(200, searchset([miscarriage("a", "2023-03-01", who), miscarriage("b", "2024-01-10", who)]))
    else:
        handler.send_json(200, searchset([]))


@pytest.fixture
def slow_server():
    with ScriptedServer(slow_fhir) as server:
        yield server


def test_sigterm_finishes_in_flight_requests_and_exits_0(tmp_path, slow_server):
    proc, base = start_gunicorn(
        tmp_path,
        {"RPL_CDS_DEADLINE_MS": "2000", "RPL_CDS_LOCAL_MODE": "1", "RPL_CDS_LOG_LEVEL": "WARNING"},
        workers=2,
    )
    outcomes: dict[str, object] = {}
    lock = threading.Lock()

    def call(patient_id: str) -> None:
        body = hook_request(patient_id=patient_id, fhir_server=slow_server.base_url, access_token="tok")
        try:
            response = requests.post(f"{base}/cds-services/rpl-patient-view", json=body, timeout=30)
            result: object = (response.status_code, response.json())
        except requests.RequestException as error:
            result = error
        with lock:
            outcomes[patient_id] = result

    patients = [f"p{i}" for i in range(IN_FLIGHT)]
    threads = [threading.Thread(target=call, args=(p,)) for p in patients]
    try:
        for thread in threads:
            thread.start()
        # In flight = the service is already querying the FHIR server for that patient.
        deadline = time.monotonic() + 10
        while {patient_of(r.path) for r in slow_server.requests} < set(patients):
            assert time.monotonic() < deadline, "the hook calls never reached the FHIR server"
            time.sleep(0.01)
        sent_at = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        for thread in threads:
            thread.join(GRACEFUL_TIMEOUT_S + 10)
        exit_code = proc.wait(timeout=GRACEFUL_TIMEOUT_S + 10)
        stopped_after = time.monotonic() - sent_at
    except BaseException:
        proc.kill()
        raise

    log = proc.log_path.read_text()
    failures = {p: o for p, o in outcomes.items() if not isinstance(o, tuple)}
    assert not failures, f"in-flight requests not answered: {failures}\n{log[-3000:]}"
    assert len(outcomes) == IN_FLIGHT
    for patient_id, (status, body) in outcomes.items():
        assert status in (200, 412), (patient_id, status, body)
        if status == 200:
            assert any(c["source"]["topic"]["code"] == "rpl-summary" for c in body["cards"])
        else:
            assert body["resourceType"] == "OperationOutcome"
    assert exit_code == 0, log[-3000:]
    assert stopped_after < GRACEFUL_TIMEOUT_S, f"shutdown took {stopped_after:.1f} s"
    assert not re.search(r"WORKER TIMEOUT|SIGKILL|Traceback", log), log[-3000:]
