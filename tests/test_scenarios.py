"""The clinical scenarios (service/scenarios/*.json) through the real service.

Each scenario is a synthetic patient; each of its hook entries names the rule ids that must fire
(`expect`) and those that must not (`absent`), derived from the guideline text
(/work/shared/reference/guideline.md), not from the rule code: these tests are the independent
check of the rules. Requests are built as an EHR builds them: the discovery prefetch templates are
fulfilled from the scenario's resources (the Observation search keeps its code filter).

Also here: the scenarios keep their meaning on another day (date roller), and the cards are the
same with prefetch and with fetch-from-server (a real FHIR server, plain and paged).
"""

from __future__ import annotations

import dataclasses
import json
import re
import uuid
from datetime import date, datetime, timedelta
from functools import cache
from urllib.parse import parse_qsl
from zoneinfo import ZoneInfo

import pytest

from cards.findings import RULE_IDS
from cards.rules import evaluate
from fhir_mappings.codes import load_code_tables
from fhir_mappings.extract import extract_patient_facts
from service import create_app
from service.config import Settings
from service.integration_cli import fill_template, hook_context, scenario_patient_id
from service.scenarios import all_scenarios, bundle_resources, load_scenario, scenario_names
from tests.hookdata import SERVICE_FOR_HOOK
from tests.openapi_check import assert_matches_openapi

TIMEZONE = Settings().timezone
# Code systems that carry FHIR structure, not clinical meaning (statuses, flags, units).
STRUCTURAL_SYSTEMS = {
    "http://terminology.hl7.org/CodeSystem/condition-clinical",
    "http://terminology.hl7.org/CodeSystem/condition-ver-status",
    "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation",
    "http://unitsofmeasure.org",
}
FORBIDDEN_TERM = re.compile(r"habitu", re.IGNORECASE)  # R02: never the old term for RPL


def service_today() -> date:
    """The day the service believes it is (it reads the clock in its own time zone)."""
    return datetime.now(ZoneInfo(TIMEZONE)).date()


# --- building requests as an EHR does -------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class HookCase:
    scenario: str
    index: int  # position in the scenario's `hooks`
    hook: str

    @property
    def id(self) -> str:
        return f"{self.scenario}#{self.index}-{self.hook}"


def hook_cases() -> list[HookCase]:
    return [
        HookCase(s["name"], i, h["hook"])
        for s in all_scenarios()
        for i, h in enumerate(s["hooks"])
    ]


def scenario_context(scenario: dict, entry: dict) -> dict:
    return hook_context(
        entry["hook"], scenario_patient_id(scenario), user_id="Practitioner/scenario-tester",
        draft_orders=entry.get("draftOrders"), selections=entry.get("selections"),
    )


def local_prefetch(resources: list[dict], templates: dict[str, str], context: dict) -> dict:
    """Fulfil the discovery templates from in-memory resources, as an EHR answers them.

    Only the query parameters the service's templates use are understood; a new one fails loudly
    so this simulation cannot silently drift from the real templates."""
    prefetch = {}
    for key, template in templates.items():
        query = fill_template(template, context)
        if query is None:
            continue  # the key cannot be built: an EHR leaves it out
        resource_type, _, params = query.partition("?")
        if not params:  # a read: Type/id
            kind, _, rid = resource_type.partition("/")
            found = [r for r in resources if r["resourceType"] == kind and r.get("id") == rid]
            prefetch[key] = found[0] if found else None
            continue
        matches = [r for r in resources if r["resourceType"] == resource_type]
        for name, value in parse_qsl(params, keep_blank_values=True):
            if name == "patient":
                wanted = value if value.startswith("Patient/") else f"Patient/{value}"
                matches = [r for r in matches if _patient_reference(r) == wanted]
            elif name == "code":
                codes = set(value.split(","))
                matches = [r for r in matches if _codings(r.get("code")) & codes]
            else:
                raise AssertionError(f"local_prefetch does not understand the query parameter {name!r}")
        prefetch[key] = {
            "resourceType": "Bundle", "type": "searchset", "total": len(matches),
            "entry": [{"fullUrl": f"urn:uuid:{uuid.uuid4()}", "resource": r, "search": {"mode": "match"}}
                      for r in matches],
        }
    return prefetch


