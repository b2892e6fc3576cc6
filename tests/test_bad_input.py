"""Bad input of every kind, through the real endpoints: each gets a clear 4xx with an
OperationOutcome, or a correct 200 where CDS Hooks lets the service ignore the data. Never a 500.

Extends tests/test_hook_errors.py (one example per error class) with the whole zoo: per endpoint,
per hook, per field; invalid FHIR inside prefetch and draftOrders; DSTU2/STU3/R5 shapes; unicode
and huge strings; and a hypothesis test that mutates valid requests at random JSON paths.

`FUZZ_EXAMPLES` (default 300) sets how many mutated requests the hypothesis tests send.
"""

from __future__ import annotations

import copy
import json
import os
import re
import uuid
from datetime import UTC, datetime

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.assertions import assert_outcome
from service.validation import validator
from tests.hookdata import (
    SEARCH_KEYS,
    full_prefetch,
    hook_request,
    miscarriage,
    patient,
    searchset,
    service_request,
    tsh_observation,
)

HOOK_URL = {
    "patient-view": "/cds-services/rpl-patient-view",
    "order-select": "/cds-services/rpl-order-select",
    "order-sign": "/cds-services/rpl-order-sign",
}
FEEDBACK_URL = "/cds-services/rpl-order-select/feedback"
ENDPOINTS = [*HOOK_URL.values(), FEEDBACK_URL]
HOOKS = list(HOOK_URL)
MUTATION_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "300"))
# Statuses a client can cause on a hook: bad request, precondition failed (data missing), too
# large, unsupported media type. Anything else (500 above all) is a defect.
CLIENT_STATUSES = {200, 400, 412, 413, 415}

# The bugs these tests found and their fixes: docs/reliability.md section 4.

ATC = "http://www.whocc.no/atc"
LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
BCP47 = "urn:ietf:bcp:47"
LOSSES = [miscarriage("loss-1", "2023-03-01"), miscarriage("loss-2", "2024-01-10")]
THREE_LOSSES = [*LOSSES, miscarriage("loss-3", "2024-08-10")]
# Orders the guideline advises against in recurrent miscarriage (see service/scenarios).
FACTOR_V_LEIDEN = service_request("o-fvl", LOINC, "21668-9", "Factor V Leiden")
PREDNISOLONE = {
    "resourceType": "MedicationRequest",
    "id": "o-pred",
    "status": "draft",
    "intent": "order",
    "medicationCodeableConcept": {"coding": [{"system": ATC, "code": "H02AB06", "display": "prednisolone"}]},
    "subject": {"reference": "Patient/p1"},
    "authoredOn": "2025-06-01",
    "dosageInstruction": [{"text": "1 dd 10 mg"}],
}


# ------------------------------------------------------------------------------------------------
# Fixtures and helpers


@pytest.fixture(scope="module")
def bad_app(tmp_path_factory):
    """One app for the whole module (hundreds of requests). The two memories that make one
    request depend on an earlier one (override memory, select/sign de-duplication; tested in
    tests/test_feedback.py) are off, so every test here sees the same answer in any order."""
    from service import create_app
    from service.config import Settings

    directory = tmp_path_factory.mktemp("bad-input")
    settings = Settings(
        auth="disabled",
        local_mode=True,
        database_url=f"sqlite:///{directory / 'bad-input.sqlite'}",
        pseudonym_secret="bad-input-pseudonym-secret",
    )
    return create_app({
        "TESTING": True,
        "RPL_SETTINGS": settings,
        "RPL_OVERRIDE_MEMORY_DAYS": 0,
        "RPL_SELECT_SIGN_DEDUP": False,
    })


@pytest.fixture
def bad_client(bad_app):
    return bad_app.test_client()


def assert_cards(response) -> list[dict]:
    """200 with a CDS Hooks response valid against our schema (summary < 140 characters)."""
    assert response.status_code == 200, response.get_data(as_text=True)[:2000]
    body = response.get_json()
    validator("hook-response.schema.json").validate(body)
    return body["cards"]


def topics(cards: list[dict]) -> list[str]:
    return [card["source"]["topic"]["code"] for card in cards]


def loss_count(cards: list[dict]) -> int:
    """The number of pregnancy losses the summary card reports ("(2 verliezen)")."""
    (summary,) = [card for card in cards if card["source"]["topic"]["code"] == "rpl-summary"]
    match = re.search(r"\((\d+) (?:verliezen|losses)\)", summary["summary"])
    assert match, summary["summary"]
    return int(match.group(1))


def valid_body(hook: str) -> dict:
    """A realistic, valid request: two miscarriages, and for the order hooks two advised-against
    orders (the first one selected at order-select)."""
    orders = [FACTOR_V_LEIDEN, PREDNISOLONE] if hook != "patient-view" else None
    body = hook_request(hook, prefetch=full_prefetch(THREE_LOSSES), draft_orders=orders)
    body["context"]["encounterId"] = "enc-1"
    return body


def post(client, hook: str, body: object):
    return client.post(HOOK_URL[hook], json=body)


def post_raw(client, url: str, data: bytes | str, content_type: str | None = "application/json"):
    headers = {} if content_type is None else {"Content-Type": content_type}
    return client.post(url, data=data, headers=headers)


def raw_body(url: str) -> str:
    if url == FEEDBACK_URL:
        return json.dumps({"feedback": [{"card": str(uuid.uuid4()), "outcome": "overridden",
                                         "outcomeTimestamp": "2025-01-01T10:00:00Z"}]})
    hook = next(h for h, u in HOOK_URL.items() if u == url)
    return json.dumps(valid_body(hook))


def set_path(node, path, value):
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value


def delete_path(node, path):
    for part in path[:-1]:
        node = node[part]
    del node[path[-1]]


# ------------------------------------------------------------------------------------------------
# 1. Transport: the body is not a JSON object we can read


