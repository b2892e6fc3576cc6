"""T-S14 and the request log: one JSON line per request with what operations need, and no JWT,
access token or patient identifier anywhere in the log output of a full run."""

from __future__ import annotations

import json
import logging
import threading

import pytest
import urllib.request
from werkzeug.serving import make_server

from service import request_log
from service.request_log import REQUEST_LOGGER, RedactingFilter
from tests.conftest import make_app
from tests.hookdata import hook_request, miscarriage, service_request
from tests.support_jwt import TEST_CLIENT_BASE, RecordingServer, SigningKey, bearer, jwks_of, trusted_clients_file

ISS = "https://ehr.example.org/fhir"
PATIENT_ID = "pat-5f2a91-identifying"
ACCESS_TOKEN = "fhir-access-token-7c3d0e91"


@pytest.fixture
def fhir():
    """A FHIR server on 127.0.0.1 that answers the service's queries and records them."""
    with RecordingServer() as server:
        server.respond(
            f"/fhir/Patient/{PATIENT_ID}",
            {"resourceType": "Patient", "id": PATIENT_ID, "gender": "female", "birthDate": "1991-03-04"},
        )
        bundle = {"resourceType": "Bundle", "type": "searchset", "entry": [
            {"resource": miscarriage("m1", "2023-02-01", PATIENT_ID)},
            {"resource": miscarriage("m2", "2024-03-01", PATIENT_ID)},
        ]}
        server.respond("/fhir/Condition", bundle)
        server.respond("/fhir/Practitioner/*", {"resourceType": "OperationOutcome", "issue": [
            {"severity": "error", "code": "not-found"}]}, status=404)
        server.respond("/fhir/*", {"resourceType": "Bundle", "type": "searchset", "entry": []})
        yield server


@pytest.fixture
def elsewhere():
    with RecordingServer() as server:
        yield server


