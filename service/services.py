"""The three CDS Services this server offers, and their prefetch templates.

Service ids are a stable contract with EHR configurations: rpl-patient-view, rpl-order-select,
rpl-order-sign. Texts and templates live in service/data/services.json.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cache
from importlib import resources

from .validation import validate_or_400

# CDS Hooks 2.0 prefetch tokens: root-level context fields and the four user tokens. Nothing else
# (the FHIRPath tokens over draftOrders are 3.0-ballot only, and 2.0 clients do not expand them).
_TOKEN = re.compile(r"\{\{\s*(.*?)\s*\}\}")
ALLOWED_CONTEXT_TOKENS = {"context.userId", "context.patientId", "context.encounterId"}
USER_TOKENS = {
    "userPractitionerId": "Practitioner",
    "userPractitionerRoleId": "PractitionerRole",
    "userPatientId": "Patient",
    "userRelatedPersonId": "RelatedPerson",
}


@dataclass(frozen=True)
class PrefetchKey:
    key: str
    template: str  # with CDS Hooks 2.0 tokens only, as published in discovery
    required: bool

    @property
    def is_read(self) -> bool:
        """`Patient/{{...}}` is a read (one resource); `Condition?...` is a search (a Bundle)."""
        return "?" not in self.template

    @property
    def read_type(self) -> str | None:
        return self.template.split("/", 1)[0] if self.is_read else None


@dataclass(frozen=True)
class CdsService:
    id: str
    hook: str
    title: str
    description: str
    usage_requirements: str
    prefetch: tuple[PrefetchKey, ...]

    def discovery_entry(self) -> dict:
        entry = {
            "hook": self.hook,
            "title": self.title,
            "description": self.description,
            "id": self.id,
            "prefetch": {p.key: p.template for p in self.prefetch},
        }
        if self.usage_requirements:
            entry["usageRequirements"] = self.usage_requirements
        return entry


@cache
def _services_data() -> dict:
    text = resources.files("service.data").joinpath("services.json").read_text(encoding="utf-8")
    return json.loads(text)


def service_id_by_hook() -> dict[str, str]:
    """Hook -> the id of the CDS Service that answers it (services.json; one per hook)."""
    return {item["hook"]: item["id"] for item in _services_data()["services"]}


def search_key_by_resource_type() -> dict[str, str]:
    """Resource type -> the prefetch key whose template searches it ("Condition" ->
    "conditions"), in discovery order: where an EHR fulfilling the prefetch puts each resource."""
    return {
        spec["template"].split("?", 1)[0]: key
        for key, spec in _services_data()["prefetch"].items()
        if "?" in spec["template"]
    }


def load_services(observation_codes: list[str]) -> dict[str, CdsService]:
    """Build the service registry; `observation_codes` ("system|code") bound the Observation search."""
    data = _services_data()
    validate_or_400(data, "services-data.schema.json")
    code_list = ",".join(observation_codes)
    prefetch = []
    for key, spec in data["prefetch"].items():
        template = spec["template"].replace("{{observationCodes}}", code_list)
        if not code_list:
            template = template.replace("&code=", "")
        check_template_tokens(template)
        prefetch.append(PrefetchKey(key, template, spec["required"]))
    services = {}
    for item in data["services"]:
        services[item["id"]] = CdsService(
            id=item["id"],
            hook=item["hook"],
            title=item["title"],
            description=item["description"],
            usage_requirements=item.get("usageRequirements", ""),
            prefetch=tuple(prefetch),
        )
    return services


def check_template_tokens(template: str) -> None:
    for token in _TOKEN.findall(template):
        if token not in ALLOWED_CONTEXT_TOKENS and token not in USER_TOKENS:
            raise ValueError(f"prefetch template uses a token CDS Hooks 2.0 does not define: {token}")


def substitute_tokens(template: str, context: dict) -> str | None:
    """Fill a template from the hook context; None when a token has no value (key not buildable)."""
    user_type, _, user_id = str(context.get("userId", "")).partition("/")
    missing = False

    def value_for(match: re.Match) -> str:
        nonlocal missing
        token = match.group(1)
        if token.startswith("context."):
            value = context.get(token.removeprefix("context."))
        else:
            value = user_id if USER_TOKENS.get(token) == user_type else None
        if not isinstance(value, str) or not value:
            missing = True
            return ""
        return value

    result = _TOKEN.sub(value_for, template)
    return None if missing else result