@pytest.mark.parametrize("url", ENDPOINTS)
@pytest.mark.parametrize(
    "cut",
    [lambda raw: raw[:1], lambda raw: raw[: len(raw) // 4], lambda raw: raw[: len(raw) // 2],
     lambda raw: raw[: len(raw) * 9 // 10], lambda raw: raw[:-1]],
    ids=["first-byte", "quarter", "half", "90pct", "last-byte-cut"],
)
def test_truncated_json_is_400(bad_client, url, cut):
    assert_outcome(post_raw(bad_client, url, cut(raw_body(url))), 400, "not valid JSON")


INVALID_JSON = {
    "single-quotes": b"{'hook': 'patient-view'}",
    "trailing-comma": b'{"hook": "patient-view",}',
    "comment": b'{"hook": "patient-view" /* x */}',
    "unquoted-key": b"{hook: 1}",
    "nan": b'{"hook": NaN}',
    "infinity": b'{"hook": Infinity}',
    "number-overflow": b'{"hook": 1e400}',
    "lone-surrogate": b'{"hook": "\\ud800"}',
    "invalid-utf8": b'{"hook": "\xff\xfe"}',
    "utf8-bom": b'\xef\xbb\xbf{"hook": "patient-view"}',
    "utf16": '{"hook": "patient-view"}'.encode("utf-16"),
    "two-documents": b'{"hook": "a"}{"hook": "b"}',
    "control-char-in-string": b'{"hook": "a\x01b"}',
    "bare-word": b"patient-view",
    "nul-bytes": b"\x00\x00\x00",
}


@pytest.mark.parametrize("url", ENDPOINTS)
@pytest.mark.parametrize("raw", INVALID_JSON.values(), ids=INVALID_JSON.keys())
def test_invalid_json_is_400(bad_client, url, raw):
    assert_outcome(post_raw(bad_client, url, raw), 400, "not valid JSON")


WRONG_CONTENT_TYPES = [
    "text/plain",
    "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=x",
    "application/xml",
    "application/jsonx",
    "text/json-ish",
    None,
]


@pytest.mark.parametrize("url", ENDPOINTS)
@pytest.mark.parametrize("content_type", WRONG_CONTENT_TYPES)
def test_wrong_content_type_is_415(bad_client, url, content_type):
    response = post_raw(bad_client, url, raw_body(url), content_type)
    assert_outcome(response, 415, "Content-Type must be application/json")


@pytest.mark.parametrize("hook", HOOKS)
@pytest.mark.parametrize(
    "content_type",
    ["application/json; charset=utf-8", "application/fhir+json", "APPLICATION/JSON", "application/json;charset=UTF-8"],
)
def test_json_media_types_with_parameters_are_accepted(bad_client, hook, content_type):
    response = post_raw(bad_client, HOOK_URL[hook], json.dumps(valid_body(hook)), content_type)
    expected = "rpl-summary" if hook == "patient-view" else "not-recommended-test"
    assert expected in topics(assert_cards(response))


@pytest.mark.parametrize("url", ENDPOINTS)
@pytest.mark.parametrize("body", [b"", b"   ", b"\r\n\t"], ids=["empty", "spaces", "whitespace"])
def test_empty_body_is_400(bad_client, url, body):
    assert_outcome(post_raw(bad_client, url, body), 400, "empty")


@pytest.mark.parametrize("url", ENDPOINTS)
def test_a_body_over_the_limit_is_413(bad_client, url):
    limit = bad_client.application.config["RPL_SETTINGS"].max_body_bytes
    padding = "a" * (limit + 1)
    body = raw_body(url)[:-1] + f', "padding": "{padding}"}}'
    assert_outcome(post_raw(bad_client, url, body), 413, "larger than")


@pytest.mark.parametrize("url", ENDPOINTS)
@pytest.mark.parametrize("raw", ["[]", "[1, 2]", '"patient-view"', "42", "null", "true"])
def test_json_that_is_not_an_object_is_400(bad_client, url, raw):
    assert_outcome(post_raw(bad_client, url, raw), 400, "(body)")


# Deep nesting: within the JSON parser's limit (about 900 levels, service/json_codec.py) the unknown member is ignored; past
# it, the body is refused as unreadable. Either way no recursion error reaches the client.
NEST_LOCATIONS = {
    "top-level-extension": ("patient-view", lambda body, deep: body.update(extension={"x": deep})),
    "context-member": ("patient-view", lambda body, deep: body["context"].update(somethingNew=deep)),
    "prefetch-resource": (
        "patient-view",
        lambda body, deep: body["prefetch"]["conditions"]["entry"][0]["resource"].update(extension=[deep]),
    ),
    "draft-order-dosage": (
        "order-sign",
        lambda body, deep: body["context"]["draftOrders"]["entry"][1]["resource"].update(dosageInstruction=[deep]),
    ),
    "draft-order-code": (
        "order-sign",
        lambda body, deep: body["context"]["draftOrders"]["entry"][0]["resource"]["code"].update(extension=[deep]),
    ),
}


def nested(depth: int) -> str:
    return '{"a":' * depth + "1" + "}" * depth


@pytest.mark.parametrize("location", NEST_LOCATIONS)
@pytest.mark.parametrize("depth", [900, 1100, 5000])
def test_deep_nesting_is_ignored_or_400(bad_client, location, depth):
    hook, place = NEST_LOCATIONS[location]
    body = valid_body(hook)
    place(body, "__DEEP__")
    raw = json.dumps(body).replace('"__DEEP__"', nested(depth))
    response = post_raw(bad_client, HOOK_URL[hook], raw)
    if depth < 1000:
        cards = assert_cards(response)
        # The nested member is ignored; the guideline data around it is still read.
        expected = "rpl-summary" if hook == "patient-view" else "not-recommended-treatment"
        assert expected in topics(cards)
    else:
        assert_outcome(response, 400, "not valid JSON")


def test_chunked_bodies_under_gunicorn(tmp_path):
    """Without Content-Length (chunked transfer encoding, as streaming clients send) the limit
    still holds, and a valid chunked request is answered normally."""
    from tests.test_gunicorn import start_gunicorn, stop

    limit = 4 * 1024 * 1024
    proc, base = start_gunicorn(
        tmp_path, {"RPL_CDS_LOG_LEVEL": "WARNING", "RPL_CDS_MAX_BODY_BYTES": str(limit)}, workers=1
    )
    try:
        url = f"{base}{HOOK_URL['patient-view']}"
        headers = {"Content-Type": "application/json"}

        def chunks(data: bytes, size: int = 64 * 1024):
            for start in range(0, len(data), size):
                yield data[start : start + size]

        valid = json.dumps(valid_body("patient-view")).encode()
        response = requests.post(url, data=chunks(valid), headers=headers, timeout=10)
        assert response.status_code == 200, response.text[:500]
        assert "rpl-summary" in topics(response.json()["cards"])

        huge = valid[:-1] + b', "padding": "' + b"a" * (limit + 1) + b'"}'
        try:
            response = requests.post(url, data=chunks(huge), headers=headers, timeout=20)
        except requests.ConnectionError:
            pytest.fail("the server hung up instead of answering 413")
        assert response.status_code == 413, response.text[:500]
        assert response.json()["resourceType"] == "OperationOutcome"
    finally:
        stop(proc)


# ------------------------------------------------------------------------------------------------
# 2. The envelope: hook, hookInstance, fhirServer, fhirAuthorization, context


WRONG_HOOK_VALUES = ["order-sign", "unknown-hook", "PATIENT-VIEW", "patient-view ", "", 1, None, ["patient-view"], {"hook": "x"}]


@pytest.mark.parametrize("hook", HOOKS)
@pytest.mark.parametrize("value", WRONG_HOOK_VALUES, ids=[repr(v)[:20] for v in WRONG_HOOK_VALUES])
def test_wrong_hook_is_400_naming_hook(bad_client, hook, value):
    if value == hook:
        value = "patient-view"
    body = valid_body(hook)
    body["hook"] = value
    assert_outcome(post(bad_client, hook, body), 400, "hook")


REQUIRED_CONTEXT = {
    "patient-view": ["userId", "patientId"],
    "order-select": ["userId", "patientId", "selections", "draftOrders"],
    "order-sign": ["userId", "patientId", "draftOrders"],
}


@pytest.mark.parametrize(
    ("hook", "field"), [(hook, field) for hook, fields in REQUIRED_CONTEXT.items() for field in fields]
)
def test_missing_context_field_is_400_naming_it(bad_client, hook, field):
    body = valid_body(hook)
    del body["context"][field]
    assert_outcome(post(bad_client, hook, body), 400, f"context.{field}", "required")


@pytest.mark.parametrize("hook", HOOKS)
@pytest.mark.parametrize("field", ["hook", "hookInstance", "context"])
def test_missing_envelope_member_is_400_naming_it(bad_client, hook, field):
    body = valid_body(hook)
    del body[field]
    assert_outcome(post(bad_client, hook, body), 400, field)


# (hook, JSON path, value, fragment the OperationOutcome must name)
WRONG_TYPES = [
    ("patient-view", ("hookInstance",), 12345, "hookInstance"),
    ("patient-view", ("hookInstance",), "", "hookInstance"),
    ("patient-view", ("hookInstance",), "h" * 201, "hookInstance"),
    ("patient-view", ("context",), [], "context"),
    ("patient-view", ("context",), "Patient/p1", "context"),
    ("patient-view", ("context", "patientId"), 1288992, "context.patientId"),
    ("patient-view", ("context", "patientId"), "", "context.patientId"),
    ("patient-view", ("context", "patientId"), "p1 OR 1=1", "context.patientId"),
    ("patient-view", ("context", "patientId"), "pätiënt", "context.patientId"),
    ("patient-view", ("context", "patientId"), "p" * 65, "context.patientId"),
    ("patient-view", ("context", "userId"), "dr1", "context.userId"),
    ("patient-view", ("context", "userId"), "Observation/1", "context.userId"),
    ("patient-view", ("context", "userId"), None, "context.userId"),
    ("patient-view", ("context", "encounterId"), {"id": "e1"}, "context.encounterId"),
    ("patient-view", ("fhirServer",), "ftp://ehr.example.org/fhir", "fhirServer"),
    ("patient-view", ("fhirServer",), "http://ehr example.org/fhir", "fhirServer"),
    ("patient-view", ("fhirServer",), 443, "fhirServer"),
    ("patient-view", ("prefetch",), [], "prefetch"),
    ("patient-view", ("prefetch",), "none", "prefetch"),
    ("patient-view", ("prefetch", "conditions"), "none", "prefetch"),
    ("patient-view", ("prefetch", "conditions"), 0, "prefetch"),
    ("patient-view", ("prefetch", "conditions"), [], "prefetch"),
    ("patient-view", ("prefetch", "patient"), True, "prefetch"),
    ("patient-view", ("extension",), ["x"], "extension"),
    ("order-select", ("context", "selections"), [], "context.selections"),
    ("order-select", ("context", "selections"), "ServiceRequest/o-fvl", "context.selections"),
    ("order-select", ("context", "selections"), ["o-fvl"], "context.selections"),
    ("order-select", ("context", "selections"), [{"reference": "ServiceRequest/o-fvl"}], "context.selections"),
    ("order-select", ("context", "userId"), "Patient/p1", "context.userId"),
    ("order-sign", ("context", "draftOrders"), [], "context.draftOrders"),
    ("order-sign", ("context", "draftOrders"), "Bundle", "context.draftOrders"),
    ("order-sign", ("context", "draftOrders"), {"resourceType": "Parameters"}, "context.draftOrders.resourceType"),
    ("order-sign", ("context", "draftOrders"), {"entry": []}, "context.draftOrders.resourceType"),
    ("order-sign", ("context", "draftOrders", "entry"), {"resource": {}}, "context.draftOrders.entry"),
    ("order-sign", ("context", "draftOrders", "entry", 0), "ServiceRequest/o-fvl", "context.draftOrders.entry[0]"),
    ("order-sign", ("context", "draftOrders", "entry", 0, "resource"), [], "context.draftOrders.entry[0].resource"),
    ("order-sign", ("context", "draftOrders", "entry", 0, "resource", "resourceType"), "serviceRequest", "resourceType"),
    ("order-sign", ("context", "draftOrders", "entry", 0, "resource", "id"), "o/fvl", "context.draftOrders.entry[0].resource.id"),
    ("order-sign", ("context", "draftOrders", "entry", 0, "resource", "id"), 7, "context.draftOrders.entry[0].resource.id"),
]


@pytest.mark.parametrize(
    ("hook", "path", "value", "fragment"), WRONG_TYPES,
    ids=[f"{hook}:{'.'.join(map(str, path))}={repr(value)[:24]}" for hook, path, value, _ in WRONG_TYPES],
)
def test_wrong_type_or_form_is_400_naming_the_field(bad_client, hook, path, value, fragment):
    body = valid_body(hook)
    set_path(body, path, value)
    assert_outcome(post(bad_client, hook, body), 400, fragment)


FHIR_AUTHORIZATION_ERRORS = [
    ("token_type", "MAC"),
    ("expires_in", "300"),
    ("expires_in", -1),
    ("access_token", ["token"]),
    ("access_token", ""),
    ("scope", None),
]


@pytest.mark.parametrize(("member", "value"), FHIR_AUTHORIZATION_ERRORS)
def test_invalid_fhir_authorization_is_400_and_never_echoes_the_token(bad_client, member, value):
    body = hook_request(prefetch=full_prefetch(LOSSES), fhir_server="http://127.0.0.1:9/fhir",
                        access_token="s3cr3t-access-token")
    body["fhirAuthorization"][member] = value
    outcome = assert_outcome(post(bad_client, "patient-view", body), 400, f"fhirAuthorization.{member}")
    assert "s3cr3t-access-token" not in json.dumps(outcome)


@pytest.mark.parametrize("member", ["access_token", "token_type", "expires_in", "scope", "subject"])
def test_fhir_authorization_missing_member_is_400(bad_client, member):
    body = hook_request(prefetch=full_prefetch(LOSSES), fhir_server="http://127.0.0.1:9/fhir", access_token="tok")
    del body["fhirAuthorization"][member]
    assert_outcome(post(bad_client, "patient-view", body), 400, f"fhirAuthorization.{member}")


@pytest.mark.parametrize(
    "fhir_server",
    [pytest.param("http://[::1"), pytest.param("http://[not-an-ip]/fhir"),
     "http://127.0.0.1:99999/fhir", "http://127.0.0.1:port/fhir"],
)
def test_unparseable_fhir_server_url_is_400_or_412_never_500(bad_client, fhir_server):
    """The URL passes the schema's shape check but cannot be parsed: a client error."""
    prefetch = full_prefetch(LOSSES)
    del prefetch["conditions"]  # so the service would have to use fhirServer
    body = hook_request(prefetch=prefetch)
    body["fhirServer"] = fhir_server
    response = post(bad_client, "patient-view", body)
    assert response.status_code in (400, 412), response.get_data(as_text=True)[:500]
    assert_outcome(response, response.status_code)


@pytest.mark.parametrize("hook", HOOKS)
def test_unknown_members_everywhere_are_ignored(bad_client, hook):
    """CDS Hooks 2.0 extensibility: unknown members do not change the answer."""
    plain = topics(assert_cards(post(bad_client, hook, valid_body(hook))))
    body = valid_body(hook)
    body["extension"] = {"org.example.flag": True}
    body["futureTopLevel"] = [1, {"x": None}]
    body["context"]["extension"] = {"org.example": "x"}
    body["context"]["somethingNew"] = {"a": [1, 2]}
    body["prefetch"]["notOurKey"] = {"resourceType": "Bundle", "type": "searchset"}
    if hook != "patient-view":
        body["context"]["draftOrders"]["id"] = "session-1"
        body["context"]["draftOrders"]["meta"] = {"tag": [{"code": "x"}]}
        body["context"]["draftOrders"]["entry"][0]["fullUrl"] = "urn:uuid:" + str(uuid.uuid4())
    assert topics(assert_cards(post(bad_client, hook, body))) == plain


# ------------------------------------------------------------------------------------------------
# 3. order-select: selections must name orders in draftOrders


SELECTIONS = {
    "absent-id": (["ServiceRequest/zzz"], "ServiceRequest/zzz"),
    "type-mismatch": (["MedicationRequest/o-fvl"], "MedicationRequest/o-fvl"),
    "one-of-two-absent": (["ServiceRequest/o-fvl", "ServiceRequest/o-other"], "ServiceRequest/o-other"),
    "case-differs": (["servicerequest/o-fvl"], "servicerequest/o-fvl"),
    "r5-type-for-r4-order": (["MedicationRequest/o-pred", "ServiceRequest/o-pred"], "ServiceRequest/o-pred"),
}


@pytest.mark.parametrize(("selections", "absent"), SELECTIONS.values(), ids=SELECTIONS.keys())
def test_selection_absent_from_draft_orders_is_400_naming_it(bad_client, selections, absent):
    body = valid_body("order-select")
    body["context"]["selections"] = selections
    outcome = assert_outcome(post(bad_client, "order-select", body), 400, absent, "context.selections")
    present = {"ServiceRequest/o-fvl", "MedicationRequest/o-pred"} & set(selections)
    for ref in present:  # only the absent ones are named
        assert ref not in outcome["issue"][0]["details"]["text"]


def test_selection_of_a_draft_without_id_is_400(bad_client):
    body = valid_body("order-select")
    del body["context"]["draftOrders"]["entry"][0]["resource"]["id"]
    assert_outcome(post(bad_client, "order-select", body), 400, "ServiceRequest/o-fvl")


def test_repeated_selection_is_one_order(bad_client):
    body = valid_body("order-select")
    body["context"]["selections"] = ["ServiceRequest/o-fvl", "ServiceRequest/o-fvl"]
    cards = assert_cards(post(bad_client, "order-select", body))
    assert topics(cards).count("not-recommended-test") == 1
    assert "not-recommended-treatment" not in topics(cards)  # prednisolone is not selected


# ------------------------------------------------------------------------------------------------
# 4. Prefetch with the wrong resource types


@pytest.mark.parametrize(
    ("key", "resource"),
    [
        ("patient", {"resourceType": "Observation", "id": "x"}),
        ("patient", {"resourceType": "Practitioner", "id": "p1"}),
        ("patient", searchset([patient()])),
        ("practitioner", {"resourceType": "Patient", "id": "dr1"}),
        ("conditions", miscarriage("c9", "2024-01-01")),
        ("observations", tsh_observation("t9", 2.0, "2024-01-01")),
        ("procedures", {"resourceType": "Parameters"}),
        ("familyHistory", {"resourceType": "bundle"}),
    ],
    ids=lambda v: v if isinstance(v, str) else v.get("resourceType"),
)
def test_prefetch_of_the_wrong_resource_type_is_400_naming_the_key(bad_client, key, resource):
    prefetch = full_prefetch(LOSSES)
    prefetch[key] = resource
    assert_outcome(post(bad_client, "patient-view", hook_request(prefetch=prefetch)), 400, f"prefetch.{key}")


@pytest.mark.parametrize("value", ["Patient/p1", 1, ["x"], True, {"id": "p1"}, {"resourceType": 7}])
def test_prefetch_value_that_is_not_a_resource_is_400(bad_client, value):
    prefetch = full_prefetch(LOSSES)
    prefetch["patient"] = value
    assert_outcome(post(bad_client, "patient-view", hook_request(prefetch=prefetch)), 400, "prefetch")


def test_search_bundle_with_resources_of_other_types_is_read_by_type(bad_client):
    """A Condition search that also holds an Observation: the service reads each resource by its
    own type (a TSH misfiled under `conditions` still counts as a TSH)."""
    prefetch = full_prefetch(LOSSES)
    prefetch["conditions"]["entry"].append({"resource": tsh_observation("t1", 2.0, "2024-02-01")})
    prefetch["conditions"]["entry"].append({"resource": {"resourceType": "Basic", "id": "b1"}})
    cards = assert_cards(post(bad_client, "patient-view", hook_request(prefetch=prefetch)))
    assert "rpl-summary" in topics(cards) and "tsh-missing" not in topics(cards)


def test_junk_entries_in_a_search_bundle_are_skipped(bad_client):
    prefetch = full_prefetch(LOSSES)
    prefetch["conditions"]["entry"] += ["junk", 5, None, {}, {"resource": "x"}, {"resource": [1]},
                                        {"resource": {"no": "resourceType"}}]
    cards = assert_cards(post(bad_client, "patient-view", hook_request(prefetch=prefetch)))
    assert loss_count(cards) == 2


@pytest.mark.parametrize("entry", [{"resource": {}}, "entries", 3])
def test_search_bundle_entry_that_is_not_an_array_is_400(bad_client, entry):
    prefetch = full_prefetch(LOSSES)
    prefetch["observations"] = {"resourceType": "Bundle", "type": "searchset", "entry": entry}
    assert_outcome(post(bad_client, "patient-view", hook_request(prefetch=prefetch)), 400, "prefetch.observations")


@pytest.mark.parametrize("links", [True, 5, "next", {"relation": "next", "url": "x"}])
def test_search_bundle_link_that_is_not_an_array_is_400(bad_client, links):
    """A `link` that cannot be read could hide a next page: the search is refused, not read as
    complete (and never a 500)."""
    prefetch = full_prefetch(LOSSES)
    prefetch["conditions"]["link"] = links
    assert_outcome(post(bad_client, "patient-view", hook_request(prefetch=prefetch)), 400, "prefetch.conditions")


# ------------------------------------------------------------------------------------------------
# 5. Invalid FHIR inside prefetched resources: the unreadable resource is ignored (CDS Hooks lets
# the service ignore data it cannot use); the readable ones around it still count.


def third_loss(**changes) -> dict:
    resource = miscarriage("loss-x", "2024-08-10")
    for key, value in changes.items():
        if value is ...:
            resource.pop(key, None)
        else:
            resource[key] = value
    return resource


UNREADABLE_LOSSES = {
    "impossible-date": third_loss(onsetDateTime="2023-13-45"),
    "february-30": third_loss(onsetDateTime="2024-02-30"),
    "word-date": third_loss(onsetDateTime="yesterday"),
    "number-date": third_loss(onsetDateTime=20240810),
    "date-as-object": third_loss(onsetDateTime={"value": "2024-08-10"}),
    "period-as-string": third_loss(onsetDateTime=..., onsetPeriod="2024-08-10"),
    "coding-as-object": third_loss(code={"coding": {"system": SNOMED, "code": "17369002"}}),
    "code-as-string": third_loss(code="17369002"),
    "code-as-number": third_loss(code={"coding": [{"system": SNOMED, "code": 17369002}]}),
    "system-as-array": third_loss(code={"coding": [{"system": [SNOMED], "code": "17369002"}]}),
    "clinical-status-as-array": third_loss(clinicalStatus=[{"coding": [{"code": "resolved"}]}]),
    "no-resource-type": {k: v for k, v in third_loss().items() if k != "resourceType"},
    "resource-type-number": third_loss(resourceType=5),
    "resource-type-lowercase": third_loss(resourceType="condition"),
    "everything-null": dict.fromkeys(third_loss(), None) | {"resourceType": "Condition"},
    "resource-type-array": pytest.param(third_loss(resourceType=["Condition"])),
    "resource-type-object": pytest.param(third_loss(resourceType={"code": "Condition"})),
}


@pytest.mark.parametrize("resource", UNREADABLE_LOSSES.values(), ids=UNREADABLE_LOSSES.keys())
def test_unreadable_resource_is_ignored_and_the_rest_still_counts(bad_client, resource):
    prefetch = full_prefetch(LOSSES)
    prefetch["conditions"] = searchset([*LOSSES, resource])
    cards = assert_cards(post(bad_client, "patient-view", hook_request(prefetch=prefetch)))
    assert loss_count(cards) == 2


LENIENTLY_READ_LOSSES = {
    # Wrong container shapes a lenient reader may accept: read (3 losses) or ignored (2), not more.
    "code-as-array-of-concepts": third_loss(code=[{"coding": [{"system": SNOMED, "code": "17369002"}]}]),
    "subject-as-string": third_loss(subject="Patient/p1"),
    "dstu2-string-statuses": third_loss(clinicalStatus="resolved", verificationStatus="confirmed"),
    "r5-like-extra-members": third_loss(participant=[{"actor": {"reference": "Practitioner/x"}}]),
}


@pytest.mark.parametrize("resource", LENIENTLY_READ_LOSSES.values(), ids=LENIENTLY_READ_LOSSES.keys())
def test_oddly_shaped_resource_is_read_or_ignored(bad_client, resource):
    prefetch = full_prefetch(LOSSES)
    prefetch["conditions"] = searchset([*LOSSES, resource])
    cards = assert_cards(post(bad_client, "patient-view", hook_request(prefetch=prefetch)))
    assert loss_count(cards) in (2, 3)


TSH_VALUES = {
    "string-for-number": {"value": "2.5", "unit": "mIU/L"},
    "array-for-object": [{"value": 2.5, "unit": "mIU/L"}],
    "boolean": {"value": True, "unit": "mIU/L"},
    "object-value": {"value": {"v": 2.5}},
    "string-quantity": "2.5 mIU/L",
}


@pytest.mark.parametrize("quantity", TSH_VALUES.values(), ids=TSH_VALUES.keys())
def test_unreadable_lab_value_counts_as_no_result(bad_client, quantity):
    """A TSH whose value cannot be read is not a TSH result: the card still asks for one."""
    tsh = tsh_observation("tsh-1", 2.0, "2024-02-01")
    tsh["valueQuantity"] = quantity
    cards = assert_cards(post(bad_client, "patient-view", hook_request(prefetch=full_prefetch([*LOSSES, tsh]))))
    assert "tsh-missing" in topics(cards)
    control = assert_cards(post(bad_client, "patient-view", hook_request(
        prefetch=full_prefetch([*LOSSES, tsh_observation("tsh-1", 2.0, "2024-02-01")]))))
    assert "tsh-missing" not in topics(control)


def test_physically_impossible_lab_value_is_not_reported_as_abnormal(bad_client):
    """A negative TSH concentration is a data error, not an abnormal thyroid: the card must not
    advise a free T4 because of it."""
    tsh = tsh_observation("tsh-neg", -1.0, "2024-02-01")
    cards = assert_cards(post(bad_client, "patient-view", hook_request(prefetch=full_prefetch([*LOSSES, tsh]))))
    assert "ft4-missing" not in topics(cards)
    # The value is printed as "-1 mIU/L" wherever a card names a TSH.
    assert not any(re.search(r"(?<![\d.])-1\b", card["summary"] + card.get("detail", "")) for card in cards)


@pytest.mark.parametrize(
    "patient_resource",
    [
        {**patient(), "birthDate": "1992-02-30"},
        {**patient(), "birthDate": 1992},
        {**patient(), "birthDate": ["1992-05-01"]},
        {**patient(), "gender": ["female"]},
        {**patient(), "name": "Jansen"},
        {"resourceType": "Patient"},
    ],
    ids=["feb-30", "number", "array", "gender-array", "name-string", "bare"],
)
def test_unreadable_patient_details_are_ignored(bad_client, patient_resource):
    prefetch = full_prefetch(LOSSES, patient_resource)
    cards = assert_cards(post(bad_client, "patient-view", hook_request(prefetch=prefetch)))
    assert loss_count(cards) == 2


# ------------------------------------------------------------------------------------------------
# 6. OperationOutcome as prefetch: the client could not fetch it


ERROR_OUTCOME = {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "timeout"}]}
REQUIRED_KEYS = [*SEARCH_KEYS, "patient"]


@pytest.mark.parametrize("key", REQUIRED_KEYS)
def test_operation_outcome_for_a_required_key_is_412_naming_only_that_key(bad_client, key):
    prefetch = full_prefetch(LOSSES)
    prefetch[key] = ERROR_OUTCOME
    outcome = assert_outcome(post(bad_client, "patient-view", hook_request(prefetch=prefetch)), 412, key)
    expressions = {e for issue in outcome["issue"] for e in issue["expression"]}
    assert expressions == {f"prefetch.{key}"}


@pytest.mark.parametrize(
    "outcome",
    [
        ERROR_OUTCOME,
        {"resourceType": "OperationOutcome", "issue": "broken"},
        {"resourceType": "OperationOutcome"},
        {"resourceType": "OperationOutcome", "issue": [{"severity": "information", "code": "informational"}]},
    ],
    ids=["error", "issue-not-a-list", "no-issue", "information-only"],
)
def test_any_operation_outcome_in_place_of_a_search_is_412(bad_client, outcome):
    prefetch = full_prefetch(LOSSES)
    prefetch["procedures"] = outcome
    assert_outcome(post(bad_client, "patient-view", hook_request(prefetch=prefetch)), 412, "procedures")


@pytest.mark.parametrize("hook", HOOKS)
def test_operation_outcome_for_the_optional_practitioner_gives_cards_in_the_default_language(bad_client, hook):
    body = valid_body(hook)
    body["prefetch"]["practitioner"] = {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": "not-found"}],
    }
    cards = assert_cards(post(bad_client, hook, body))
    assert cards and all("miskraam" in card["summary"].lower() for card in cards)  # Dutch


def test_bundle_of_only_an_error_outcome_is_412(bad_client):
    prefetch = full_prefetch(LOSSES)
    prefetch["familyHistory"] = searchset([ERROR_OUTCOME])
    assert_outcome(post(bad_client, "patient-view", hook_request(prefetch=prefetch)), 412, "familyHistory")


# ------------------------------------------------------------------------------------------------
# 7. Unicode and huge strings in codes and texts


ODD_CODES = {
    "math-letters": "𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "rtl-override": "\u202e9-86612",  # the FVL code reversed behind a right-to-left override
    "zero-width": "21668\u200b-9",
    "nul": "21668\u0000-9",
    "emoji": "🧬🩸",
    "combining": "2\u03001668-9",
    "huge": "9" * 1_000_000,
}


@pytest.mark.parametrize("code", ODD_CODES.values(), ids=ODD_CODES.keys())
def test_odd_codes_in_a_draft_order_match_nothing(bad_client, code):
    """Look-alike codes are not the Factor V Leiden code: no warning, no error, a valid answer."""
    order = service_request("o-odd", LOINC, code, code[:200])
    body = hook_request("order-sign", prefetch=full_prefetch(THREE_LOSSES), draft_orders=[order])
    cards = assert_cards(post(bad_client, "order-sign", body))
    assert "not-recommended-test" not in topics(cards)


@pytest.mark.parametrize("code", ODD_CODES.values(), ids=ODD_CODES.keys())
def test_odd_codes_in_prefetch_are_ignored(bad_client, code):
    odd = third_loss(code={"coding": [{"system": SNOMED, "code": code, "display": code[:1000]}]})
    prefetch = full_prefetch(LOSSES)
    prefetch["conditions"] = searchset([*LOSSES, odd])
    assert loss_count(assert_cards(post(bad_client, "patient-view", hook_request(prefetch=prefetch)))) == 2


@pytest.mark.parametrize(
    "where",
    ["display", "text", "note", "dosage"],
)
def test_huge_texts_on_a_recognised_order_keep_the_warning_and_a_short_card(bad_client, where):
    huge = "Ø" * 300_000
    fvl = copy.deepcopy(FACTOR_V_LEIDEN)
    pred = copy.deepcopy(PREDNISOLONE)
    if where == "display":
        fvl["code"]["coding"][0]["display"] = huge
    elif where == "text":
        fvl["code"]["text"] = huge
    elif where == "note":
        fvl["note"] = [{"text": huge}]
    else:
        pred["dosageInstruction"] = [{"text": huge}]
    body = hook_request("order-sign", prefetch=full_prefetch(THREE_LOSSES), draft_orders=[fvl, pred])
    response = post(bad_client, "order-sign", body)
    cards = assert_cards(response)
    assert {"not-recommended-test", "not-recommended-treatment"} <= set(topics(cards))
    assert len(response.data) < 100_000  # the huge text is not copied into the cards


def test_many_codings_on_one_order(bad_client):
    fvl = copy.deepcopy(FACTOR_V_LEIDEN)
    fvl["code"]["coding"] = [{"system": "http://example.org", "code": str(i)} for i in range(20_000)] + fvl["code"]["coding"]
    body = hook_request("order-sign", prefetch=full_prefetch(THREE_LOSSES), draft_orders=[fvl])
    assert "not-recommended-test" in topics(assert_cards(post(bad_client, "order-sign", body)))


@pytest.mark.parametrize(
    ("path", "value"),
    [
        pytest.param(("hook",), "h" * 3_000_000),
        pytest.param(("context",), ["x" * 3_000_000]),
        pytest.param(("context", "draftOrders"), [{"note": "n" * 3_000_000}]),
        (("context", "patientId"), "p" * 3_000_000),
        (("hookInstance",), "i" * 3_000_000),
        pytest.param(("prefetch", "patient"), {"resourceType": "P" * 3_000_000}),
    ],
    ids=["hook", "context-array", "draftOrders-array", "patientId", "hookInstance", "prefetch-type"],
)
def test_error_message_stays_short_however_large_the_bad_value(bad_client, path, value):
    """A clear message names the field; it does not echo megabytes of the client's input."""
    hook = "order-sign" if path[-1] == "draftOrders" else "patient-view"
    body = valid_body(hook)
    set_path(body, path, value)
    response = post(bad_client, hook, body)
    assert_outcome(response, 400, path[-1] if isinstance(path[-1], str) else "")
    assert len(response.data) < 2_000, f"{len(response.data)} bytes of error message"


# ------------------------------------------------------------------------------------------------
# 8. DSTU2, STU3 and R5 shapes (CDS Hooks does not say which FHIR version a client speaks)


DSTU2_MEDICATION_ORDER = {
    "resourceType": "MedicationOrder",
    "id": "mo-1",
    "status": "draft",
    "dateWritten": "2025-06-01",
    "patient": {"reference": "Patient/p1"},
    "medicationCodeableConcept": {"coding": [{"system": ATC, "code": "H02AB06", "display": "prednisolone"}]},
    "dosageInstruction": [{"text": "1 dd 10 mg"}],
}
STU3_PROCEDURE_REQUEST = service_request("pr-1", LOINC, "21668-9", "Factor V Leiden", resourceType="ProcedureRequest")
R5_MEDICATION_REQUEST = {
    "resourceType": "MedicationRequest",
    "id": "mr-r5",
    "status": "draft",
    "intent": "order",
    "subject": {"reference": "Patient/p1"},
    "medication": {"concept": {"coding": [{"system": ATC, "code": "H02AB06", "display": "prednisolone"}]}},
    "reason": [{"concept": {"text": "herhaalde miskraam"}}],
}
DRAFT_SHAPES = {
    "dstu2-medication-order": (DSTU2_MEDICATION_ORDER, "not-recommended-treatment"),
    "stu3-procedure-request": (STU3_PROCEDURE_REQUEST, "not-recommended-test"),
    "r5-medication-codeable-reference": (R5_MEDICATION_REQUEST, "not-recommended-treatment"),
}


@pytest.mark.parametrize("hook", ["order-select", "order-sign"])
@pytest.mark.parametrize(("order", "expected"), DRAFT_SHAPES.values(), ids=DRAFT_SHAPES.keys())
def test_other_fhir_versions_of_an_advised_against_order_are_warned(bad_client, hook, order, expected):
    body = hook_request(hook, prefetch=full_prefetch(THREE_LOSSES), draft_orders=[order])
    cards = assert_cards(post(bad_client, hook, body))
    assert expected in topics(cards)


def test_r5_medication_by_reference_to_an_unknown_medication_is_not_guessed(bad_client):
    order = copy.deepcopy(R5_MEDICATION_REQUEST)
    order["medication"] = {"reference": {"reference": "Medication/not-in-the-request"}}
    body = hook_request("order-sign", prefetch=full_prefetch(THREE_LOSSES), draft_orders=[order])
    assert "not-recommended-treatment" not in topics(assert_cards(post(bad_client, "order-sign", body)))


def test_dstu2_medication_order_in_prefetch_is_read(bad_client):
    """An active prednisolone MedicationOrder (DSTU2) in the prefetched medicationRequests is
    running medication the guideline advises against: the summary names it, as for R4."""
    texts = {}
    for version, order in (("dstu2", DSTU2_MEDICATION_ORDER), ("r4", PREDNISOLONE)):
        prefetch = full_prefetch(THREE_LOSSES)
        prefetch["medicationRequests"] = searchset([{**order, "status": "active"}])
        cards = assert_cards(post(bad_client, "patient-view", hook_request(prefetch=prefetch)))
        texts[version] = cards[topics(cards).index("rpl-summary")]["detail"]
    assert "prednison" in texts["dstu2"]
    assert texts["dstu2"] == texts["r4"]


PRACTITIONERS = {
    "r5-communication-language-en": ([{"language": {"coding": [{"system": BCP47, "code": "en"}]}}], "en"),
    "r4-communication-en-GB": ([{"coding": [{"system": BCP47, "code": "en-GB"}]}], "en"),
    "r4-communication-nl": ([{"coding": [{"system": BCP47, "code": "nl"}]}], "nl"),
    "unsupported-language-fr": ([{"coding": [{"system": BCP47, "code": "fr"}]}], "nl"),
    "communication-string": ("en", "nl"),
    "communication-object": ({"coding": [{"code": "en"}]}, "nl"),
    "coding-string": ([{"coding": "en"}], "nl"),
    "code-array": ([{"coding": [{"code": ["en"]}]}], "nl"),
    "language-string": ([{"language": "en"}], "nl"),
}


@pytest.mark.parametrize(("communication", "language"), PRACTITIONERS.values(), ids=PRACTITIONERS.keys())
def test_practitioner_language_in_every_shape(bad_client, communication, language):
    practitioner = {"resourceType": "Practitioner", "id": "dr1", "communication": communication}
    prefetch = full_prefetch(LOSSES, practitioner=practitioner)
    cards = assert_cards(post(bad_client, "patient-view", hook_request(prefetch=prefetch)))
    summary = cards[topics(cards).index("rpl-summary")]["summary"]
    assert ("verliezen" in summary) == (language == "nl"), summary


# ------------------------------------------------------------------------------------------------
# 9. Draft orders with invalid details: the order is still judged


@pytest.mark.parametrize(
    ("member", "value"),
    [("authoredOn", "2025-02-30"), ("authoredOn", "gisteren"), ("authoredOn", 20250601)],
)
def test_draft_order_with_an_unreadable_date_is_still_warned_or_refused(bad_client, member, value):
    """The order date plays no part in the warning. Silently dropping the order would hide the
    warning from the clinician: the answer must be the warning, or a 400 naming the field."""
    pred = {**PREDNISOLONE, member: value}
    body = hook_request("order-sign", prefetch=full_prefetch(THREE_LOSSES), draft_orders=[pred])
    response = post(bad_client, "order-sign", body)
    if response.status_code == 400:
        assert_outcome(response, 400, member)
    else:
        assert "not-recommended-treatment" in topics(assert_cards(response))


# ------------------------------------------------------------------------------------------------
# 10. Hypothesis: random mutations of valid requests


def json_paths(node, prefix: tuple = ()) -> list[tuple]:
    paths = []
    if isinstance(node, dict):
        items = node.items()
    elif isinstance(node, list):
        items = enumerate(node)
    else:
        return paths
    for key, value in items:
        path = (*prefix, key)
        paths.append(path)
        paths.extend(json_paths(value, path))
    return paths


REPLACEMENTS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=30),
    st.sampled_from(["", " ", "Patient/p1", "2024-02-30", "draft", "Bundle", "OperationOutcome", "\u202e", "𝔘"]),
    st.just("x" * 100_000),
    st.lists(st.one_of(st.none(), st.integers(), st.text(max_size=5)), max_size=3),
    st.dictionaries(st.text(max_size=8), st.one_of(st.none(), st.integers(), st.text(max_size=5)), max_size=3),
)


