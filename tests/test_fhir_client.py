"""service.fhir_client against real servers: the Medplum FHIR server, and small HTTP servers on
127.0.0.1 that misbehave the way a real EHR's FHIR server sometimes does."""

from __future__ import annotations

import logging
import socket
import threading
import time
import uuid

import pytest

from service import fhir_client
from service.fhir_client import complete_paged_bundle, fetch_queries
from tests.support.fhir_server import PAGED_DEFAULT_COUNT, transaction
from tests.support.scripted_server import ScriptedServer

TOKEN = "secret-access-token-9f8e7d"
LOINC = "http://loinc.org"
TSH = "3016-3"
MARGIN_S = 0.35  # scheduling slack on a busy 2-core CI machine; the deadlines tested are 0.5-1 s


def soon(seconds: float = 5.0) -> float:
    return time.monotonic() + seconds


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def tsh_observation(patient_id: str, date: str) -> dict:
    return {
        "resourceType": "Observation", "id": new_id("obs"), "status": "final",
        "code": {"coding": [{"system": LOINC, "code": TSH}]},
        "subject": {"reference": f"Patient/{patient_id}"}, "effectiveDateTime": date,
    }


def entry_ids(bundle: dict) -> list[str]:
    return [entry["resource"]["id"] for entry in bundle.get("entry", [])]


def searchset(resources: list[dict], next_url: str | None = None) -> dict:
    bundle = {"resourceType": "Bundle", "type": "searchset", "total": len(resources),
              "entry": [{"resource": r} for r in resources]}
    if next_url:
        bundle["link"] = [{"relation": "next", "url": next_url}]
    return bundle


@pytest.fixture
def session():
    """A fresh pooled session per test, so connection-reuse checks see only their own requests."""
    with fhir_client.FhirConnections() as fresh:
        yield fresh


@pytest.fixture
def patient_with_tsh(fhir_server):
    patient_id = new_id("p")
    observations = [tsh_observation(patient_id, f"2024-0{m}-01") for m in range(1, 4)]
    other = tsh_observation(new_id("other"), "2024-01-01")
    fhir_server.load(transaction([
        {"resourceType": "Patient", "id": patient_id, "gender": "female"}, *observations, other,
    ]))
    return patient_id, {o["id"] for o in observations}


# --- against the real FHIR server ---


def test_reads_and_searches_come_back_from_the_fhir_server(fhir_server, patient_with_tsh, session):
    patient_id, tsh_ids = patient_with_tsh
    outcomes = fetch_queries(
        fhir_server.base_url,
        {
            "patient": f"Patient/{patient_id}",
            "tsh": f"Observation?patient={patient_id}&code={LOINC}|{TSH}",
            "conditions": f"Condition?patient={patient_id}",
        },
        access_token=TOKEN, deadline=soon(), session=session,
    )
    assert all(o.ok and o.status == 200 for o in outcomes.values()), outcomes
    assert outcomes["patient"].data["id"] == patient_id
    assert set(entry_ids(outcomes["tsh"].data)) == tsh_ids
    assert outcomes["conditions"].data["resourceType"] == "Bundle"
    assert entry_ids(outcomes["conditions"].data) == []


@pytest.mark.parametrize("base_suffix, query_prefix", [("", ""), ("/", ""), ("/", "/"), ("", "/")])
def test_base_url_and_query_join_with_or_without_slashes(fhir_server, patient_with_tsh, session,
                                                         base_suffix, query_prefix):
    patient_id, _ = patient_with_tsh
    outcome = fetch_queries(
        fhir_server.base_url + base_suffix, {"patient": f"{query_prefix}Patient/{patient_id}"},
        access_token=None, deadline=soon(), session=session,
    )["patient"]
    assert outcome.ok and outcome.data["id"] == patient_id


def test_a_read_of_an_unknown_resource_is_no_data_not_an_error(fhir_server, session):
    outcome = fetch_queries(fhir_server.base_url, {"patient": f"Patient/{new_id('nobody')}"},
                            access_token=None, deadline=soon(), session=session)["patient"]
    assert outcome.ok
    assert outcome.data is None
    assert outcome.status == 404


