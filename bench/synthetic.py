"""Synthetic but realistic patient records and CDS Hooks requests for the benchmark.

A record of N resources is what an EHR would prefetch for a woman with recurrent miscarriage and a
long chart: three miscarriage Conditions plus other problems, years of lab Observations (TSH, FT4,
antiphospholipid antibodies, hormone and vitamin labs), the ServiceRequests that ordered them,
MedicationRequests and -Administrations (folic acid, levothyroxine, aspirin, heparin, progesterone),
Procedures and FamilyMemberHistory. Clinical codes are taken from shared/reference/codes.md
(VERIFIED rows); filler problems use an example.org code system, so nothing here invents a real code.

Everything is deterministic for a given size (seeded), so the service, the echo endpoint and the
FHIR server all see the same record.
"""

from __future__ import annotations

import random
import uuid
from datetime import date, timedelta

import orjson

from service.services import search_key_by_resource_type, service_id_by_hook

LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
ATC = "http://www.whocc.no/atc"
NOISE = "http://example.org/fhir/CodeSystem/rpl-cds-bench-filler"
CLINICAL = "http://terminology.hl7.org/CodeSystem/condition-clinical"
VERIFICATION = "http://terminology.hl7.org/CodeSystem/condition-ver-status"
OBS_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"

PATIENT_ID = "bench-p1"
PRACTITIONER_ID = "bench-dr1"
# Placeholders the load generator replaces per request (a fresh hookInstance, a patient from a
# pool) without re-serialising a multi-megabyte body.
HOOK_INSTANCE_PLACEHOLDER = "00000000-0000-4000-8000-00000000beef"
PATIENT_PLACEHOLDER = "bench-patient-placeholder"

# (code, display, unit, typical low, typical high)
LABS = [
    ("3016-3", "Thyrotropin [Units/volume] in Serum or Plasma", "mIU/L", 0.4, 6.0),
    ("3024-7", "Thyroxine (T4) free [Mass/volume] in Serum or Plasma", "ng/dL", 0.8, 1.9),
    ("14920-3", "Thyroxine (T4) free [Moles/volume] in Serum or Plasma", "pmol/L", 10, 24),
    ("8099-4", "Thyroperoxidase Ab [Units/volume] in Serum or Plasma", "[IU]/mL", 0, 60),
    ("6303-2", "dRVVT (LA screen)", "s", 30, 50),
    ("57838-5", "dRVVT W excess phospholipid (LA confirm)", "s", 28, 45),
    ("3181-5", "Cardiolipin IgG Ab [Units/volume] in Serum by Immunoassay", "[GPL'U]/mL", 0, 40),
    ("3182-3", "Cardiolipin IgM Ab [Units/volume] in Serum by Immunoassay", "[MPL'U]/mL", 0, 40),
    ("44448-9", "Beta 2 glycoprotein 1 IgG Ab [Units/volume] in Serum or Plasma", "U/mL", 0, 30),
    ("44449-7", "Beta 2 glycoprotein 1 IgM Ab [Units/volume] in Serum or Plasma", "U/mL", 0, 30),
    ("15067-2", "Follitropin [Units/volume] in Serum or Plasma", "[IU]/L", 2, 15),
    ("2842-3", "Prolactin [Mass/volume] in Serum or Plasma", "ug/L", 3, 30),
    ("38476-8", "Mullerian inhibiting substance [Mass/volume] in Serum or Plasma", "ng/mL", 0.5, 6),
    ("2839-9", "Progesterone [Mass/volume] in Serum or Plasma", "ng/mL", 0.2, 25),
    ("62292-8", "25-Hydroxyvitamin D2+D3 [Mass/volume] in Serum or Plasma", "ng/mL", 10, 60),
]
# (system, code, display) of miscarriage Conditions (codes.md section A, VERIFIED)
MISCARRIAGE_CODES = [
    (SNOMED, "17369002", "Miscarriage"),
    (SNOMED, "19169002", "Miscarriage in first trimester"),
    (SNOMED, "16607004", "Missed abortion"),
]
# (system, code, display, dose text)
MEDICATIONS = [
    (ATC, "B03BB01", "folic acid", "0.4 mg once daily"),
    (ATC, "H03AA01", "levothyroxine sodium", "25 ug once daily"),
    (ATC, "B01AC06", "acetylsalicylic acid", "80 mg once daily"),
    (ATC, "B01AB05", "enoxaparin", "40 mg subcutaneously once daily"),
    (ATC, "A11CC05", "colecalciferol", "400 IE once daily"),
]
PROCEDURES = [
    (SNOMED, "430064008", "Transvaginal obstetric ultrasonography"),
    (SNOMED, "55052008", "Diagnostic ultrasound of gravid uterus"),
    (SNOMED, "312948004", "Karyotype determination"),
]
# Share of the record per resource type; Observations take the remainder.
MIX = {
    "Condition": 0.08,
    "ServiceRequest": 0.12,
    "MedicationRequest": 0.08,
    "MedicationAdministration": 0.05,
    "Procedure": 0.04,
    "FamilyMemberHistory": 0.02,
}
# From the service's own discovery data, so the bench fills the keys the service reads.
PREFETCH_KEY_BY_TYPE = search_key_by_resource_type()
SERVICE_ID_BY_HOOK = service_id_by_hook()
HOOKS = tuple(SERVICE_ID_BY_HOOK)


