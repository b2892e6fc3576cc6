"""Discovery (CDS Hooks 2.0 section 1): the three services, lean 2.0-only prefetch templates."""

import re

from service.validation import validator
from tests.hookdata import SEARCH_KEY_BY_TYPE, SERVICE_FOR_HOOK, hook_request

EXPECTED = {service_id: hook for hook, service_id in SERVICE_FOR_HOOK.items()}
TOKEN = re.compile(r"\{\{\s*([^}]+?)\s*\}\}")
ALLOWED_TOKENS = {
    "context.userId", "context.patientId", "context.encounterId",
    "userPractitionerId", "userPractitionerRoleId", "userPatientId", "userRelatedPersonId",
}


def _no_empty_values(node, path="$"):
    if isinstance(node, dict):
        assert node, f"empty object at {path}"
        for key, value in node.items():
            assert value is not None, f"null at {path}.{key}"
            _no_empty_values(value, f"{path}.{key}")
    elif isinstance(node, list):
        assert node, f"empty array at {path}"
        for i, value in enumerate(node):
            _no_empty_values(value, f"{path}[{i}]")
    elif isinstance(node, str):
        assert node.strip(), f"empty string at {path}"


def test_each_prefetch_search_is_the_key_the_tests_and_the_bench_fill(client):
    """The search templates name the keys tests/hookdata.py (and, from services.json, the bench)
    sort resources into: a renamed key would otherwise leave test prefetch unread."""
    from service.services import search_key_by_resource_type

    for service in client.get("/cds-services").get_json()["services"]:
        searches = {
            template.split("?", 1)[0]: key
            for key, template in service["prefetch"].items()
            if "?" in template
        }
        assert searches == SEARCH_KEY_BY_TYPE
    assert search_key_by_resource_type() == SEARCH_KEY_BY_TYPE


def test_discovery_lists_the_three_services_with_stable_ids(client):
    response = client.get("/cds-services")
    assert response.status_code == 200
    assert response.mimetype == "application/json"
    services = response.get_json()["services"]
    assert {s["id"]: s["hook"] for s in services} == EXPECTED
    validator("discovery-response.schema.json").validate(response.get_json())
    _no_empty_values(response.get_json())


def test_prefetch_templates_use_only_cds_hooks_2_tokens(client):
    for service in client.get("/cds-services").get_json()["services"]:
        for key, template in service["prefetch"].items():
            tokens = set(TOKEN.findall(template))
            assert tokens, f"{key} has no token"
            assert tokens <= ALLOWED_TOKENS, f"{key}: {tokens - ALLOWED_TOKENS}"
            assert "draftOrders" not in template and "selections" not in template


def test_observation_template_is_bounded_to_guideline_codes(client):
    service = client.get("/cds-services").get_json()["services"][0]
    template = service["prefetch"]["observations"]
    assert "code=" in template
    assert "http://loinc.org|3016-3" in template  # TSH
    assert len(template) < 8000  # within common URL limits


def test_every_discovered_service_is_routable(client):
    for service_id, hook in EXPECTED.items():
        body = hook_request(hook, prefetch={})  # routable: answers, even if data are missing
        response = client.post(f"/cds-services/{service_id}", json=body)
        assert response.status_code != 404, service_id