def _patient_reference(resource: dict) -> str | None:
    holder = resource.get("subject") or resource.get("patient") or {}
    return holder.get("reference")


def _codings(codeable: object) -> set[str]:
    if not isinstance(codeable, dict):
        return set()
    return {f"{c.get('system')}|{c.get('code')}" for c in codeable.get("coding") or ()}


def hook_body(scenario: dict, entry: dict, templates: dict[str, str] | None, fhir_server: str | None = None) -> dict:
    """A CDS Hooks request for one hook entry: full prefetch when `templates` is given."""
    context = scenario_context(scenario, entry)
    body: dict = {"hookInstance": str(uuid.uuid4()), "hook": entry["hook"], "context": context}
    if templates is not None:
        body["prefetch"] = local_prefetch(bundle_resources(scenario), templates, context)
    if fhir_server:
        body["fhirServer"] = fhir_server
    return body


def topics(cards_body: dict) -> list[str]:
    return [card["source"]["topic"]["code"] for card in cards_body["cards"]]


def card_signature(cards_body: dict) -> list[tuple[str, str, str]]:
    """What a clinician sees of each card (uuids differ per call)."""
    return sorted(
        (c["source"]["topic"]["code"], c["indicator"], c["summary"]) for c in cards_body["cards"]
    )


def check_expectations(entry: dict, found: list[str], where: str) -> None:
    missing = [rule for rule in entry["expect"] if rule not in found]
    unexpected = [rule for rule in entry["absent"] if rule in found]
    assert not missing and not unexpected, (
        f"{where}: rules that should fire but did not: {missing}; rules that fired but must not: "
        f"{unexpected}; cards: {found}. Scenario note: {entry.get('note', '')}"
    )


# --- loading scenarios into a FHIR server (shared with the integration tests) ----------------------

_loaded: set[tuple[str, date]] = set()


def ensure_scenarios_loaded(server, today: date) -> None:
    """Load every scenario (dates rolled to `today`) into a session FHIR server, once."""
    if (server.base_url, today) in _loaded:
        return
    for scenario in all_scenarios(today):
        server.load(scenario["bundle"])
    _loaded.add((server.base_url, today))


# --- fixtures ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scenario_app(tmp_path_factory):
    """One app for the module. Select/sign de-duplication is off: each hook entry is judged on its
    own (that memory is tested in tests/test_store.py)."""
    folder = tmp_path_factory.mktemp("scenarios")
    settings = Settings(
        auth="disabled", local_mode=True, database_url=f"sqlite:///{folder / 'store.sqlite'}",
        pseudonym_secret="scenario-test-secret",
    )
    return create_app({"TESTING": True, "RPL_SETTINGS": settings, "RPL_SELECT_SIGN_DEDUP": False})


@pytest.fixture(scope="module")
def scenario_client(scenario_app):
    return scenario_app.test_client()


@pytest.fixture(scope="module")
def templates(scenario_client) -> dict[str, dict[str, str]]:
    """service id -> its discovery prefetch templates."""
    services = scenario_client.get("/cds-services").get_json()["services"]
    return {s["id"]: s["prefetch"] for s in services}


@cache
def rolled_scenario(name: str, today: date) -> dict:
    return load_scenario(name, today)


# --- the scenario files themselves -----------------------------------------------------------------


