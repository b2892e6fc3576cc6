"""Synthetic patients (FHIR transaction Bundles) used by the scenario tests, the playground and
`rpl-cds scenarios load`. Each file `<name>.json` holds:

    {"name", "title": {"nl", "en"}, "description": {"nl", "en"}, "referenceDate": "YYYY-MM-DD",
     "codeSources": {code: where it was verified} (optional; codes not in codes.json),
     "bundle": <transaction Bundle: Patient + clinical resources, PUT entries with fixed ids>,
     "hooks": [{"hook", "note": what the entry proves (guideline row), "draftOrders": [...],
                "selections": [...], "expect": [rule ids], "absent": [rule ids]}]}

The patient id is the scenario name; every resource id starts with it, so all scenarios can live
on one FHIR server. `expect` / `absent` are derived from the guideline text (reference/guideline.md),
not from the rule code: tests/test_scenarios.py checks them against the service.

Dates in a scenario are written as of `referenceDate`. `shift_dates` rolls every date forward so
that the scenario keeps its meaning on any day (gestational ages, 84-day intervals); `load_scenario`
moves the Patient's birthDate by the calendar instead, so that the age in whole years, and a
birthday today or tomorrow, survive leap days (age 34 vs 35 is a boundary case).
"""

from __future__ import annotations

import copy
import json
import re
from datetime import date, datetime, timedelta
from functools import cache
from importlib import resources

_DATE = re.compile(r"^(\d{4})-(\d{2})-(\d{2})(T[0-9:.]+(?:Z|[+-]\d{2}:\d{2})?)?$")


@cache
def _scenario_files() -> dict[str, dict]:
    found = {}
    for entry in sorted(resources.files(__name__).iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".json"):
            data = json.loads(entry.read_text(encoding="utf-8"))
            found[data["name"]] = data
    return found


def scenario_names() -> list[str]:
    return list(_scenario_files())


def load_scenario(name: str, today: date | None = None) -> dict:
    """A deep copy of the scenario with every date shifted so `referenceDate` becomes `today`."""
    scenario = copy.deepcopy(_scenario_files()[name])
    if today is not None:
        offset = (today - date.fromisoformat(scenario["referenceDate"])).days
        reference = date.fromisoformat(scenario["referenceDate"])
        scenario["bundle"] = shift_dates(scenario["bundle"], offset)
        for resource in bundle_resources(scenario):
            if resource.get("resourceType") == "Patient" and isinstance(resource.get("birthDate"), str):
                original = shift_dates(resource["birthDate"], -offset)
                resource["birthDate"] = shift_birth_date(original, reference, today)
        for hook in scenario.get("hooks", ()):
            hook["draftOrders"] = shift_dates(hook.get("draftOrders", []), offset)
        scenario["referenceDate"] = today.isoformat()
    return scenario


def shift_birth_date(birth_date: str, reference: date, today: date) -> str:
    """The birth date that gives on `today` the age the patient had on `reference`.

    Keeps the whole years and whichever is nearer: the days since the last birthday or the days
    to the next one. Shifting by a number of days could move a birthday across a leap day and turn
    "35 tomorrow" into "35 today".
    """
    if not _DATE.match(birth_date) or len(birth_date) != 10:
        return birth_date
    born = date.fromisoformat(birth_date)
    years = reference.year - born.year - ((reference.month, reference.day) < (born.month, born.day))
    last = _anniversary(born, born.year + years)
    following = _anniversary(born, born.year + years + 1)
    if (reference - last).days <= (following - reference).days:
        moved = today - (reference - last)
        return _anniversary(born, moved.year - years, moved).isoformat()
    moved = today + (following - reference)
    return _anniversary(born, moved.year - years - 1, moved, after=True).isoformat()


def _anniversary(born: date, year: int, day: date | None = None, after: bool = False) -> date:
    """`born`'s month and day (or `day`'s) in `year`. 29 February becomes 28 February, or
    1 March with `after` (a birthday that must not come earlier)."""
    source = day or born
    try:
        return date(year, source.month, source.day)
    except ValueError:
        return date(year, 3, 1) if after else date(year, 2, 28)


def all_scenarios(today: date | None = None) -> list[dict]:
    return [load_scenario(name, today) for name in scenario_names()]


def shift_dates(node, days: int):
    """Shift every ISO date / dateTime string in a JSON tree by `days` (ids and codes untouched)."""
    if days == 0:
        return copy.deepcopy(node)
    if isinstance(node, dict):
        return {key: (node[key] if key in ("id", "code", "system", "reference", "fullUrl", "url")
                      else shift_dates(node[key], days)) for key in node}
    if isinstance(node, list):
        return [shift_dates(item, days) for item in node]
    if isinstance(node, str):
        match = _DATE.match(node)
        if match:
            if match.group(4):
                moment = datetime.fromisoformat(node.replace("Z", "+00:00")) + timedelta(days=days)
                text = moment.isoformat()
                return text.replace("+00:00", "Z") if node.endswith("Z") else text
            return (date.fromisoformat(node[:10]) + timedelta(days=days)).isoformat()
    return node


def bundle_resources(scenario: dict) -> list[dict]:
    return [e["resource"] for e in scenario["bundle"].get("entry", ()) if "resource" in e]
