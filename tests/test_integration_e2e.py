"""End to end: the service under gunicorn, called over HTTP, with the Node FHIR server process.

- every scenario gives the same cards with prefetch and with fetch-from-server (plain and paged);
- a prefetched first page with a `next` link is completed from the FHIR server;
- a FHIR server that is down, slower than the deadline, or answers 401 gives 412 in time.
"""

from __future__ import annotations

import time

import pytest
import requests

from service.integration_cli import fulfil_prefetch
from service.scenarios import scenario_names
from tests.openapi_check import assert_matches_openapi
from tests.support.scripted_server import ScriptedServer
from tests.test_gunicorn import free_port, start_gunicorn, stop
from tests.test_scenarios import (
    SERVICE_FOR_HOOK,
    rolled_scenario,
    card_signature,
    check_expectations,
    ensure_scenarios_loaded,
    hook_body,
    scenario_context,
    service_today,
    topics,
)

DEFAULT_DEADLINE_S = 2.0  # RPL_CDS_DEADLINE_MS default
SHORT_DEADLINE_MS = 500
# Allowed on top of the deadline for HTTP, JSON and the 412 body on a 2-core machine.
MARGIN_S = 1.0
PATIENT_VIEW = "/cds-services/rpl-patient-view"


def start_service(tmp_path, env: dict[str, str], workers: int = 2):
    """`start_gunicorn` (its output goes to `proc.log_path`)."""
    return start_gunicorn(tmp_path, env, workers=workers)


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    """gunicorn in local mode: loopback FHIR servers (the test servers) are allowed. Select/sign
    de-duplication is off so every hook entry is judged on its own."""
    proc, base = start_service(
        tmp_path_factory.mktemp("e2e"),
        {"RPL_CDS_LOCAL_MODE": "1", "RPL_CDS_SELECT_SIGN_DEDUP": "0"},
    )
    yield base
    stop(proc)


@pytest.fixture(scope="module")
def short_deadline_service(tmp_path_factory):
    proc, base = start_service(
        tmp_path_factory.mktemp("e2e-deadline"),
        {"RPL_CDS_LOCAL_MODE": "1", "RPL_CDS_DEADLINE_MS": str(SHORT_DEADLINE_MS)},
        workers=1,
    )
    yield base
    stop(proc)


@pytest.fixture(scope="module")
def http():
    with requests.Session() as session:
        yield session


@pytest.fixture(scope="module")
def templates(service, http) -> dict[str, dict[str, str]]:
    services = http.get(f"{service}/cds-services", timeout=5).json()["services"]
    return {s["id"]: s["prefetch"] for s in services}


def post(http, url: str, body: dict, timeout: float = 10) -> requests.Response:
    return http.post(url, json=body, timeout=timeout)


@pytest.mark.parametrize("name", scenario_names())
def test_scenario_cards_are_the_same_with_prefetch_and_with_fetch(
    name, service, http, templates, fhir_server, fhir_server_paged
):
    today = service_today()
    ensure_scenarios_loaded(fhir_server, today)
    ensure_scenarios_loaded(fhir_server_paged, today)
    scenario = rolled_scenario(name, today)
    for index, entry in enumerate(scenario["hooks"]):
        service_id = SERVICE_FOR_HOOK[entry["hook"]]
        url = f"{service}/cds-services/{service_id}"
        where = f"{name}#{index}-{entry['hook']}"
        answers = {
            "prefetch": post(http, url, hook_body(scenario, entry, templates[service_id])),
            "fetch": post(http, url, hook_body(scenario, entry, None, fhir_server.base_url)),
            "fetch-paged": post(http, url, hook_body(scenario, entry, None, fhir_server_paged.base_url)),
        }
        for mode, response in answers.items():
            assert response.status_code == 200, (where, mode, response.text)
            check_expectations(entry, topics(response.json()), f"{where} ({mode})")
        reference = card_signature(answers["prefetch"].json())
        assert card_signature(answers["fetch"].json()) == reference, where
        assert card_signature(answers["fetch-paged"].json()) == reference, where