def test_all_pages_of_a_search_are_merged(fhir_server_paged, session):
    patient_id = new_id("p")
    stored = [tsh_observation(patient_id, f"2024-0{m}-01") for m in range(1, 6)]
    fhir_server_paged.load(transaction(stored))
    query = f"Observation?patient={patient_id}&_sort=date"
    first_page = fhir_server_paged.get(query).json()
    assert len(first_page["entry"]) == PAGED_DEFAULT_COUNT  # so the merge below needed 3 pages

    outcome = fetch_queries(fhir_server_paged.base_url, {"tsh": query}, access_token=None,
                            deadline=soon(), session=session)["tsh"]

    assert outcome.ok, outcome.error
    assert entry_ids(outcome.data) == [o["id"] for o in stored]  # all 5, in server order, once each
    assert [link["relation"] for link in outcome.data["link"]] == ["self"]
    assert outcome.data["total"] == 5


def test_more_pages_than_the_cap_is_an_error(fhir_server_paged, session):
    patient_id = new_id("p")
    fhir_server_paged.load(transaction([tsh_observation(patient_id, f"2024-0{m}-01") for m in range(1, 6)]))
    outcome = fetch_queries(fhir_server_paged.base_url, {"tsh": f"Observation?patient={patient_id}"},
                            access_token=None, deadline=soon(), max_pages=2, session=session)["tsh"]
    assert not outcome.ok
    assert outcome.data is None
    assert "more than 2 pages" in outcome.error


@pytest.mark.parametrize("base_suffix", ["", "/"])
def test_a_prefetched_first_page_is_completed_from_the_server(fhir_server_paged, session, base_suffix):
    patient_id = new_id("p")
    stored = [tsh_observation(patient_id, f"2024-0{m}-01") for m in range(1, 6)]
    fhir_server_paged.load(transaction(stored))
    prefetched = fhir_server_paged.get(f"Observation?patient={patient_id}&_sort=date").json()

    outcome = complete_paged_bundle(prefetched, base_url=fhir_server_paged.base_url + base_suffix,
                                    access_token=TOKEN, deadline=soon(), session=session)

    assert outcome.ok, outcome.error
    assert entry_ids(outcome.data) == [o["id"] for o in stored]


def test_a_prefetched_page_is_not_completed_without_a_known_fhir_server():
    with ScriptedServer(lambda r: r.send_json(200, searchset([]))) as other:
        bundle = searchset([], next_url=f"{other.base_url}/Observation?page=2")
        outcome = complete_paged_bundle(bundle, base_url=None, access_token=TOKEN, deadline=soon())
    assert not outcome.ok
    assert other.requests == []


# --- headers ---


def test_token_goes_as_bearer_header_and_accept_asks_for_fhir_json(session):
    with ScriptedServer(lambda r: r.send_json(200, {"resourceType": "Patient", "id": "p1"})) as server:
        fetch_queries(server.base_url, {"patient": "Patient/p1"}, access_token=TOKEN,
                      deadline=soon(), session=session)
        fetch_queries(server.base_url, {"patient": "Patient/p1"}, access_token=None,
                      deadline=soon(), session=session)
    with_token, without_token = server.requests
    assert with_token.path == "/fhir/Patient/p1"
    assert with_token.headers["Authorization"] == f"Bearer {TOKEN}"
    assert with_token.headers["Accept"] == "application/fhir+json"
    assert "Authorization" not in without_token.headers


def test_a_next_link_to_another_origin_is_not_followed_and_gets_no_token(session):
    with ScriptedServer(lambda r: r.send_json(200, searchset([]))) as elsewhere:
        page = searchset([{"resourceType": "Observation", "id": "o1"}],
                         next_url=f"{elsewhere.base_url}/Observation?page=2")
        with ScriptedServer(lambda r: r.send_json(200, page)) as server:
            fetched = fetch_queries(server.base_url, {"obs": "Observation?patient=p1"},
                                    access_token=TOKEN, deadline=soon(), session=session)["obs"]
            completed = complete_paged_bundle(page, base_url=server.base_url, access_token=TOKEN,
                                              deadline=soon(), session=session)
    assert len(server.requests) == 1  # the search; complete_paged_bundle made none
    for outcome in (fetched, completed):
        assert not outcome.ok
        assert "another server" in outcome.error
    assert elsewhere.requests == []


