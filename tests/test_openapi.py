"""openapi.yaml is generated from the JSON Schemas, and real responses validate against it."""

from service.openapi import render_openapi_yaml
from tests.hookdata import full_prefetch, hook_request, miscarriage, patient, service_request
from tests.openapi_check import OPENAPI_PATH, assert_matches_openapi, openapi_document

RPL = [miscarriage("c1", "2023-03-01"), miscarriage("c2", "2024-01-10"), miscarriage("c3", "2024-08-10")]


def test_committed_openapi_is_current():
    assert OPENAPI_PATH.read_text(encoding="utf-8") == render_openapi_yaml(), (
        "openapi.yaml is stale: run `.venv/bin/rpl-cds openapi > openapi.yaml`"
    )


def test_openapi_is_3_1_and_documents_every_error_code():
    document = openapi_document()
    assert document["openapi"].startswith("3.1")
    responses = document["paths"]["/cds-services/{id}"]["post"]["responses"]
    assert {"200", "400", "401", "404", "405", "412", "413", "415"} <= set(responses)


def test_discovery_matches_openapi(client):
    response = client.get("/cds-services")
    assert_matches_openapi("/cds-services", "get", 200, response.get_json())


def test_each_hook_response_matches_openapi(client):
    thrombophilia = service_request("o1", "http://loinc.org", "21668-9", "Factor V Leiden")
    for hook, service in (("patient-view", "rpl-patient-view"), ("order-select", "rpl-order-select"),
                          ("order-sign", "rpl-order-sign")):
        # A patient per hook: a warning shown at order-select is (rightly) not repeated at sign.
        patient_id = f"openapi-{hook}"
        body = hook_request(hook, patient_id=patient_id, draft_orders=[thrombophilia],
                            prefetch=full_prefetch(RPL, patient(patient_id)))
        response = client.post(f"/cds-services/{service}", json=body)
        assert response.status_code == 200, response.get_data(as_text=True)
        assert response.get_json()["cards"], hook
        assert_matches_openapi("/cds-services/{id}", "post", 200, response.get_json())


def test_error_responses_match_openapi(client):
    cases = [
        (client.post("/cds-services/nope", json=hook_request()), 404),
        (client.post("/cds-services/rpl-patient-view", data="x", content_type="text/plain"), 415),
        (client.post("/cds-services/rpl-patient-view", json={"hook": "patient-view"}), 400),
        (client.post("/cds-services/rpl-patient-view", json=hook_request()), 412),
    ]
    for response, status in cases:
        assert response.status_code == status
        assert_matches_openapi("/cds-services/{id}", "post", status, response.get_json())
