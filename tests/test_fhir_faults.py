"""The whole hook against FHIR servers that misbehave, with NO prefetch: every key must come from
the client's FHIR server, a real HTTP server on 127.0.0.1 scripted to fail (ScriptedServer).

Policy under test (docs/reliability.md):
- required data that cannot be had -> 412 with an OperationOutcome naming exactly those keys;
- the optional `practitioner` that cannot be had -> 200, cards in the default language (Dutch);
- the answer comes within the hook deadline, whatever the server does: RPL_CDS_DEADLINE_MS is
  300 ms here, and every answer must come within DEADLINE + MARGIN_S.

The client-level behaviour (one deadline, paging, redirects, size caps) is unit-tested in
tests/test_fhir_client.py; this file checks what the EHR sees from the hook.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from urllib.parse import parse_qs, urlsplit

import pytest

from service.validation import validator
from tests.assertions import assert_outcome
from tests.conftest import make_app
from tests.hookdata import SEARCH_KEYS, hook_request, miscarriage, patient, searchset
from tests.support.scripted_server import ScriptedServer

DEADLINE_MS = 300
# Scheduling slack on a busy 2-core machine (thread start, the hook's own work after the deadline).
MARGIN_S = 0.5
TOKEN = "fault-test-access-token"
PATIENT_ID = "p1"
REQUIRED_KEYS = {"patient", *SEARCH_KEYS}
LOSSES = [miscarriage("loss-1", "2023-03-01"), miscarriage("loss-2", "2024-01-10")]
ENGLISH_PRACTITIONER = {
    "resourceType": "Practitioner",
    "id": "dr1",
    "communication": [{"coding": [{"system": "urn:ietf:bcp:47", "code": "en"}]}],
}


# ------------------------------------------------------------------------------------------------
# A healthy FHIR server, and the faults layered on top of it


def resource_type_of(path: str) -> str:
    """'/fhir/Condition?patient=p1' -> 'Condition'; '/fhir/Patient/p1' -> 'Patient'."""
    return urlsplit(path).path.removeprefix("/fhir/").split("/")[0]


def healthy(handler) -> None:
    """Answers as a correct FHIR server holding a patient with two miscarriages, whose user
    (Practitioner/dr1) reads English."""
    kind = resource_type_of(handler.path)
    if kind == "Patient":
        handler.send_json(200, patient(PATIENT_ID))
    elif kind == "Practitioner":
        handler.send_json(200, ENGLISH_PRACTITIONER)
    elif kind == "Condition":
        handler.send_json(200, searchset(LOSSES))
    else:
        handler.send_json(200, searchset([]))


def failing(kinds: set[str], fault):
    """A responder: `fault(handler)` for requests for these resource types, healthy otherwise."""

    def respond(handler):
        if "*" in kinds or resource_type_of(handler.path) in kinds:
            fault(handler)
        else:
            healthy(handler)

    return respond


def status(code: int, body: object | None = None):
    def fault(handler):
        handler.send_json(code, body or {"resourceType": "OperationOutcome",
                                          "issue": [{"severity": "error", "code": "exception"}]})
    return fault


def hang(handler) -> None:
    handler.scripted.release.wait(10)  # never answers within the deadline; ends when the server closes


def malformed_json(handler) -> None:
    handler.send_bytes(200, b'{"resourceType": "Bundle", "entry": [')


def html_error_page(handler) -> None:
    handler.send_bytes(200, b"<html><body>Service Unavailable</body></html>", "text/html")


def trickle(handler) -> None:
    """Headers at once, then one byte of a valid body every 100 ms: never complete in time."""
    body = json.dumps(searchset([])).encode()
    handler.send_response(200)
    handler.send_header("Content-Type", "application/fhir+json")
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    for byte in body:
        if handler.scripted.release.wait(0.1):
            return
        handler.wfile.write(bytes([byte]))
        handler.wfile.flush()


def cut_off(handler) -> None:
    """Promises 10,000 bytes, sends 20, closes the connection."""
    handler.send_response(200)
    handler.send_header("Content-Type", "application/fhir+json")
    handler.send_header("Content-Length", "10000")
    handler.end_headers()
    handler.wfile.write(b'{"resourceType": "Bu')
    handler.wfile.flush()
    handler.close_connection = True


# ------------------------------------------------------------------------------------------------
# Calling the hook


@pytest.fixture
def fault_app(settings):
    return make_app(settings, deadline_ms=DEADLINE_MS)


def call_hook(app, fhir_server: str):
    """POST a patient-view request without any prefetch; return (response, seconds it took)."""
    body = hook_request("patient-view", patient_id=PATIENT_ID, fhir_server=fhir_server, access_token=TOKEN)
    started = time.monotonic()
    response = app.test_client().post("/cds-services/rpl-patient-view", json=body)
    return response, time.monotonic() - started


def assert_in_time(elapsed: float, deadline_ms: int = DEADLINE_MS) -> None:
    assert elapsed < deadline_ms / 1000 + MARGIN_S, f"answered after {elapsed:.3f} s"


def assert_412_naming(response, keys: set[str], *fragments: str) -> dict:
    body = assert_outcome(response, 412, *fragments)
    named = {e.removeprefix("prefetch.") for issue in body["issue"] for e in issue["expression"]}
    assert named == keys
    assert TOKEN not in json.dumps(body)
    return body


def topics(response) -> list[str]:
    assert response.status_code == 200, response.get_data(as_text=True)[:1000]
    validator("hook-response.schema.json").validate(response.get_json())
    return [card["source"]["topic"]["code"] for card in response.get_json()["cards"]]


def summary_of(response) -> str:
    cards = response.get_json()["cards"]
    return next(c["summary"] for c in cards if c["source"]["topic"]["code"] == "rpl-summary")


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # closed again on leaving: connections are refused


# ------------------------------------------------------------------------------------------------
# The healthy baseline: every key fetched, cards in the user's language


def test_healthy_server_gives_cards_in_the_users_language(fault_app):
    with ScriptedServer(healthy) as server:
        response, elapsed = call_hook(fault_app, server.base_url)
    assert "rpl-summary" in topics(response)
    assert "Recurrent miscarriage" in summary_of(response)
    assert_in_time(elapsed)
    fetched = {resource_type_of(r.path) for r in server.requests}
    assert fetched == {"Patient", "Practitioner", "Condition", "Observation", "ServiceRequest",
                       "MedicationRequest", "MedicationAdministration", "Procedure", "FamilyMemberHistory"}
    assert all(r.headers.get("Authorization") == f"Bearer {TOKEN}" for r in server.requests)


# ------------------------------------------------------------------------------------------------
# The whole server fails: 412 naming every required key, within the deadline


def test_refused_connection_is_412_naming_every_required_key(fault_app):
    response, elapsed = call_hook(fault_app, f"http://127.0.0.1:{closed_port()}/fhir")
    assert_412_naming(response, REQUIRED_KEYS, "could not connect")
    assert_in_time(elapsed)


WHOLE_SERVER_FAULTS = {
    "timeout-past-the-deadline": (hang, "timed out"),
    "http-500": (status(500), "HTTP 500"),
    "http-401": (status(401), "HTTP 401"),
    "http-503-html": (lambda h: h.send_bytes(503, b"<h1>down</h1>", "text/html"), "HTTP 503"),
    "malformed-json": (malformed_json, "not JSON"),
    "html-instead-of-json": (html_error_page, "not JSON"),
    "body-trickles-in": (trickle, "timed out"),
    "connection-cut-mid-body": (cut_off, "cut off"),
}


@pytest.mark.parametrize(("fault", "reason"), WHOLE_SERVER_FAULTS.values(), ids=WHOLE_SERVER_FAULTS.keys())
def test_whole_server_fault_is_412_within_the_deadline(fault_app, fault, reason):
    with ScriptedServer(failing({"*"}, fault)) as server:
        response, elapsed = call_hook(fault_app, server.base_url)
    assert_412_naming(response, REQUIRED_KEYS, reason)
    assert_in_time(elapsed)


@pytest.mark.parametrize("hook", ["order-select", "order-sign"])
def test_order_hooks_answer_412_within_the_deadline_too(fault_app, hook):
    with ScriptedServer(failing({"*"}, hang)) as server:
        body = hook_request(hook, patient_id=PATIENT_ID, fhir_server=server.base_url, access_token=TOKEN,
                            draft_orders=[{"resourceType": "ServiceRequest", "id": "o1", "status": "draft",
                                           "intent": "order", "subject": {"reference": "Patient/p1"},
                                           "code": {"coding": [{"system": "http://loinc.org", "code": "21668-9"}]}}])
        started = time.monotonic()
        response = fault_app.test_client().post(f"/cds-services/rpl-{hook}", json=body)
        elapsed = time.monotonic() - started
    assert_412_naming(response, REQUIRED_KEYS, "timed out")
    assert_in_time(elapsed)


# ------------------------------------------------------------------------------------------------
# One key fails: 412 names only that key; the optional practitioner never causes a 412


@pytest.mark.parametrize(
    ("kind", "key"),
    [("Condition", "conditions"), ("Observation", "observations"), ("Patient", "patient"),
     ("FamilyMemberHistory", "familyHistory")],
)
def test_one_failing_search_is_412_naming_only_its_key(fault_app, kind, key):
    with ScriptedServer(failing({kind}, status(500))) as server:
        response, elapsed = call_hook(fault_app, server.base_url)
    assert_412_naming(response, {key}, "HTTP 500")
    assert_in_time(elapsed)


def test_one_slow_search_is_412_naming_only_its_key_within_the_deadline(fault_app):
    with ScriptedServer(failing({"Procedure"}, hang)) as server:
        response, elapsed = call_hook(fault_app, server.base_url)
    assert_412_naming(response, {"procedures"}, "timed out")
    assert_in_time(elapsed)


PRACTITIONER_FAULTS = {
    "timeout": hang,
    "http-500": status(500),
    "http-401": status(401),
    "not-found": status(404),
    "gone": status(410),
    "malformed-json": malformed_json,
    "wrong-resource-type": lambda h: h.send_json(200, patient("dr1")),
}


# Here the eight other queries must all be answered before the deadline, not only fail in time:
# 300 ms was once too short for that on a busy 2-core machine (every query timed out).
ANSWERED_DEADLINE_MS = 1000


@pytest.mark.parametrize("fault", PRACTITIONER_FAULTS.values(), ids=PRACTITIONER_FAULTS.keys())
def test_practitioner_fault_gives_cards_in_the_default_language(settings, fault):
    """The user's Practitioner only chooses the card language: without it, Dutch (the default)."""
    app = make_app(settings, deadline_ms=ANSWERED_DEADLINE_MS)
    with ScriptedServer(failing({"Practitioner"}, fault)) as server:
        response, elapsed = call_hook(app, server.base_url)
    assert "rpl-summary" in topics(response)
    assert "Herhaalde miskraam" in summary_of(response)
    assert_in_time(elapsed, ANSWERED_DEADLINE_MS)