def test_redirects_are_not_followed(session):
    with ScriptedServer(lambda r: r.send_json(200, {"resourceType": "Patient", "id": "p1"})) as elsewhere:
        def redirect(request):
            request.send_bytes(302, b"", headers={"Location": f"{elsewhere.base_url}/Patient/p1"})

        with ScriptedServer(redirect) as server:
            outcome = fetch_queries(server.base_url, {"patient": "Patient/p1"}, access_token=TOKEN,
                                    deadline=soon(), session=session)["patient"]
    assert not outcome.ok and outcome.status == 302
    assert elsewhere.requests == []


def test_a_token_that_is_not_a_header_value_is_refused_before_any_request(session):
    bad_token = "abc\r\nX-Injected: 1"
    with ScriptedServer(lambda r: r.send_json(200, {"resourceType": "Patient", "id": "p1"})) as server:
        outcome = fetch_queries(server.base_url, {"patient": "Patient/p1"}, access_token=bad_token,
                                deadline=soon(), session=session)["patient"]
    assert not outcome.ok
    assert "abc" not in outcome.error
    assert server.requests == []


# --- failures ---


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]  # nothing listens there once the socket is closed


def test_a_refused_connection_is_an_error(session):
    outcome = fetch_queries(f"http://127.0.0.1:{closed_port()}/fhir", {"patient": "Patient/p1"},
                            access_token=TOKEN, deadline=soon(), session=session)["patient"]
    assert not outcome.ok
    assert outcome.status is None
    assert "could not connect" in outcome.error


def test_a_slow_server_cannot_hold_the_call_past_the_deadline(session):
    def slow(request):
        if "slow" in request.path:
            request.scripted.release.wait(10)
        request.send_json(200, {"resourceType": "Patient", "id": "p1"})

    with ScriptedServer(slow) as server:
        deadline = time.monotonic() + 0.5
        outcomes = fetch_queries(server.base_url, {"slow": "Patient/slow", "fast": "Patient/fast"},
                                 access_token=TOKEN, deadline=deadline, session=session)
        returned = time.monotonic()
    assert returned < deadline + MARGIN_S
    assert outcomes["fast"].ok  # what was answered in time is kept
    assert not outcomes["slow"].ok
    assert "timed out" in outcomes["slow"].error


def test_a_body_that_trickles_in_is_dropped_at_the_deadline(session):
    hung_up = threading.Event()

    def trickle(request):
        request.send_response(200)
        request.send_header("Content-Type", "application/fhir+json")
        request.send_header("Content-Length", "100000")
        request.end_headers()
        request.wfile.write(b'{"resourceType": "Patient", "id": "')
        try:
            while not request.scripted.release.wait(0.02):
                request.wfile.write(b"x")
        except OSError:
            hung_up.set()

    with ScriptedServer(trickle) as server:
        deadline = time.monotonic() + 0.5
        outcome = fetch_queries(server.base_url, {"patient": "Patient/p1"}, access_token=None,
                                deadline=deadline, session=session)["patient"]
        returned = time.monotonic()
        # Not only the caller: the worker thread itself stops reading and frees its connection.
        assert hung_up.wait(deadline + MARGIN_S - time.monotonic())
    assert returned < deadline + MARGIN_S
    assert not outcome.ok and "timed out" in outcome.error


