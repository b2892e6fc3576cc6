"""Every error a client can cause gets its 4xx with an OperationOutcome naming the problem."""

import pytest

from tests.assertions import assert_outcome
from tests.hookdata import full_prefetch, hook_request, service_request

URL = "/cds-services/rpl-patient-view"


def test_unknown_service_is_404(client):
    assert_outcome(client.post("/cds-services/nope", json=hook_request()), 404, "nope")


def test_unknown_path_is_404_with_outcome(client):
    assert_outcome(client.get("/nothing-here"), 404)


def test_get_on_a_service_is_405(client):
    response = client.get(URL)
    assert_outcome(response, 405)
    assert "POST" in response.headers["Allow"]


def test_wrong_content_type_is_415(client):
    assert_outcome(client.post(URL, data="hook=x", content_type="text/plain"), 415, "text/plain")


def test_invalid_json_is_400(client):
    assert_outcome(client.post(URL, data='{"hook": ', content_type="application/json"), 400, "not valid JSON")


def test_empty_body_is_400(client):
    assert_outcome(client.post(URL, data="", content_type="application/json"), 400, "empty")


def test_body_over_limit_is_413(app, client):
    limit = app.config["RPL_SETTINGS"].max_body_bytes
    payload = '{"x": "' + "a" * limit + '"}'
    assert_outcome(client.post(URL, data=payload, content_type="application/json"), 413)


def test_deep_nesting_is_400_not_500(client):
    payload = "[" * 5000 + "]" * 5000
    assert_outcome(client.post(URL, data=payload, content_type="application/json"), 400)


@pytest.mark.parametrize("field", ["hook", "hookInstance", "context"])
def test_missing_envelope_member_is_400_naming_it(client, field):
    body = hook_request(prefetch=full_prefetch([]))
    del body[field]
    assert_outcome(client.post(URL, json=body), 400, field)


def test_non_object_body_is_400(client):
    assert_outcome(client.post(URL, json=[1, 2, 3]), 400)


def test_hook_not_matching_service_is_400(client):
    body = hook_request("order-sign", prefetch=full_prefetch([]))
    assert_outcome(client.post(URL, json=body), 400, "order-sign", "patient-view")


def test_missing_context_field_is_400_naming_it(client):
    body = hook_request(prefetch=full_prefetch([]))
    del body["context"]["patientId"]
    assert_outcome(client.post(URL, json=body), 400, "context.patientId")


def test_patient_id_as_reference_is_400(client):
    body = hook_request(prefetch=full_prefetch([]))
    body["context"]["patientId"] = "Patient/p1"
    assert_outcome(client.post(URL, json=body), 400, "context.patientId")


def test_fhir_authorization_without_fhir_server_is_400(client):
    body = hook_request(prefetch=full_prefetch([]), access_token="secret-token")
    assert_outcome(client.post(URL, json=body), 400, "fhirServer")


def test_order_select_without_selections_is_400(client):
    body = hook_request("order-select", prefetch=full_prefetch([]),
                        draft_orders=[service_request("o1", "http://loinc.org", "3016-3")])
    del body["context"]["selections"]
    assert_outcome(client.post("/cds-services/rpl-order-select", json=body), 400, "selections")


def test_selection_absent_from_draft_orders_is_400(client):
    body = hook_request("order-select", prefetch=full_prefetch([]),
                        draft_orders=[service_request("o1", "http://loinc.org", "3016-3")],
                        selections=["ServiceRequest/other"])
    assert_outcome(client.post("/cds-services/rpl-order-select", json=body), 400, "ServiceRequest/other")


def test_prefetch_with_wrong_resource_type_is_400(client):
    prefetch = full_prefetch([])
    prefetch["patient"] = {"resourceType": "Observation", "id": "x"}
    assert_outcome(client.post(URL, json=hook_request(prefetch=prefetch)), 400, "prefetch.patient")


def test_prefetch_search_key_holding_a_resource_is_400(client):
    prefetch = full_prefetch([])
    prefetch["conditions"] = {"resourceType": "Patient", "id": "p1"}
    assert_outcome(client.post(URL, json=hook_request(prefetch=prefetch)), 400, "prefetch.conditions")


def test_prefetch_value_not_an_object_is_400(client):
    prefetch = full_prefetch([])
    prefetch["conditions"] = "nope"
    assert_outcome(client.post(URL, json=hook_request(prefetch=prefetch)), 400, "prefetch")


def test_unknown_members_are_tolerated(client):
    body = hook_request(prefetch=full_prefetch([]))
    body["extension"] = {"com.example.x": "y"}
    body["futureField"] = 1
    body["context"]["somethingNew"] = {"a": 1}
    response = client.post(URL, json=body)
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.get_json()["cards"] == []