# ------------------------------------------------------------------------------------------------
# Paging: a loop, and a huge searchset


def test_paging_loop_is_412_within_the_deadline(fault_app):
    def looping(handler):
        if resource_type_of(handler.path) == "Condition":
            page = searchset(LOSSES)
            # Page 1 links to page 2, and page 2 links back to page 1.
            target = "Condition?patient=p1" if "page=2" in handler.path else "Condition?patient=p1&page=2"
            page["link"] = [{"relation": "next", "url": f"{handler.scripted.base_url}/{target}"}]
            handler.send_json(200, page)
        else:
            healthy(handler)

    with ScriptedServer(looping) as server:
        response, elapsed = call_hook(fault_app, server.base_url)
        condition_requests = [r for r in server.requests if resource_type_of(r.path) == "Condition"]
    assert_412_naming(response, {"conditions"}, "paging loop")
    assert_in_time(elapsed)
    assert len(condition_requests) == 2  # the repeated page is not fetched again


HUGE_ENTRIES = 5000
PAGE_SIZE = 500


def huge_searchset_server(delay_per_page_s: float = 0.0) -> ScriptedServer:
    """5,000 Conditions over 10 pages of 500; the two miscarriages are on the LAST page, so they
    count only when every page was read."""
    unrelated = [
        {"resourceType": "Condition", "id": f"other-{i}", "subject": {"reference": "Patient/p1"},
         "code": {"coding": [{"system": "http://example.org/fhir/CodeSystem/test", "code": f"unrelated-{i}"}]},
         "onsetDateTime": "2020-01-01"}
        for i in range(HUGE_ENTRIES - len(LOSSES))
    ]
    everything = unrelated + LOSSES
    pages = [everything[i : i + PAGE_SIZE] for i in range(0, HUGE_ENTRIES, PAGE_SIZE)]
    encoded: dict[int, bytes] = {}

    def respond(handler):
        if resource_type_of(handler.path) != "Condition":
            return healthy(handler)
        query = parse_qs(urlsplit(handler.path).query)
        number = int(query.get("page", ["1"])[0])
        if number not in encoded:
            page = searchset(pages[number - 1])
            page["total"] = HUGE_ENTRIES
            if number < len(pages):
                page["link"] = [{"relation": "next",
                                 "url": f"{handler.scripted.base_url}/Condition?patient=p1&page={number + 1}"}]
            encoded[number] = json.dumps(page).encode()
        if delay_per_page_s and handler.scripted.release.wait(delay_per_page_s):
            return
        handler.send_bytes(200, encoded[number])

    return ScriptedServer(respond)


