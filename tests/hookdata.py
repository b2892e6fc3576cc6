"""Builders for CDS Hooks requests used across the tests (plain dicts, as an EHR sends them)."""

from __future__ import annotations

import copy
import uuid

SERVICE_FOR_HOOK = {
    "patient-view": "rpl-patient-view",
    "order-select": "rpl-order-select",
    "order-sign": "rpl-order-sign",
}
# The prefetch searches the service declares (pinned against discovery in tests/test_discovery.py).
SEARCH_KEY_BY_TYPE = {
    "Condition": "conditions",
    "Observation": "observations",
    "ServiceRequest": "serviceRequests",
    "MedicationRequest": "medicationRequests",
    "MedicationAdministration": "medicationAdministrations",
    "Procedure": "procedures",
    "FamilyMemberHistory": "familyHistory",
}
SEARCH_KEYS = tuple(SEARCH_KEY_BY_TYPE.values())


def searchset(resources: list[dict]) -> dict:
    return {
        "resourceType": "Bundle",
        "type": "searchset",
        "total": len(resources),
        "entry": [{"fullUrl": f"urn:uuid:{uuid.uuid4()}", "resource": r} for r in resources],
    }


def patient(patient_id: str = "p1", birth_date: str = "1992-05-01") -> dict:
    return {"resourceType": "Patient", "id": patient_id, "gender": "female", "birthDate": birth_date}


def full_prefetch(
    resources: list[dict], patient_resource: dict | None = None, practitioner: dict | None = None
) -> dict:
    """Sort resources into the service's prefetch keys, as an EHR fulfilling them would."""
    grouped: dict[str, list[dict]] = {key: [] for key in SEARCH_KEYS}
    for resource in resources:
        grouped[SEARCH_KEY_BY_TYPE[resource["resourceType"]]].append(resource)
    prefetch = {key: searchset(items) for key, items in grouped.items()}
    prefetch["patient"] = patient_resource or patient()
    # The optional user key: null = "no data" (the EHR has no Practitioner for this user).
    prefetch["practitioner"] = practitioner
    return prefetch


def hook_request(
    hook: str = "patient-view",
    *,
    patient_id: str = "p1",
    prefetch: dict | None = None,
    draft_orders: list[dict] | None = None,
    selections: list[str] | None = None,
    fhir_server: str | None = None,
    access_token: str | None = None,
    user_id: str = "Practitioner/dr1",
) -> dict:
    context: dict = {"userId": user_id, "patientId": patient_id}
    if hook in ("order-select", "order-sign"):
        orders = draft_orders or []
        context["draftOrders"] = {
            "resourceType": "Bundle",
            "type": "collection",
            "entry": [{"resource": copy.deepcopy(o)} for o in orders],
        }
        if hook == "order-select":
            context["selections"] = selections or [
                f"{o['resourceType']}/{o['id']}" for o in orders[:1]
            ]
    body: dict = {"hook": hook, "hookInstance": str(uuid.uuid4()), "context": context}
    if prefetch is not None:
        body["prefetch"] = prefetch
    if fhir_server:
        body["fhirServer"] = fhir_server
    if access_token:
        body["fhirAuthorization"] = {
            "access_token": access_token,
            "token_type": "Bearer",
            "expires_in": 300,
            "scope": "user/*.read",
            "subject": "rpl-cds",
        }
    return body


def service_request(order_id: str, system: str, code: str, display: str = "", **extra) -> dict:
    resource = {
        "resourceType": "ServiceRequest",
        "id": order_id,
        "status": "draft",
        "intent": "order",
        "subject": {"reference": "Patient/p1"},
        "code": {"coding": [{"system": system, "code": code, "display": display or code}]},
    }
    resource.update(extra)
    return resource


def miscarriage(condition_id: str, onset: str, patient_id: str = "p1") -> dict:
    return {
        "resourceType": "Condition",
        "id": condition_id,
        "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical", "code": "resolved"}]},
        "verificationStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-ver-status", "code": "confirmed"}]},
        "code": {"coding": [{"system": "http://snomed.info/sct", "code": "17369002", "display": "Miscarriage"}]},
        "subject": {"reference": f"Patient/{patient_id}"},
        "onsetDateTime": onset,
    }


def tsh_observation(obs_id: str, value: float, when: str, patient_id: str = "p1") -> dict:
    return {
        "resourceType": "Observation",
        "id": obs_id,
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "3016-3", "display": "TSH"}]},
        "subject": {"reference": f"Patient/{patient_id}"},
        "effectiveDateTime": when,
        "valueQuantity": {"value": value, "unit": "mIU/L"},
        "referenceRange": [{"low": {"value": 0.4}, "high": {"value": 4.0}}],
    }