def patient_record(size: int, patient_id: str = PATIENT_ID, seed: int = 2022,
                   id_prefix: str | None = None) -> list[dict]:
    """`size` resources (not counting Patient and Practitioner) of one patient, deterministic.
    Resource ids start with `id_prefix` (default: the patient id, unique on a FHIR server)."""
    if size < 10:
        raise ValueError("a record needs at least 10 resources")
    rng = random.Random(f"{seed}-{size}")
    today = date.today()
    counts = {kind: max(1, round(size * share)) for kind, share in MIX.items()}
    counts["Condition"] = max(3, counts["Condition"])
    counts["Observation"] = size - sum(counts.values())
    subject = {"reference": f"Patient/{patient_id}"}
    prefix = id_prefix or patient_id

    def when(max_years: float = 10) -> str:
        return (today - timedelta(days=rng.randint(20, int(365 * max_years)))).isoformat()

    resources: list[dict] = []
    for index in range(counts["Condition"]):
        if index < 3:
            system, code, display = MISCARRIAGE_CODES[index]
            onset = (today - timedelta(days=200 + 300 * index)).isoformat()
            status = "resolved"
        else:
            system, code, display = NOISE, f"filler-{index % 40}", f"Other problem {index % 40}"
            onset, status = when(), rng.choice(["active", "resolved", "inactive"])
        resources.append({
            "resourceType": "Condition", "id": f"{prefix}-cond-{index}",
            "clinicalStatus": {"coding": [{"system": CLINICAL, "code": status}]},
            "verificationStatus": {"coding": [{"system": VERIFICATION, "code": "confirmed"}]},
            "code": {"coding": [{"system": system, "code": code, "display": display}], "text": display},
            "subject": subject, "onsetDateTime": onset, "recordedDate": onset,
        })
    for index in range(counts["Observation"]):
        code, display, unit, low, high = LABS[index % len(LABS)]
        value = round(rng.uniform(low, high * 1.3), 2)
        resources.append({
            "resourceType": "Observation", "id": f"{prefix}-obs-{index}", "status": "final",
            "category": [{"coding": [{"system": OBS_CATEGORY, "code": "laboratory"}]}],
            "code": {"coding": [{"system": LOINC, "code": code, "display": display}], "text": display},
            "subject": subject, "effectiveDateTime": when() + "T08:30:00+01:00",
            "issued": when() + "T12:00:00+01:00",
            "valueQuantity": {"value": value, "unit": unit, "system": "http://unitsofmeasure.org", "code": unit},
            "referenceRange": [{"low": {"value": low, "unit": unit}, "high": {"value": high, "unit": unit}}],
        })
    for index in range(counts["ServiceRequest"]):
        code, display, *_ = LABS[index % len(LABS)]
        resources.append({
            "resourceType": "ServiceRequest", "id": f"{prefix}-sr-{index}",
            "status": rng.choice(["completed"] * 8 + ["active", "revoked"]), "intent": "order",
            "code": {"coding": [{"system": LOINC, "code": code, "display": display}], "text": display},
            "subject": subject, "authoredOn": when(),
            "requester": {"reference": f"Practitioner/{PRACTITIONER_ID}"},
        })
    for index in range(counts["MedicationRequest"]):
        system, code, display, dose = MEDICATIONS[index % len(MEDICATIONS)]
        resources.append({
            "resourceType": "MedicationRequest", "id": f"{prefix}-mr-{index}",
            "status": rng.choice(["completed"] * 6 + ["stopped", "active"]), "intent": "order",
            "medicationCodeableConcept": {"coding": [{"system": system, "code": code, "display": display}], "text": display},
            "subject": subject, "authoredOn": when(),
            "dosageInstruction": [{"text": dose}],
        })
    for index in range(counts["MedicationAdministration"]):
        system, code, display, _ = MEDICATIONS[index % len(MEDICATIONS)]
        resources.append({
            "resourceType": "MedicationAdministration", "id": f"{prefix}-ma-{index}",
            "status": "completed",
            "medicationCodeableConcept": {"coding": [{"system": system, "code": code, "display": display}]},
            "subject": subject, "effectiveDateTime": when() + "T09:00:00+01:00",
        })
    for index in range(counts["Procedure"]):
        system, code, display = PROCEDURES[index % len(PROCEDURES)]
        resources.append({
            "resourceType": "Procedure", "id": f"{prefix}-proc-{index}", "status": "completed",
            "code": {"coding": [{"system": system, "code": code, "display": display}], "text": display},
            "subject": subject, "performedDateTime": when(),
        })
    for index in range(counts["FamilyMemberHistory"]):
        resources.append({
            "resourceType": "FamilyMemberHistory", "id": f"{prefix}-fmh-{index}",
            "status": "completed", "patient": subject,
            "relationship": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-RoleCode", "code": "MTH"}]},
            "condition": [{"code": {"coding": [{"system": NOISE, "code": f"filler-{index % 40}"}]}}],
        })
    assert len(resources) == size
    return resources