def mutate(data, body: dict, max_mutations: int = 3) -> list[str]:
    """Apply 1..max_mutations random deletions / type changes at random JSON paths."""
    done = []
    for _ in range(data.draw(st.integers(1, max_mutations), label="mutations")):
        paths = json_paths(body)
        if not paths:
            break
        path = data.draw(st.sampled_from(paths), label="path")
        kind = data.draw(st.sampled_from(["delete", "replace", "wrap", "unwrap"]), label="kind")
        parent = body
        for part in path[:-1]:
            parent = parent[part]
        current = parent[path[-1]]
        if kind == "delete":
            del parent[path[-1]]
        elif kind == "wrap":
            parent[path[-1]] = [current]
        elif kind == "unwrap" and isinstance(current, list) and current:
            parent[path[-1]] = current[0]
        else:
            parent[path[-1]] = data.draw(REPLACEMENTS, label="value")
        done.append(f"{kind} {'.'.join(map(str, path))}")
    return done


def check_client_answer(response, allowed: set[int]) -> None:
    assert response.status_code in allowed, (response.status_code, response.get_data(as_text=True)[:1000])
    if response.status_code != 200:
        assert_outcome(response, response.status_code)


SEED_BODIES = {hook: valid_body(hook) for hook in HOOKS}


@settings(
    max_examples=MUTATION_EXAMPLES,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=st.data())
