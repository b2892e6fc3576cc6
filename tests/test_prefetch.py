"""Prefetch semantics (CDS Hooks 2.0 section 3.4) and the FHIR-server fallback, on a real server."""

import json
import threading
import uuid
from http.server import BaseHTTPRequestHandler

import pytest

from tests.support.scripted_server import WideBacklogServer
from tests.hookdata import (
    SEARCH_KEYS,
    full_prefetch,
    hook_request,
    miscarriage,
    patient,
    searchset,
    tsh_observation,
)

URL = "/cds-services/rpl-patient-view"
RPL_HISTORY = [miscarriage("c1", "2023-03-01"), miscarriage("c2", "2024-01-10")]


def topics(response):
    return {c["source"]["topic"]["code"] for c in response.get_json()["cards"]}


class RecordingServer:
    """A FHIR-looking server that records every request it gets (to prove none was made)."""

    def __init__(self):
        self.requests = []
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                recorder.requests.append((self.path, dict(self.headers)))
                path = self.path.split("?")[0]
                status, resource = 200, searchset([])
                if path.startswith("/fhir/Patient/"):
                    resource = patient(path.rsplit("/", 1)[1])
                elif path.startswith("/fhir/Practitioner/"):
                    status, resource = 404, {"resourceType": "OperationOutcome", "issue": [
                        {"severity": "error", "code": "not-found"}]}
                body = json.dumps(resource).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/fhir+json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = WideBacklogServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.httpd.server_port}/fhir"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def recording_server():
    server = RecordingServer()
    yield server
    server.close()


def test_full_prefetch_gives_cards_without_any_outbound_call(client, recording_server):
    body = hook_request(prefetch=full_prefetch(RPL_HISTORY), fhir_server=recording_server.base_url)
    response = client.post(URL, json=body)
    assert response.status_code == 200
    assert "rpl-summary" in topics(response)
    assert recording_server.requests == []


def test_null_prefetch_means_no_data_and_no_outbound_call(client, recording_server):
    prefetch = {key: None for key in SEARCH_KEYS}
    prefetch["patient"] = patient()
    prefetch["practitioner"] = None
    body = hook_request(prefetch=prefetch, fhir_server=recording_server.base_url)
    response = client.post(URL, json=body)
    assert response.status_code == 200
    assert response.get_json() == {"cards": []}
    assert recording_server.requests == []


def test_missing_prefetch_without_fhir_server_is_412_naming_the_keys(client):
    prefetch = full_prefetch(RPL_HISTORY)
    del prefetch["observations"], prefetch["procedures"]
    response = client.post(URL, json=hook_request(prefetch=prefetch))
    assert response.status_code == 412
    body = response.get_json()
    assert body["resourceType"] == "OperationOutcome"
    expressions = {e for issue in body["issue"] for e in issue["expression"]}
    assert expressions == {"prefetch.observations", "prefetch.procedures"}


def test_operation_outcome_prefetch_counts_as_missing(client):
    prefetch = full_prefetch(RPL_HISTORY)
    prefetch["conditions"] = {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": "timeout"}],
    }
    response = client.post(URL, json=hook_request(prefetch=prefetch))
    assert response.status_code == 412
    assert "OperationOutcome" in json.dumps(response.get_json())


def test_bundle_holding_an_error_outcome_counts_as_missing(client):
    prefetch = full_prefetch(RPL_HISTORY)
    prefetch["conditions"]["entry"].append(
        {"resource": {"resourceType": "OperationOutcome",
                      "issue": [{"severity": "error", "code": "too-costly"}]},
         "search": {"mode": "outcome"}}
    )
    assert client.post(URL, json=hook_request(prefetch=prefetch)).status_code == 412


def test_warning_outcome_in_bundle_is_not_an_error(client):
    prefetch = full_prefetch(RPL_HISTORY)
    prefetch["conditions"]["entry"].append(
        {"resource": {"resourceType": "OperationOutcome",
                      "issue": [{"severity": "information", "code": "informational"}]},
         "search": {"mode": "outcome"}}
    )
    response = client.post(URL, json=hook_request(prefetch=prefetch))
    assert response.status_code == 200
    assert "rpl-summary" in topics(response)


def _load_patient(fhir_server, patient_id, resources):
    entries = [{"resource": patient(patient_id), "request": {"method": "PUT", "url": f"Patient/{patient_id}"}}]
    for resource in resources:
        resource = json.loads(json.dumps(resource).replace('"Patient/p1"', f'"Patient/{patient_id}"'))
        resource.pop("id", None)
        entries.append({"resource": resource, "request": {"method": "POST", "url": resource["resourceType"]}})
    fhir_server.load({"resourceType": "Bundle", "type": "transaction", "entry": entries})


def test_missing_prefetch_is_fetched_from_a_real_fhir_server(client, fhir_server):
    patient_id = f"pf-{uuid.uuid4().hex[:8]}"
    _load_patient(fhir_server, patient_id, RPL_HISTORY + [tsh_observation("t", 2.0, "2024-02-01")])
    body = hook_request(patient_id=patient_id, fhir_server=fhir_server.base_url, access_token="tok-123")
    response = client.post(URL, json=body)
    assert response.status_code == 200, response.get_data(as_text=True)
    found = topics(response)
    assert "rpl-summary" in found
    assert "tsh-missing" not in found  # the TSH on the server was seen


def test_cards_are_the_same_with_prefetch_and_with_fetch(client, fhir_server):
    patient_id = f"pf-{uuid.uuid4().hex[:8]}"
    _load_patient(fhir_server, patient_id, RPL_HISTORY)
    fetched = client.post(URL, json=hook_request(patient_id=patient_id, fhir_server=fhir_server.base_url))
    prefetch = full_prefetch(RPL_HISTORY, patient(patient_id))
    prefetched = client.post(URL, json=hook_request(patient_id=patient_id, prefetch=prefetch))
    assert fetched.status_code == prefetched.status_code == 200
    assert topics(fetched) == topics(prefetched)


def test_fhir_server_not_on_allowlist_gets_no_call_and_412(recording_server, settings):
    from tests.conftest import make_app

    app = make_app(settings, local_mode=False, fhir_servers=("https://ehr.example.org/fhir",))
    body = hook_request(fhir_server=recording_server.base_url, access_token="never-send-me")
    response = app.test_client().post(URL, json=body)
    assert response.status_code == 412
    assert "allowlist" in response.get_data(as_text=True)
    assert recording_server.requests == []


def test_allowlisted_server_gets_the_bearer_token(recording_server, settings):
    from tests.conftest import make_app

    app = make_app(settings, local_mode=False, fhir_servers=(recording_server.base_url,))
    body = hook_request(fhir_server=recording_server.base_url, access_token="tok-abc")
    response = app.test_client().post(URL, json=body)
    assert response.status_code == 200, response.get_data(as_text=True)
    assert recording_server.requests
    assert all(h.get("Authorization") == "Bearer tok-abc" for _, h in recording_server.requests)
    paths = {p.split("?")[0] for p, _ in recording_server.requests}
    assert "/fhir/Patient/p1" in paths and "/fhir/Condition" in paths
