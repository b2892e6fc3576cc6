"""Small pure pieces of data gathering: token substitution and the FHIR-server allowlist."""

import pytest

from service.gather import fhir_server_allowed
from service.services import check_template_tokens, substitute_tokens

CONTEXT = {"userId": "Practitioner/dr1", "patientId": "p1", "encounterId": "e9"}


def test_context_tokens_are_filled():
    assert substitute_tokens("Condition?patient={{context.patientId}}", CONTEXT) == "Condition?patient=p1"


def test_user_token_matches_the_user_type():
    assert substitute_tokens("Practitioner/{{userPractitionerId}}", CONTEXT) == "Practitioner/dr1"
    role = dict(CONTEXT, userId="PractitionerRole/r1")
    assert substitute_tokens("Practitioner/{{userPractitionerId}}", role) is None
    assert substitute_tokens("PractitionerRole/{{userPractitionerRoleId}}", role) == "PractitionerRole/r1"


def test_absent_context_field_makes_the_key_unbuildable():
    assert substitute_tokens("Encounter/{{context.encounterId}}", {"patientId": "p1"}) is None


def test_non_2_0_tokens_are_rejected_at_start_up():
    with pytest.raises(ValueError, match="draftOrders"):
        check_template_tokens("Medication?_id={{context.draftOrders.entry}}")
    with pytest.raises(ValueError):
        check_template_tokens("Observation?date=gt{{today() - 90 days}}")


@pytest.mark.parametrize(
    ("url", "allowlist", "loopback", "allowed"),
    [
        ("https://ehr.example.org/fhir", ("https://ehr.example.org/fhir",), False, True),
        ("https://ehr.example.org/fhir/", ("https://ehr.example.org/fhir",), False, True),
        ("https://ehr.example.org/fhir-evil", ("https://ehr.example.org/fhir",), False, False),
        ("https://ehr.example.org.evil.com/fhir", ("https://ehr.example.org",), False, False),
        ("http://ehr.example.org/fhir", ("https://ehr.example.org/fhir",), False, False),
        ("http://127.0.0.1:9999/fhir", (), False, False),
        ("http://127.0.0.1:9999/fhir", (), True, True),
        ("http://localhost:9999/fhir", (), True, True),
        ("http://10.0.0.5/fhir", (), True, False),
    ],
)
def test_fhir_server_allowlist(url, allowlist, loopback, allowed):
    assert fhir_server_allowed(url, allowlist, loopback) is allowed