def test_prefetched_first_pages_are_completed_from_the_fhir_server(service, http, templates, fhir_server_paged):
    """An EHR (like the Sandbox) may prefetch only the first page of a search; the service follows
    the `next` links on the FHIR server and finds the same cards as with complete data."""
    today = service_today()
    ensure_scenarios_loaded(fhir_server_paged, today)
    scenario = rolled_scenario("workup-complete-euthyroid", today)
    entry = scenario["hooks"][0]
    context = scenario_context(scenario, entry)
    first_pages, omitted = fulfil_prefetch(templates["rpl-patient-view"], context, fhir_server_paged.base_url)
    assert set(omitted) <= {"practitioner"}
    paged_keys = [k for k, v in first_pages.items()
                  if isinstance(v, dict) and any(link["relation"] == "next" for link in v.get("link", ()))]
    assert {"conditions", "observations"} <= set(paged_keys)
    body = hook_body(scenario, entry, None, fhir_server_paged.base_url)
    body["prefetch"] = first_pages
    completed = post(http, f"{service}{PATIENT_VIEW}", body)
    complete = post(http, f"{service}{PATIENT_VIEW}", hook_body(scenario, entry, templates["rpl-patient-view"]))
    assert completed.status_code == complete.status_code == 200, completed.text
    assert card_signature(completed.json()) == card_signature(complete.json())
    check_expectations(entry, topics(completed.json()), "first pages completed")


def _fetch_request(fhir_base: str, token: str | None = None) -> dict:
    scenario = rolled_scenario("demo-three-losses", service_today())
    body = hook_body(scenario, scenario["hooks"][0], None, fhir_base)
    if token:
        body["fhirAuthorization"] = {"access_token": token, "token_type": "Bearer", "expires_in": 300,
                                     "scope": "user/*.read", "subject": "rpl-cds"}
    return body


def _assert_412_in_time(response: requests.Response, elapsed: float, deadline_s: float) -> dict:
    assert response.status_code == 412, response.text
    assert elapsed < deadline_s + MARGIN_S, f"412 after {elapsed:.2f} s (deadline {deadline_s} s)"
    outcome = response.json()
    assert_matches_openapi("/cds-services/{id}", "post", 412, outcome)
    expressions = {e for issue in outcome["issue"] for e in issue.get("expression", ())}
    assert "prefetch.conditions" in expressions
    return outcome


def test_fhir_server_down_gives_412_in_time(service, http):
    closed = f"http://127.0.0.1:{free_port()}/fhir"  # nothing listens there
    started = time.monotonic()
    response = post(http, f"{service}{PATIENT_VIEW}", _fetch_request(closed))
    outcome = _assert_412_in_time(response, time.monotonic() - started, DEFAULT_DEADLINE_S)
    assert "could not connect" in str(outcome)


def test_fhir_server_slower_than_the_deadline_gives_412_in_time(short_deadline_service, http):
    def slow(handler):
        handler.scripted.release.wait(5)  # far past the 500 ms deadline; ends when the test closes
        handler.send_json(200, {"resourceType": "Bundle", "type": "searchset", "entry": []})

    with ScriptedServer(slow) as fhir:
        started = time.monotonic()
        response = post(http, f"{short_deadline_service}{PATIENT_VIEW}", _fetch_request(fhir.base_url))
        elapsed = time.monotonic() - started
        assert fhir.requests, "the service did query the slow server"
    outcome = _assert_412_in_time(response, elapsed, SHORT_DEADLINE_MS / 1000)
    assert "timed out" in str(outcome)
    # The worker is free again at once.
    scenario = rolled_scenario("demo-three-losses", service_today())
    started = time.monotonic()
    services = http.get(f"{short_deadline_service}/cds-services", timeout=5).json()["services"]
    quick = post(http, f"{short_deadline_service}{PATIENT_VIEW}",
                 hook_body(scenario, scenario["hooks"][0], {s["id"]: s["prefetch"] for s in services}["rpl-patient-view"]))
    assert quick.status_code == 200 and time.monotonic() - started < DEFAULT_DEADLINE_S


def test_fhir_server_answering_401_gives_412_in_time(service, http):
    def unauthorized(handler):
        handler.send_json(401, {"resourceType": "OperationOutcome",
                                "issue": [{"severity": "error", "code": "login"}]})

    with ScriptedServer(unauthorized) as fhir:
        started = time.monotonic()
        response = post(http, f"{service}{PATIENT_VIEW}", _fetch_request(fhir.base_url, token="expired-token"))
        elapsed = time.monotonic() - started
        sent = [r.headers.get("Authorization") for r in fhir.requests]
    outcome = _assert_412_in_time(response, elapsed, DEFAULT_DEADLINE_S)
    assert "401" in str(outcome)
    assert sent and all(value == "Bearer expired-token" for value in sent)
    assert "expired-token" not in response.text