@pytest.mark.parametrize("deadline_ms", [DEADLINE_MS, 2000])
def test_huge_searchset_is_read_in_full_or_412_within_the_deadline(settings, deadline_ms, record_property):
    """5,000 entries over 10 pages: either every page is read (both losses on the last page are
    counted) or the answer is 412 for `conditions`; both within the deadline. Measured times are
    in docs/reliability.md."""
    app = make_app(settings, deadline_ms=deadline_ms)
    with huge_searchset_server() as server:
        response, elapsed = call_hook(app, server.base_url)
    record_property("huge_searchset_seconds", round(elapsed, 3))
    assert_in_time(elapsed, deadline_ms)
    if response.status_code == 200:
        assert "(2 losses)" in summary_of(response)
    else:
        assert_412_naming(response, {"conditions"})
    if deadline_ms == 2000:
        # Two seconds is ample for 5,000 entries on loopback: a 412 here would mean paging is slow.
        assert response.status_code == 200, response.get_data(as_text=True)[:500]


def test_huge_searchset_on_a_slow_server_is_412_within_the_deadline(fault_app):
    with huge_searchset_server(delay_per_page_s=0.05) as server:
        response, elapsed = call_hook(fault_app, server.base_url)
    assert_412_naming(response, {"conditions"}, "timed out")
    assert_in_time(elapsed)


