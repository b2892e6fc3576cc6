"""The compiled yes/no schema check (service/fast_schema.py) must agree with jsonschema on every
instance: it decides alone when a request is valid, so a disagreement would let an invalid request
through (or refuse a valid one with no error to show)."""

from __future__ import annotations

import copy

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.fast_schema import Unsupported, compile_schema
from service.validation import fast_check, validator
from tests.hookdata import hook_request, service_request

COMPILED = [
    "hook-request.schema.json",
    "context-patient-view.schema.json",
    "context-order-select.schema.json",
    "context-order-sign.schema.json",
    "draft-orders.schema.json",
    "feedback-response.schema.json",
    "operation-outcome.schema.json",
]


def valid_examples(name: str) -> list[object]:
    orders = [service_request("o1", "http://loinc.org", "3016-3", "TSH"),
              service_request("o2", "http://loinc.org", "21668-9", "Factor V Leiden")]
    bodies = [
        hook_request("patient-view"),
        hook_request("order-select", draft_orders=orders),
        hook_request("order-sign", draft_orders=orders, fhir_server="https://ehr.example.org/fhir",
                     access_token="abc"),
    ]
    if name == "hook-request.schema.json":
        return bodies
    if name.startswith("context-"):
        hook = name.removeprefix("context-").removesuffix(".schema.json")
        return [b["context"] for b in bodies if b["hook"] == hook]
    if name == "draft-orders.schema.json":
        return [bodies[1]["context"]["draftOrders"]]
    if name == "feedback-response.schema.json":
        return [{"received": 2, "stored": 1, "duplicates": 1}]
    return [{"resourceType": "OperationOutcome",
             "issue": [{"severity": "error", "code": "invalid", "details": {"text": "x"}}]}]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 10**20) | st.floats(allow_nan=False, allow_infinity=False)
    | st.sampled_from(["", "p1", "p1\n", "Practitioner/dr1", "Bundle", "bearer", "Bearer", "http://x",
                       "order-sign", "ServiceRequest/o1", "a b", "é" * 70, "x" * 201])
    | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(
        st.sampled_from(["hook", "hookInstance", "context", "prefetch", "fhirServer", "fhirAuthorization",
                         "patientId", "userId", "encounterId", "selections", "draftOrders", "entry",
                         "resource", "resourceType", "id", "extension", "token_type", "expires_in",
                         "access_token", "scope", "subject", "x"]),
        children, max_size=4),
    max_leaves=12,
)


def paths(value, prefix=()):
    yield prefix
    if isinstance(value, dict):
        for key, child in value.items():
            yield from paths(child, (*prefix, key))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            yield from paths(child, (*prefix, index))


@st.composite
def mutated(draw, name: str):
    """A valid example with one to three changes: a value replaced, a member removed or added."""
    instance = copy.deepcopy(draw(st.sampled_from(valid_examples(name))))
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(list(paths(instance))))
        if not path:
            instance = draw(json_values)
            continue
        parent = instance
        for step in path[:-1]:
            parent = parent[step]
        action = draw(st.sampled_from(["replace", "remove", "add"]))
        if action == "replace" or (action == "remove" and isinstance(parent, list)):
            parent[path[-1]] = draw(json_values)
        elif action == "remove":
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[draw(st.sampled_from(["x", "fhirServer", "encounterId", "type"]))] = draw(json_values)
    return instance


@pytest.mark.parametrize("name", COMPILED)
def test_every_hook_path_schema_is_compiled_and_accepts_the_valid_examples(name):
    check = fast_check(name)
    assert check is not None
    for example in valid_examples(name):
        assert validator(name).is_valid(example)
        assert check(example)


@pytest.mark.parametrize("name", COMPILED)
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_the_fast_check_agrees_with_jsonschema_on_mutated_requests(name, data):
    instance = data.draw(mutated(name))
    assert fast_check(name)(instance) == validator(name).is_valid(instance), instance


@pytest.mark.parametrize("name", COMPILED)
@settings(max_examples=200, deadline=None)
@given(instance=json_values)
def test_the_fast_check_agrees_with_jsonschema_on_any_json(name, instance):
    assert fast_check(name)(instance) == validator(name).is_valid(instance), instance


@pytest.mark.parametrize("schema", [
    {"type": "string", "format": "uri"},
    {"oneOf": [{"type": "string"}]},
    {"$ref": "#/$defs/x"},
    {"const": 1},
    {"items": [{"type": "string"}]},
])
def test_keywords_the_compiler_does_not_implement_are_refused(schema):
    with pytest.raises(Unsupported):
        compile_schema(schema)


def test_json_schema_number_types_are_followed():
    integer = compile_schema({"type": "integer", "minimum": 0})
    assert integer(3) and integer(3.0) and not integer(3.5) and not integer(True) and not integer(-1)
    number = compile_schema({"type": "number"})
    assert number(1) and number(1.5) and not number(False) and not number("1")