def test_scenario_files_are_consistent():
    names = scenario_names()
    assert "demo-three-losses" in names  # the playground uses it
    for name in names:
        scenario = load_scenario(name)
        assert scenario["name"] == name
        date.fromisoformat(scenario["referenceDate"])
        for text in ("title", "description"):
            assert scenario[text]["nl"] and scenario[text]["en"], (name, text)
        assert not FORBIDDEN_TERM.search(json.dumps(scenario, ensure_ascii=False)), name
        assert scenario["bundle"]["type"] == "transaction"
        patient_id = scenario_patient_id(scenario)
        assert patient_id == name, "one patient per scenario, named after it"
        for entry in scenario["bundle"]["entry"]:
            resource = entry["resource"]
            assert resource["id"].startswith(name), resource["id"]
            assert entry["request"] == {"method": "PUT", "url": f"{resource['resourceType']}/{resource['id']}"}
            if resource["resourceType"] != "Patient":
                assert _patient_reference(resource) == f"Patient/{patient_id}", resource["id"]
        assert scenario["hooks"], name
        for hook in scenario["hooks"]:
            assert hook["hook"] in SERVICE_FOR_HOOK
            assert set(hook["expect"]) | set(hook["absent"]) <= set(RULE_IDS), (name, hook)
            assert not set(hook["expect"]) & set(hook["absent"]), (name, hook)
            refs = {f"{o['resourceType']}/{o['id']}" for o in hook["draftOrders"]}
            assert set(hook["selections"]) <= refs, (name, hook["selections"])
            if hook["hook"] == "patient-view":
                assert not hook["draftOrders"] and not hook["selections"]
            else:
                assert hook["draftOrders"], (name, hook["hook"])
            if hook["hook"] == "order-select":
                assert hook["selections"], name
            for order in hook["draftOrders"]:
                assert order["status"] == "draft" and order["id"].startswith(name)
                assert order["subject"] == {"reference": f"Patient/{patient_id}"}


def test_scenarios_use_only_codes_the_code_tables_know():
    """Every clinical coding is matched by fhir_mappings/data/codes.json (verified codes) or is
    named, with its public source, in the scenario's codeSources."""
    tables = load_code_tables()
    unknown = []
    for name in scenario_names():
        scenario = load_scenario(name)
        documented = set(scenario.get("codeSources", {}))
        documents = [scenario["bundle"]] + [h["draftOrders"] for h in scenario["hooks"]]
        for coding in _all_codings(documents):
            system, code = coding.get("system"), coding.get("code")
            if system in STRUCTURAL_SYSTEMS or code in documented:
                continue
            if not tables.concepts_for({"coding": [coding]}):
                unknown.append((name, system, code))
    assert unknown == []


def _all_codings(node) -> list[dict]:
    found = []
    if isinstance(node, dict):
        if isinstance(node.get("coding"), list):
            found.extend(c for c in node["coding"] if isinstance(c, dict))
        for value in node.values():
            found.extend(_all_codings(value))
    elif isinstance(node, list):
        for item in node:
            found.extend(_all_codings(item))
    return found


def test_every_rule_has_a_scenario_where_it_fires_and_one_where_it_must_not():
    fires, quiet = set(), set()
    for scenario in all_scenarios():
        for hook in scenario["hooks"]:
            fires.update(hook["expect"])
            quiet.update(hook["absent"])
    assert set(RULE_IDS) - fires == set(), "rules without a scenario where they fire"
    assert set(RULE_IDS) - quiet == set(), "rules without a close case where they must not fire"


# --- every hook entry through the service ----------------------------------------------------------


@pytest.mark.parametrize("case", hook_cases(), ids=lambda c: c.id)
def test_scenario_hook_gives_the_expected_cards(case: HookCase, scenario_client, templates):
    scenario = rolled_scenario(case.scenario, service_today())
    entry = scenario["hooks"][case.index]
    service_id = SERVICE_FOR_HOOK[case.hook]
    body = hook_body(scenario, entry, templates[service_id])
    response = scenario_client.post(f"/cds-services/{service_id}", json=body)
    assert response.status_code == 200, response.get_data(as_text=True)
    answer = response.get_json()
    assert_matches_openapi("/cds-services/{id}", "post", 200, answer)
    found = topics(answer)
    assert set(found) <= set(RULE_IDS)
    check_expectations(entry, found, case.id)