def test_more_pages_than_the_configured_cap_is_412(settings):
    app = make_app(settings, deadline_ms=2000, max_fhir_pages=5)
    with huge_searchset_server() as server:
        response, elapsed = call_hook(app, server.base_url)
    assert_412_naming(response, {"conditions"}, "more than 5 pages")
    assert_in_time(elapsed, 2000)


# ------------------------------------------------------------------------------------------------
# Redirects: never followed, the token never leaves the FHIR server's origin


@pytest.mark.parametrize("code", [301, 302, 307, 308])
def test_redirect_is_not_followed_and_is_412(fault_app, code):
    with ScriptedServer(healthy) as elsewhere:
        def redirect(handler):
            handler.send_bytes(code, b"", headers={"Location": elsewhere.base_url + urlsplit(handler.path).path})

        with ScriptedServer(failing({"*"}, redirect)) as server:
            response, elapsed = call_hook(fault_app, server.base_url)
        assert_412_naming(response, REQUIRED_KEYS, f"HTTP {code}")
        assert_in_time(elapsed)
        assert elsewhere.requests == []  # neither the request nor the token went there


def test_same_origin_redirect_is_not_followed_either(fault_app):
    def respond(handler):
        if handler.path.startswith("/fhir/"):
            handler.send_bytes(302, b"", headers={"Location": "/moved" + handler.path})
        else:
            healthy(handler)

    with ScriptedServer(respond) as server:
        response, elapsed = call_hook(fault_app, server.base_url)
        moved = [r for r in server.requests if r.path.startswith("/moved")]
    assert_412_naming(response, REQUIRED_KEYS, "HTTP 302")
    assert moved == []


# ------------------------------------------------------------------------------------------------
# Many hook calls against one hanging server at once: each still answers within its deadline


def test_concurrent_calls_to_a_hanging_server_each_answer_within_the_deadline(fault_app):
    """16 hook calls at once, each with 8 queries that hang: 128 queries for a process-wide pool
    of 16 threads. Each call must still give its 412 by its own deadline."""
    results: list[tuple[int, float]] = []
    lock = threading.Lock()

    def one_call(server_url):
        response, elapsed = call_hook(fault_app, server_url)
        with lock:
            results.append((response.status_code, elapsed))

    with ScriptedServer(failing({"*"}, hang)) as server:
        threads = [threading.Thread(target=one_call, args=(server.base_url,)) for _ in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
    assert len(results) == 16
    assert {code for code, _ in results} == {412}
    slowest = max(elapsed for _, elapsed in results)
    assert slowest < DEADLINE_MS / 1000 + 2 * MARGIN_S, f"slowest call took {slowest:.3f} s"