def test_t_s14_a_full_run_logs_no_token_and_no_patient_id(settings, tmp_path, caplog, fhir, elsewhere):
    caplog.set_level(logging.DEBUG)
    key = SigningKey.ec_p384("log-key")
    clients = trusted_clients_file(tmp_path, [{"iss": ISS, "jwks": jwks_of([key])}])
    app = make_app(
        settings, auth="required", trusted_clients_file=str(clients), local_mode=False,
        fhir_servers=(fhir.url("/fhir"),), log_level="DEBUG",
    )
    # The redaction safety net would hide JWT-shaped leaks; this test checks the code without it.
    for handler in logging.getLogger().handlers:
        handler.removeFilter(request_log._redacting_filter)
    client = app.test_client()
    secrets: list[str] = [ACCESS_TOKEN, PATIENT_ID]

    def token(path: str, base: str = TEST_CLIENT_BASE, **kwargs) -> str:
        value = key.token(iss=ISS, aud=base + path, **kwargs)
        secrets.append(value)
        return value

    # 200: discovery
    assert client.get("/cds-services", headers=bearer(token("/cds-services"))).status_code == 200
    # 401: a signed token for another endpoint, and a replay of a good one
    assert client.get("/cds-services", headers=bearer(token("/cds-services/rpl-order-sign"))).status_code == 401
    used = token("/cds-services")
    assert client.get("/cds-services", headers=bearer(used)).status_code == 200
    assert client.get("/cds-services", headers=bearer(used)).status_code == 401
    # 412: nothing prefetched, the FHIR server is not on the allowlist
    refused = hook_request(patient_id=PATIENT_ID, fhir_server=elsewhere.url("/fhir"), access_token=ACCESS_TOKEN)
    response = client.post(
        "/cds-services/rpl-patient-view", json=refused, headers=bearer(token("/cds-services/rpl-patient-view"))
    )
    assert response.status_code == 412, response.get_data(as_text=True)
    # 200: order-sign, data fetched from the allowlisted FHIR server with the access token
    order = service_request("draft-thrombophilia", "http://loinc.org", "21668-9", "factor V Leiden",
                            subject={"reference": f"Patient/{PATIENT_ID}"})
    signed = hook_request("order-sign", patient_id=PATIENT_ID, draft_orders=[order],
                          fhir_server=fhir.url("/fhir"), access_token=ACCESS_TOKEN)
    response = client.post(
        "/cds-services/rpl-order-sign", json=signed, headers=bearer(token("/cds-services/rpl-order-sign"))
    )
    assert response.status_code == 200, response.get_data(as_text=True)
    # 400 with the patient id in the body
    broken = hook_request(patient_id=PATIENT_ID)
    broken["context"]["userId"] = 17
    assert client.post("/cds-services/rpl-patient-view", json=broken,
                       headers=bearer(token("/cds-services/rpl-patient-view"))).status_code == 400
    # The development server, with identifiers in the query string.
    server = make_server("127.0.0.1", 0, app)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_port}"
        # urllib, not requests: the test's own HTTP client must not log the URL either.
        ask = urllib.request.Request(
            f"{base}/cds-services?patient={PATIENT_ID}&access_token={ACCESS_TOKEN}",
            headers=bearer(token("/cds-services", base=base)),
        )
        with urllib.request.urlopen(ask, timeout=10) as answer:
            assert answer.status == 200
    finally:
        server.shutdown()
        server.server_close()

    # The secrets really went through the service (so their absence from the log means something).
    queried = [r for r in fhir.requests if r.path.startswith("/fhir/")]
    assert queried and all(r.headers.get("Authorization") == f"Bearer {ACCESS_TOKEN}" for r in queried)
    assert any(PATIENT_ID in r.path for r in queried)
    assert elsewhere.requests == []

    logged = _all_log_text(caplog)
    assert any(r.name == "werkzeug" for r in caplog.records), "the dev-server request line was captured"
    for secret in secrets:
        assert secret not in logged
    assert "Bearer " not in logged and "eyJ" not in logged

    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == REQUEST_LOGGER]
    assert [line["status"] for line in lines] == [200, 401, 200, 401, 412, 200, 400, 200]
    sign = lines[5]
    assert sign["service"] == "rpl-order-sign"
    assert sign["hookInstance"] == signed["hookInstance"]
    assert sign["route"] == "/cds-services/<service_id>"
    assert isinstance(sign["duration_ms"], float) and sign["duration_ms"] > 0
    assert sign["client"] == ISS
    assert isinstance(sign["cards"], list)
    assert sign["fetched"]  # the prefetch keys that came from the FHIR server
    assert lines[4]["service"] == "rpl-patient-view" and lines[4]["hookInstance"] == refused["hookInstance"]
    assert "aud" in lines[1]["auth_failure"] and "replayed" in lines[3]["auth_failure"]
    assert "auth_failure" not in lines[0]


def _all_log_text(caplog) -> str:
    parts = [caplog.text]
    for record in caplog.records:
        parts.append(record.getMessage())
        if record.exc_text:
            parts.append(record.exc_text)
    return "\n".join(parts)


def test_redacting_filter_masks_jwts_and_bearer_credentials():
    key = SigningKey.ec_p384("r")
    jwt_text = key.token(iss=ISS, aud="https://x")
    record = logging.LogRecord("any", logging.ERROR, __file__, 1, "header was %s, token %s",
                               (f"Bearer {ACCESS_TOKEN}", jwt_text), None)
    assert RedactingFilter().filter(record)
    message = record.getMessage()
    assert ACCESS_TOKEN not in message and jwt_text not in message
    assert "Bearer (credential removed)" in message and "(jwt removed)" in message


def test_redaction_is_installed_on_the_root_handlers(app):
    root_handlers = logging.getLogger().handlers
    assert root_handlers and all(
        any(isinstance(f, RedactingFilter) for f in handler.filters) for handler in root_handlers
    )