def patient_resource(patient_id: str = PATIENT_ID) -> dict:
    born = date.today().replace(year=date.today().year - 34, month=5, day=1)
    return {"resourceType": "Patient", "id": patient_id, "gender": "female",
            "birthDate": born.isoformat(), "name": [{"family": "Bench", "given": ["Test"]}]}


def practitioner_resource() -> dict:
    return {
        "resourceType": "Practitioner", "id": PRACTITIONER_ID, "name": [{"family": "Arts"}],
        "communication": [{"coding": [{"system": "urn:ietf:bcp:47", "code": "nl"}]}],
    }


def prefetch_for(resources: list[dict], patient_id: str = PATIENT_ID) -> dict:
    """Sort a record into the service's prefetch keys, as an EHR fulfilling the templates would."""
    grouped: dict[str, list[dict]] = {key: [] for key in PREFETCH_KEY_BY_TYPE.values()}
    for resource in resources:
        grouped[PREFETCH_KEY_BY_TYPE[resource["resourceType"]]].append(resource)
    prefetch: dict = {
        key: {
            "resourceType": "Bundle", "type": "searchset", "total": len(items),
            "entry": [
                {"fullUrl": f"https://ehr.example.org/fhir/{r['resourceType']}/{r['id']}",
                 "resource": r, "search": {"mode": "match"}}
                for r in items
            ],
        }
        for key, items in grouped.items()
    }
    prefetch["patient"] = patient_resource(patient_id)
    prefetch["practitioner"] = practitioner_resource()
    return prefetch