def test_mutated_hook_requests_get_a_client_status_never_500(bad_client, data):
    hook = data.draw(st.sampled_from(HOOKS), label="hook")
    body = copy.deepcopy(SEED_BODIES[hook])
    mutate(data, body)
    response = post(bad_client, hook, body)
    check_client_answer(response, CLIENT_STATUSES)
    if response.status_code == 200:
        validator("hook-response.schema.json").validate(response.get_json())


@pytest.fixture(scope="module")
def issued_card(bad_app) -> dict:
    client = bad_app.test_client()
    cards = assert_cards(post(client, "order-select", valid_body("order-select")))
    return next(card for card in cards if card["source"]["topic"]["code"] == "not-recommended-test")


@settings(
    max_examples=max(MUTATION_EXAMPLES // 2, 10),
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_mutated_feedback_gets_a_client_status_never_500(bad_client, issued_card, data):
    suggestion = issued_card["suggestions"][0]["uuid"]
    stamp = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    body = {
        "feedback": [
            {"card": issued_card["uuid"], "outcome": "accepted", "outcomeTimestamp": stamp,
             "acceptedSuggestions": [{"id": suggestion}]},
            {"card": issued_card["uuid"], "outcome": "overridden", "outcomeTimestamp": stamp,
             "overrideReason": {"reason": {"system": "https://example.org/reason", "code": "x"},
                                "userComment": "c"}},
        ]
    }
    mutate(data, body)
    response = bad_client.post(FEEDBACK_URL, json=body)
    check_client_answer(response, {200, 400, 413, 415})
    if response.status_code == 200:
        validator("feedback-response.schema.json").validate(response.get_json())