def test_a_call_returns_by_its_deadline_even_when_every_worker_is_busy(session):
    """The pool is bounded: queries beyond it wait for a worker, but never past their deadline."""
    def stuck(request):
        request.scripted.release.wait(10)
        request.send_json(200, searchset([]))

    busy = {f"q{i}": f"Observation?n={i}" for i in range(fhir_client.MAX_PARALLEL_QUERIES)}
    with ScriptedServer(stuck) as stuck_server, \
            ScriptedServer(lambda r: r.send_json(200, {"resourceType": "Patient", "id": "p1"})) as fast_server:
        background = threading.Thread(target=fetch_queries, args=(stuck_server.base_url, busy),
                                      kwargs={"access_token": None, "deadline": soon(10)})
        background.start()
        while stuck_server.max_concurrent < len(busy):
            time.sleep(0.01)
        deadline = time.monotonic() + 0.3
        outcome = fetch_queries(fast_server.base_url, {"patient": "Patient/p1"}, access_token=None,
                                deadline=deadline, session=session)["patient"]
        returned = time.monotonic()
        stuck_server.release.set()
        background.join(5)
    assert returned < deadline + MARGIN_S
    assert not outcome.ok and "timed out" in outcome.error
    assert fast_server.requests == []  # the queued query was dropped, not sent late


def test_no_request_is_made_when_the_deadline_has_passed(session):
    with ScriptedServer(lambda r: r.send_json(200, {"resourceType": "Patient", "id": "p1"})) as server:
        outcome = fetch_queries(server.base_url, {"patient": "Patient/p1"}, access_token=None,
                                deadline=time.monotonic() - 0.001, session=session)["patient"]
    assert not outcome.ok and "timed out" in outcome.error
    assert server.requests == []


@pytest.mark.parametrize(
    "status, body, expected",
    [
        (500, b"<html>Internal Server Error</html>", "HTTP 500"),
        (401, b'{"resourceType": "OperationOutcome", "issue": []}', "HTTP 401 (not authorized)"),
        (403, b"", "HTTP 403 (forbidden)"),
        (200, b'{"resourceType": "Patient", "id": ', "not JSON"),
        (200, b"<html>login</html>", "not JSON"),
        (200, b'[{"resourceType": "Patient"}]', "not a FHIR resource"),
        (200, b'{"id": "p1"}', "not a FHIR resource"),
        (200, b'{"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "security"}]}',
         "OperationOutcome (security)"),
        (200, b'{"resourceType": "Observation", "id": "p1"}', "expected a Patient resource"),
    ],
)
def test_bad_answers_are_errors_with_a_short_reason(session, status, body, expected):
    with ScriptedServer(lambda r: r.send_bytes(status, body)) as server:
        outcome = fetch_queries(server.base_url, {"patient": "Patient/p1"}, access_token=TOKEN,
                                deadline=soon(), session=session)["patient"]
    assert not outcome.ok
    assert outcome.data is None
    assert outcome.status == status
    assert expected in outcome.error


def test_a_search_answering_with_a_single_resource_is_an_error(session):
    with ScriptedServer(lambda r: r.send_json(200, {"resourceType": "Patient", "id": "p1"})) as server:
        outcome = fetch_queries(server.base_url, {"obs": "Observation?patient=p1"}, access_token=None,
                                deadline=soon(), session=session)["obs"]
    assert not outcome.ok and "expected a searchset Bundle" in outcome.error


def test_a_search_bundle_holding_an_error_outcome_is_an_error(session):
    incomplete = searchset([
        {"resourceType": "Observation", "id": "o1"},
        {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "too-costly"}]},
    ])
    with ScriptedServer(lambda r: r.send_json(200, incomplete)) as server:
        outcome = fetch_queries(server.base_url, {"obs": "Observation?patient=p1"}, access_token=None,
                                deadline=soon(), session=session)["obs"]
    assert not outcome.ok and "too-costly" in outcome.error