def draft_orders(patient_id: str = PATIENT_ID) -> list[dict]:
    """A few orders being entered: two tests and a drug the guideline advises against, one TSH."""
    subject = {"reference": f"Patient/{patient_id}"}

    def service_request(order_id: str, code: str, display: str) -> dict:
        return {"resourceType": "ServiceRequest", "id": order_id, "status": "draft", "intent": "order",
                "code": {"coding": [{"system": LOINC, "code": code, "display": display}], "text": display},
                "subject": subject}

    return [
        service_request("draft-fvl", "21668-9", "F5 gene p.Arg506Gln"),
        service_request("draft-nk", "18267-5", "Cells.CD16+CD56+/100 cells"),
        {"resourceType": "MedicationRequest", "id": "draft-prog", "status": "draft", "intent": "order",
         "medicationCodeableConcept": {"coding": [{"system": ATC, "code": "G03DA04", "display": "progesterone"}]},
         "subject": subject, "dosageInstruction": [{"text": "200 mg vaginally twice daily"}]},
        service_request("draft-tsh", "3016-3", "Thyrotropin [Units/volume] in Serum or Plasma"),
    ]


def hook_body(hook: str, size: int | None, *, fhir_server: str | None = None,
              patient_id: str = PATIENT_ID) -> dict:
    """A CDS Hooks request; `size=None` sends no prefetch (the FHIR-fallback path)."""
    context: dict = {"userId": f"Practitioner/{PRACTITIONER_ID}", "patientId": patient_id}
    if hook in ("order-select", "order-sign"):
        orders = draft_orders(patient_id)
        context["draftOrders"] = {"resourceType": "Bundle", "type": "collection",
                                  "entry": [{"resource": order} for order in orders]}
        if hook == "order-select":
            context["selections"] = [f"{orders[0]['resourceType']}/{orders[0]['id']}"]
    body: dict = {"hook": hook, "hookInstance": HOOK_INSTANCE_PLACEHOLDER, "context": context}
    if size is not None:
        body["prefetch"] = prefetch_for(patient_record(size, patient_id, id_prefix="res"), patient_id)
    if fhir_server:
        body["fhirServer"] = fhir_server
        body["fhirAuthorization"] = {"access_token": "bench-opaque-token", "token_type": "Bearer",
                                     "expires_in": 300, "scope": "patient/*.read", "subject": "rpl-cds"}
    return body


class BodyTemplate:
    """A request serialised once, rendered per request with its own hookInstance and patient id
    (the patient placeholder must have been used as the patient id when building `body`)."""

    def __init__(self, body: dict):
        raw = orjson.dumps(body)
        head, found, rest = raw.partition(HOOK_INSTANCE_PLACEHOLDER.encode())
        assert found and PATIENT_PLACEHOLDER.encode() not in head, "hookInstance must precede context"
        self.head = head
        self.parts = rest.split(PATIENT_PLACEHOLDER.encode())
        self.size_bytes = len(raw)

    def render(self, patient_id: str = PATIENT_ID, hook_instance: str | None = None) -> bytes:
        instance = (hook_instance or str(uuid.uuid4())).encode()
        return self.head + instance + patient_id.encode().join(self.parts)


def fhir_batch(resources: list[dict], patient_id: str = PATIENT_ID) -> dict:
    """A batch Bundle that PUTs the patient, the practitioner and the record with fixed ids."""
    everything = [patient_resource(patient_id), practitioner_resource(), *resources]
    return {
        "resourceType": "Bundle", "type": "batch",
        "entry": [
            {"resource": r, "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}}
            for r in everything
        ],
    }
