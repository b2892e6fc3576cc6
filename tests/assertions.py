"""Assertions shared by the test modules."""

from __future__ import annotations

import json

from service.validation import validator


def assert_outcome(response, status: int, *fragments: str) -> dict:
    """`status` and an application/fhir+json OperationOutcome (schema-valid) naming every fragment;
    returns the body."""
    assert response.status_code == status, response.get_data(as_text=True)[:2000]
    assert response.mimetype == "application/fhir+json"
    body = response.get_json()
    validator("operation-outcome.schema.json").validate(body)
    text = json.dumps(body)
    for fragment in fragments:
        assert fragment in text, f"{fragment!r} not in {text[:2000]}"
    return body