def test_a_paging_loop_is_detected(session):
    def pages(request):
        base = request.scripted.base_url
        if "page=2" in request.path:
            request.send_json(200, searchset([{"resourceType": "Observation", "id": "o2"}],
                                             next_url=f"{base}/Observation?patient=p1&page=1"))
        else:
            request.send_json(200, searchset([{"resourceType": "Observation", "id": "o1"}],
                                             next_url=f"{base}/Observation?patient=p1&page=2"))

    with ScriptedServer(pages) as server:
        outcome = fetch_queries(server.base_url, {"obs": "Observation?patient=p1&page=1"},
                                access_token=None, deadline=soon(), session=session)["obs"]
    assert not outcome.ok and "paging loop" in outcome.error
    assert len(server.requests) == 2


def test_a_resource_repeated_on_the_next_page_is_kept_once(session):
    """Offset paging shifts when data changes between pages; the merge must not double-count."""
    def pages(request):
        base = request.scripted.base_url
        if "page=2" in request.path:
            request.send_json(200, searchset([{"resourceType": "Observation", "id": "o2"},
                                              {"resourceType": "Observation", "id": "o3"}]))
        else:
            request.send_json(200, searchset([{"resourceType": "Observation", "id": "o1"},
                                              {"resourceType": "Observation", "id": "o2"}],
                                             next_url=f"{base}/Observation?patient=p1&page=2"))

    with ScriptedServer(pages) as server:
        outcome = fetch_queries(server.base_url, {"obs": "Observation?patient=p1"}, access_token=None,
                                deadline=soon(), session=session)["obs"]
    assert outcome.ok
    assert entry_ids(outcome.data) == ["o1", "o2", "o3"]


def test_an_absolute_query_url_is_refused(session):
    with ScriptedServer(lambda r: r.send_json(200, searchset([]))) as server:
        outcome = fetch_queries(server.base_url, {"obs": f"{server.base_url}/Observation?patient=p1"},
                                access_token=TOKEN, deadline=soon(), session=session)["obs"]
    assert not outcome.ok and "relative" in outcome.error
    assert server.requests == []


def test_a_body_over_the_size_cap_is_refused_while_streaming(session):
    def endless(request):  # chunked, no Content-Length: the cap must hold while reading
        request.send_response(200)
        request.send_header("Content-Type", "application/fhir+json")
        request.send_header("Transfer-Encoding", "chunked")
        request.end_headers()
        request.wfile.write(b'8\r\n{"a": [ \r\n')
        chunk = b"1, " * 20000
        frame = f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"
        while not request.scripted.release.is_set():
            request.wfile.write(frame)

    with ScriptedServer(endless) as server:
        outcome = fetch_queries(server.base_url, {"patient": "Patient/p1"}, access_token=None,
                                deadline=soon(10), session=session)["patient"]
    assert not outcome.ok
    assert "larger than 20 MB" in outcome.error


def test_a_declared_length_over_the_cap_is_refused_before_reading(session):
    def huge(request):
        request.send_response(200)
        request.send_header("Content-Type", "application/fhir+json")
        request.send_header("Content-Length", str(2 * 1024 * 1024))
        request.end_headers()
        request.wfile.write(b"{")

    with ScriptedServer(huge) as server:
        outcome = fetch_queries(server.base_url, {"patient": "Patient/p1"}, access_token=None,
                                deadline=soon(), session=session, max_body_bytes=1024 * 1024)["patient"]
    assert not outcome.ok and "larger than 1 MB" in outcome.error


# --- parallelism, reuse, secrecy ---


def test_queries_run_in_parallel(session):
    def slowish(request):
        request.scripted.release.wait(0.3)
        request.send_json(200, searchset([]))

    queries = {f"q{i}": f"Observation?patient=p1&n={i}" for i in range(4)}
    with ScriptedServer(slowish) as server:
        started = time.monotonic()
        outcomes = fetch_queries(server.base_url, queries, access_token=None, deadline=soon(), session=session)
        elapsed = time.monotonic() - started
    assert all(o.ok for o in outcomes.values())
    assert server.max_concurrent == 4
    assert elapsed < 4 * 0.3  # one after the other would take at least 1.2 s


