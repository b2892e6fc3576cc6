"""Card language: Dutch by default, English by setting or by the user's Practitioner resource."""

import pytest

from tests.conftest import make_app
from tests.hookdata import full_prefetch, hook_request, miscarriage, service_request

RPL = [miscarriage("c1", "2023-03-01"), miscarriage("c2", "2024-01-10")]
THROMBOPHILIA = service_request("o1", "http://loinc.org", "21668-9", "Factor V Leiden")


def practitioner(*codes: str) -> dict:
    return {
        "resourceType": "Practitioner",
        "id": "dr1",
        "communication": [
            {"coding": [{"system": "urn:ietf:bcp:47", "code": code}]} for code in codes
        ],
    }


def warning_summary(client, practitioner_resource=None) -> str:
    body = hook_request("order-select", draft_orders=[THROMBOPHILIA],
                        prefetch=full_prefetch(RPL, practitioner=practitioner_resource))
    response = client.post("/cds-services/rpl-order-select", json=body)
    assert response.status_code == 200, response.get_data(as_text=True)
    (card,) = response.get_json()["cards"]
    return card["summary"] + " " + " ".join(r["display"] for r in card["overrideReasons"])


def test_dutch_by_default(client):
    text = warning_summary(client)
    assert "Niet aanbevolen" in text and "Andere indicatie" in text


def test_english_by_setting(settings):
    client = make_app(settings, language="en").test_client()
    text = warning_summary(client)
    assert "Not recommended" in text and "Niet aanbevolen" not in text


@pytest.mark.parametrize("codes", [("en",), ("en-GB",), ("fr", "en")])
def test_english_when_the_practitioner_speaks_it(client, codes):
    text = warning_summary(client, practitioner(*codes))
    assert "Not recommended" in text


def test_practitioner_dutch_overrides_an_english_setting(settings):
    client = make_app(settings, language="en").test_client()
    assert "Niet aanbevolen" in warning_summary(client, practitioner("nl-NL"))


def test_unsupported_practitioner_language_keeps_the_default(client):
    assert "Niet aanbevolen" in warning_summary(client, practitioner("de"))