@pytest.mark.parametrize("days", [200, 1000], ids=lambda d: f"today+{d}")
def test_scenarios_keep_their_meaning_on_another_day(days, scenario_app):
    """The date roller: as of another day (crossing a leap day for +1000) every expectation holds.
    The service reads the real clock, so this runs the same extraction and rules it calls."""
    today = service_today() + timedelta(days=days)
    codes = scenario_app.extensions["rpl_codes"]
    failures = []
    for case in hook_cases():
        scenario = load_scenario(case.scenario, today)
        entry = scenario["hooks"][case.index]
        focus = set(entry["selections"]) if case.hook == "order-select" else None
        facts = extract_patient_facts(
            bundle_resources(scenario), today=today, draft_orders=entry["draftOrders"],
            focus_refs=focus, codes=codes,
        )
        found = [finding.rule_id for finding in evaluate(facts, case.hook)]
        try:
            check_expectations(entry, found, f"{case.id} as of {today}")
        except AssertionError as error:
            failures.append(str(error))
    assert failures == []


def test_rolled_scenario_keeps_ages_intervals_and_ids():
    reference = load_scenario("karyotype-age-34")
    for days in (1, 200, 366, 1000, 1461):
        today = date.fromisoformat(reference["referenceDate"]) + timedelta(days=days)
        rolled = load_scenario("karyotype-age-34", today)
        (patient,) = [r for r in bundle_resources(rolled) if r["resourceType"] == "Patient"]
        born = date.fromisoformat(patient["birthDate"])
        age_today = today.year - born.year - ((today.month, today.day) < (born.month, born.day))
        tomorrow = today + timedelta(days=1)
        age_tomorrow = tomorrow.year - born.year - ((tomorrow.month, tomorrow.day) < (born.month, born.day))
        assert (age_today, age_tomorrow) == (34, 35), (today, patient["birthDate"])
        ids = [r["id"] for r in bundle_resources(rolled)]
        assert ids == [r["id"] for r in bundle_resources(reference)]
    repeat = {
        name: [r["effectiveDateTime"] for r in bundle_resources(load_scenario(name, date(2031, 2, 27)))
               if r["resourceType"] == "Observation" and r["code"]["coding"][0]["code"] == "3181-5"]
        for name in ("apl-repeat-83-days", "apl-persistent-84-days")
    }
    for name, expected in (("apl-repeat-83-days", 83), ("apl-persistent-84-days", 84)):
        first, second = sorted(date.fromisoformat(d) for d in repeat[name])
        assert (second - first).days == expected


# --- the same cards with prefetch and with fetch-from-server ----------------------------------------


@pytest.mark.parametrize("name", scenario_names())
def test_cards_are_the_same_with_prefetch_and_with_fetch(name, scenario_client, templates,
                                                         fhir_server, fhir_server_paged):
    """Every scenario on ONE real FHIR server (each has its own patient id): the service finds the
    same cards when it queries the server itself, also when the server pages its results."""
    today = service_today()
    ensure_scenarios_loaded(fhir_server, today)
    ensure_scenarios_loaded(fhir_server_paged, today)
    scenario = rolled_scenario(name, today)
    for index, entry in enumerate(scenario["hooks"]):
        service_id = SERVICE_FOR_HOOK[entry["hook"]]
        url = f"/cds-services/{service_id}"
        prefetched = scenario_client.post(url, json=hook_body(scenario, entry, templates[service_id]))
        fetched = scenario_client.post(url, json=hook_body(scenario, entry, None, fhir_server.base_url))
        paged = scenario_client.post(url, json=hook_body(scenario, entry, None, fhir_server_paged.base_url))
        where = f"{name}#{index}-{entry['hook']}"
        for response in (prefetched, fetched, paged):
            assert response.status_code == 200, (where, response.get_data(as_text=True))
        assert card_signature(fetched.get_json()) == card_signature(prefetched.get_json()), where
        assert card_signature(paged.get_json()) == card_signature(prefetched.get_json()), where
        check_expectations(entry, topics(fetched.get_json()), where + " (fetched)")