def test_connections_are_reused_across_calls(session):
    with ScriptedServer(lambda r: r.send_json(200, {"resourceType": "Patient", "id": "p1"})) as server:
        for _ in range(3):
            assert fetch_queries(server.base_url, {"patient": "Patient/p1"}, access_token=None,
                                 deadline=soon(), session=session)["patient"].ok
    assert len({request.client_port for request in server.requests}) == 1


def test_the_default_session_is_shared_within_the_process():
    assert fhir_client.shared_session() is fhir_client.shared_session()


def test_the_token_and_the_url_never_reach_errors_or_logs(caplog, session):
    patient_id = "patient-4711"
    with ScriptedServer(lambda r: r.send_bytes(401, TOKEN.encode() + b" " + r.path.encode())) as server:
        caplog.set_level(logging.DEBUG, logger="service.fhir_client")
        outcomes = fetch_queries(server.base_url, {"patient": f"Patient/{patient_id}"},
                                 access_token=TOKEN, deadline=soon(), session=session)
        outcomes |= fetch_queries(f"http://127.0.0.1:{closed_port()}/fhir", {"refused": f"Patient/{patient_id}"},
                                  access_token=TOKEN, deadline=soon(), session=session)
    assert not any(o.ok for o in outcomes.values())
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert "key=patient status=401" in logged  # the log line is there, and says what matters
    for text in [logged, *(o.error for o in outcomes.values())]:
        assert TOKEN not in text
        assert patient_id not in text


def test_a_cookie_set_by_a_fhir_server_is_never_sent_back(session):
    def set_cookie(request):
        request.send_bytes(200, b'{"resourceType": "Patient", "id": "p1"}',
                           headers={"Set-Cookie": "SESSION=from-the-ehr; Path=/"})

    with ScriptedServer(set_cookie) as server:
        for _ in range(2):
            assert fetch_queries(server.base_url, {"patient": "Patient/p1"}, access_token=None,
                                 deadline=soon(), session=session)["patient"].ok
    assert all("Cookie" not in request.headers and "cookie" not in request.headers
               for request in server.requests)


def test_an_http_proxy_from_the_environment_is_used_unless_no_proxy_names_the_host(monkeypatch):
    """Hospitals often reach FHIR servers through an outbound proxy (HTTP_PROXY / NO_PROXY)."""
    with ScriptedServer(lambda r: r.send_json(200, {"resourceType": "Patient", "id": "p1"})) as proxy:
        monkeypatch.setenv("HTTP_PROXY", proxy.origin)
        monkeypatch.setenv("NO_PROXY", "direct.invalid")
        with fhir_client.FhirConnections() as via_proxy:
            outcome = fetch_queries("http://fhir.example.invalid/fhir", {"patient": "Patient/p1"},
                                    access_token=TOKEN, deadline=soon(), session=via_proxy)["patient"]
            bypassed = fetch_queries("http://direct.invalid/fhir", {"patient": "Patient/p1"},
                                     access_token=None, deadline=soon(), session=via_proxy)["patient"]
    assert outcome.ok, outcome.error
    (request,) = proxy.requests
    assert request.path == "http://fhir.example.invalid/fhir/Patient/p1"  # absolute form: a proxy request
    assert not bypassed.ok and bypassed.error == "could not connect to the FHIR server"


@pytest.mark.parametrize("outcome", [
    {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "too-costly"}]},
    {"resourceType": "OperationOutcome", "issue": []},
    {"resourceType": "OperationOutcome"},
])
def test_a_fetched_search_with_an_error_outcome_fails_as_a_prefetched_one_is_refused(session, outcome):
    """One rule for prefetched and fetched searches (fhir_client.error_outcome_in): an outcome
    reporting an error, or one without any issue, makes the search incomplete."""
    bundle = searchset([{"resourceType": "Observation", "id": "o1"}, outcome])
    with ScriptedServer(lambda r: r.send_json(200, bundle)) as server:
        result = fetch_queries(server.base_url, {"obs": "Observation?patient=p1"}, access_token=None,
                               deadline=soon(), session=session)["obs"]
    assert not result.ok and "the search reported an error" in result.error
    assert fhir_client.error_outcome_in(bundle) == outcome
