"""Small builders for FHIR R4 resources (plain dicts) used by the fhir_mappings tests.

Each builder returns the minimal resource a real EHR would send for that fact; keyword arguments
add or override fields. Codes are passed in explicitly by the tests so that a test names the code it
relies on.
"""

from __future__ import annotations

import itertools
from datetime import date

LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
ICD10 = "http://hl7.org/fhir/sid/icd-10"
ICD10CM = "http://hl7.org/fhir/sid/icd-10-cm"
ATC = "http://www.whocc.no/atc"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
ROLE = "http://terminology.hl7.org/CodeSystem/v3-RoleCode"
UCUM = "http://unitsofmeasure.org"
INTERPRETATION = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
CONDITION_CLINICAL = "http://terminology.hl7.org/CodeSystem/condition-clinical"
CONDITION_VERIFICATION = "http://terminology.hl7.org/CodeSystem/condition-ver-status"
ORDER_CONTEXT = "https://rpl-cds.example.org/fhir/CodeSystem/order-context"

_ids = itertools.count(1)


def _id(prefix: str) -> str:
    return f"{prefix}-{next(_ids)}"


def cc(system: str, code: str, display: str | None = None) -> dict:
    coding = {"system": system, "code": code}
    if display:
        coding["display"] = display
    return {"coding": [coding]}


def iso(day: date | str | None) -> str | None:
    return day.isoformat() if isinstance(day, date) else day


def patient(birth: date | str | None = "1992-06-15", gender: str = "female", **extra) -> dict:
    r = {"resourceType": "Patient", "id": extra.pop("id", "pat-1"), "gender": gender}
    if birth is not None:
        r["birthDate"] = iso(birth)
    r.update(extra)
    return r


def condition(
    system: str,
    code: str,
    onset: date | str | None = None,
    *,
    clinical: str | None = "active",
    verification: str | None = "confirmed",
    recorded: date | str | None = None,
    **extra,
) -> dict:
    r: dict = {"resourceType": "Condition", "id": extra.pop("id", _id("cond")), "code": cc(system, code),
               "subject": {"reference": "Patient/pat-1"}}
    if clinical is not None:
        r["clinicalStatus"] = cc(CONDITION_CLINICAL, clinical)
    if verification is not None:
        r["verificationStatus"] = cc(CONDITION_VERIFICATION, verification)
    if onset is not None:
        r["onsetDateTime"] = iso(onset)
    if recorded is not None:
        r["recordedDate"] = iso(recorded)
    r.update(extra)
    return r


def observation(
    system: str,
    code: str,
    effective: date | str | None = "2024-01-10",
    *,
    value: float | None = None,
    unit: str | None = None,
    low: float | None = None,
    high: float | None = None,
    interpretation: str | None = None,
    status: str = "final",
    **extra,
) -> dict:
    r: dict = {"resourceType": "Observation", "id": extra.pop("id", _id("obs")), "status": status,
               "code": cc(system, code), "subject": {"reference": "Patient/pat-1"}}
    if effective is not None:
        r["effectiveDateTime"] = iso(effective)
    if value is not None:
        r["valueQuantity"] = {"value": value, "unit": unit, "system": UCUM, "code": unit}
    if low is not None or high is not None:
        rng: dict = {}
        if low is not None:
            rng["low"] = {"value": low, "unit": unit}
        if high is not None:
            rng["high"] = {"value": high, "unit": unit}
        r["referenceRange"] = [rng]
    if interpretation is not None:
        r["interpretation"] = [cc(INTERPRETATION, interpretation)]
    r.update(extra)
    return r


def service_request(
    system: str,
    code: str,
    *,
    status: str = "active",
    intent: str = "order",
    authored: date | str | None = "2024-02-01",
    reasons: list[tuple[str, str]] = (),
    **extra,
) -> dict:
    r: dict = {"resourceType": "ServiceRequest", "id": extra.pop("id", _id("sr")), "status": status,
               "intent": intent, "code": cc(system, code), "subject": {"reference": "Patient/pat-1"}}
    if authored is not None:
        r["authoredOn"] = iso(authored)
    if reasons:
        r["reasonCode"] = [cc(s, c) for s, c in reasons]
    r.update(extra)
    return r


def medication_request(
    system: str,
    code: str,
    *,
    status: str = "active",
    intent: str = "order",
    authored: date | str | None = "2024-02-01",
    dose_mg: float | None = None,
    dosage_text: str | None = None,
    reasons: list[tuple[str, str]] = (),
    **extra,
) -> dict:
    r: dict = {"resourceType": "MedicationRequest", "id": extra.pop("id", _id("mr")), "status": status,
               "intent": intent, "medicationCodeableConcept": cc(system, code),
               "subject": {"reference": "Patient/pat-1"}}
    if authored is not None:
        r["authoredOn"] = iso(authored)
    dosage: dict = {}
    if dosage_text is not None:
        dosage["text"] = dosage_text
    if dose_mg is not None:
        dosage["doseAndRate"] = [{"doseQuantity": {"value": dose_mg, "unit": "mg", "system": UCUM, "code": "mg"}}]
    if dosage:
        r["dosageInstruction"] = [dosage]
    if reasons:
        r["reasonCode"] = [cc(s, c) for s, c in reasons]
    r.update(extra)
    return r


def medication_administration(system: str, code: str, effective: date | str = "2024-02-01", *,
                              status: str = "completed", **extra) -> dict:
    r = {"resourceType": "MedicationAdministration", "id": extra.pop("id", _id("ma")), "status": status,
         "medicationCodeableConcept": cc(system, code), "subject": {"reference": "Patient/pat-1"},
         "effectiveDateTime": iso(effective)}
    r.update(extra)
    return r


def medication_statement(system: str, code: str, *, status: str = "active", **extra) -> dict:
    r = {"resourceType": "MedicationStatement", "id": extra.pop("id", _id("ms")), "status": status,
         "medicationCodeableConcept": cc(system, code), "subject": {"reference": "Patient/pat-1"},
         "effectiveDateTime": "2024-01-01"}
    r.update(extra)
    return r


def procedure(system: str, code: str, performed: date | str = "2023-05-01", *, status: str = "completed",
              **extra) -> dict:
    r = {"resourceType": "Procedure", "id": extra.pop("id", _id("proc")), "status": status,
         "code": cc(system, code), "subject": {"reference": "Patient/pat-1"}, "performedDateTime": iso(performed)}
    r.update(extra)
    return r


def family_history(relationship: tuple[str, str], *conditions: tuple[str, str], status: str = "completed",
                   **extra) -> dict:
    r = {"resourceType": "FamilyMemberHistory", "id": extra.pop("id", _id("fmh")), "status": status,
         "patient": {"reference": "Patient/pat-1"}, "relationship": cc(*relationship),
         "condition": [{"code": cc(*c)} for c in conditions]}
    r.update(extra)
    return r


def bundle(*resources: dict, with_type: bool = True) -> dict:
    b: dict = {"resourceType": "Bundle", "entry": [{"resource": r} for r in resources]}
    if with_type:
        b["type"] = "searchset"
    return b
