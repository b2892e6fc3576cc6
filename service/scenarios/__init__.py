"""Synthetic patients (FHIR transaction Bundles) used by the scenario tests, the playground and
`rpl-cds scenarios load`. Each file `<name>.json` holds:

    {"name", "title": {"nl", "en"}, "description": {"nl", "en"}, "referenceDate": "YYYY-MM-DD",
     "bundle": <transaction Bundle: Patient + clinical resources>,
     "hooks": [{"hook", "draftOrders": [...], "selections": [...],
                "expect": [rule ids], "absent": [rule ids]}]}

Dates in a scenario are written as of `referenceDate`. `shift_dates` rolls every date forward so
that the scenario keeps its meaning on any day (ages, gestational ages, 84-day intervals).
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
        scenario["bundle"] = shift_dates(scenario["bundle"], offset)
        for hook in scenario.get("hooks", ()):
            hook["draftOrders"] = shift_dates(hook.get("draftOrders", []), offset)
    return scenario


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
