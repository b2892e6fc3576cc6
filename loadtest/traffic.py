"""The requests the load test sends: CDS Hooks calls as an EHR would make them for the service's
clinical scenarios (service/scenarios), each with a chart of unrelated history around it, and
feedback on the cards that come back.

Every hook call gets a fresh hookInstance and one of PATIENTS_PER_SCENARIO patient ids, so the
service's per-patient memories (override memory, select/sign de-duplication) work as in a clinic
with many patients rather than on one.
"""

from __future__ import annotations

import json
import random
import uuid
import zlib
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from fhir_mappings.codes import load_code_tables
from service.playground import build_hook_request
from service.scenarios import all_scenarios, bundle_resources
from service.services import load_services, search_key_by_resource_type

PATIENTS_PER_SCENARIO = 200
# Unrelated history a real chart carries (the guideline ignores it; the service must read past it).
FILLER_SYSTEM = "http://example.org/fhir/CodeSystem/rpl-cds-loadtest-filler"
SEARCH_KEY_BY_TYPE = search_key_by_resource_type()
FILLER_PER_KEY = {"Condition": 25, "ServiceRequest": 20, "MedicationRequest": 20, "Procedure": 10}
OVERRIDE_REASON_SYSTEM = "https://example.org/cds-hooks/override-reason"
_PATIENT_TOKEN = "__loadtest_patient__"
_INSTANCE_TOKEN = "00000000-0000-4000-8000-00000000f00d"


@dataclass(frozen=True)
class HookTemplate:
    """One CDS Hooks request, pre-encoded, with placeholders for the patient and hookInstance."""

    kind: str  # the hook
    path: str  # /cds-services/<id>
    scenario: str
    body: str

    def render(self, patient_id: str) -> bytes:
        return (
            self.body.replace(_PATIENT_TOKEN, patient_id)
            .replace(_INSTANCE_TOKEN, str(uuid.uuid4()))
            .encode()
        )


def _filler(patient_ref: str, rng: random.Random) -> dict[str, list[dict]]:
    def coded(resource_type: str, index: int, **extra) -> dict:
        resource = {
            "resourceType": resource_type,
            "id": f"filler-{resource_type.lower()}-{index}",
            "subject": {"reference": patient_ref},
            **extra,
        }
        code = {"coding": [{"system": FILLER_SYSTEM, "code": f"{resource_type.lower()}-{index}",
                            "display": f"Unrelated {resource_type} {index}"}]}
        if resource_type == "MedicationRequest":
            resource["medicationCodeableConcept"] = code
        else:
            resource["code"] = code
        return resource

    day = lambda: (datetime(2015, 1, 1) + timedelta(days=rng.randrange(3650))).date().isoformat()  # noqa: E731
    return {
        "Condition": [coded("Condition", i, onsetDateTime=day(),
                            clinicalStatus={"coding": [{"code": "active"}]}) for i in range(FILLER_PER_KEY["Condition"])],
        "ServiceRequest": [coded("ServiceRequest", i, status="completed", intent="order", authoredOn=day())
                           for i in range(FILLER_PER_KEY["ServiceRequest"])],
        "MedicationRequest": [coded("MedicationRequest", i, status="active", intent="order", authoredOn=day())
                              for i in range(FILLER_PER_KEY["MedicationRequest"])],
        "Procedure": [coded("Procedure", i, status="completed", performedDateTime=day())
                      for i in range(FILLER_PER_KEY["Procedure"])],
    }


def hook_templates(seed: int = 2022) -> list[HookTemplate]:
    """Every hook call of every scenario (patient-view for each scenario, plus its order hooks),
    in Dutch and in English, as pre-encoded templates."""
    rng = random.Random(seed)
    codes = load_code_tables()
    services = load_services(codes.observation_search_codes())
    by_hook = {service.hook: service for service in services.values()}
    templates: list[HookTemplate] = []
    for scenario in all_scenarios():
        resources = bundle_resources(scenario)
        patient = next(r for r in resources if r["resourceType"] == "Patient")
        calls = [{"hook": "patient-view"}] + [h for h in scenario.get("hooks", ()) if h["hook"] != "patient-view"]
        for call in calls:
            for language in ("nl", "en"):
                service = by_hook[call["hook"]]
                body, _notes = build_hook_request(
                    resources,
                    service=service,
                    draft_orders=call.get("draftOrders") or [],
                    selections=call.get("selections") or None,
                    language=language,
                    hook_instance=_INSTANCE_TOKEN,
                )
                for resource_type, items in _filler(f"Patient/{patient['id']}", rng).items():
                    bundle = body["prefetch"][SEARCH_KEY_BY_TYPE[resource_type]]
                    bundle["entry"].extend({"fullUrl": f"urn:uuid:{uuid.UUID(int=rng.getrandbits(128))}",
                                            "resource": item} for item in items)
                    bundle["total"] = len(bundle["entry"])
                text = json.dumps(body, separators=(",", ":"))
                # The scenario's patient id becomes a placeholder wherever it names the patient.
                text = text.replace(f'"{patient["id"]}"', f'"{_PATIENT_TOKEN}"')
                text = text.replace(f'Patient/{patient["id"]}"', f'Patient/{_PATIENT_TOKEN}"')
                templates.append(HookTemplate(call["hook"], f"/cds-services/{service.id}", scenario["name"], text))
    return templates


def patient_id_for(template: HookTemplate, rng: random.Random) -> str:
    return f"lt{zlib.crc32(template.scenario.encode()) % 100_000}-{rng.randrange(PATIENTS_PER_SCENARIO)}"


def feedback_stamp(start: datetime, counter: int) -> str:
    """Distinct outcomeTimestamps (one millisecond apart): every item sent is its own row, so the
    database check can match acknowledged items one by one."""
    moment = start + timedelta(milliseconds=counter)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def feedback_epoch() -> datetime:
    return datetime.now(UTC).replace(microsecond=0) - timedelta(days=1)


def feedback_for(card: dict, stamp: str) -> dict:
    """Accept the card's first suggestion when it has one (remove the advised-against order),
    otherwise override it with a coded reason."""
    suggestions = card.get("suggestions") or []
    if suggestions:
        return {"card": card["uuid"], "outcome": "accepted", "outcomeTimestamp": stamp,
                "acceptedSuggestions": [{"id": suggestions[0]["uuid"]}]}
    return {"card": card["uuid"], "outcome": "overridden", "outcomeTimestamp": stamp,
            "overrideReason": {"reason": {"system": OVERRIDE_REASON_SYSTEM, "code": "patient-preference"}}}
