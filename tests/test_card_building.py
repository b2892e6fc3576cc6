"""Card building (cards.build) and the knowledge data (cards.knowledge): every card of every rule
in both languages is CDS Hooks 2.0 conformant, quotes its source, and its suggestions are valid
FHIR drafts that never trigger a not-recommended warning themselves (no alert loops)."""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import uuid
from pathlib import Path

import pytest

from cards import knowledge as knowledge_module
from cards.build import build_card, build_card_pairs, build_cards
from cards.findings import ORDER_RULE_IDS, RULE_IDS, Finding
from cards.knowledge import KnowledgeError, load_knowledge
from cards.rules import evaluate
from fhir_mappings.codes import load_code_tables
from fhir_mappings.extract import extract_patient_facts
from fhir_mappings.facts import Category, InterventionState
from tests.test_rules import (
    days_ago,
    weeks_days,
    CASES,
    PATIENT,
    TODAY,
    firing,
    ft4,
    order,
    progesterone_case,
    rpl,
    tsh,
)

LANGUAGES = ("nl", "en")
GUIDELINE_NAME = "ESHRE 2022 (Recurrent Pregnancy Loss), NVOG-adaptatie 'Herhaalde miskraam'"
BANNED = re.compile(r"habitu", re.IGNORECASE)
SHARED = Path("/work/shared/seeds")


def firing_findings() -> list[tuple[str, object, Finding]]:
    """(case name, facts, finding) for every firing case of the rule registry."""
    out = []
    for rule_id in RULE_IDS:
        for case in firing(rule_id):
            for finding in evaluate(case.facts, case.hook):
                if finding.rule_id == rule_id:
                    out.append((f"{rule_id}: {case.name}", case.facts, finding))
    return out


FIRING = firing_findings()
BUILT = [
    (name, lang, facts, finding, build_card(finding, facts=facts, language=lang))
    for name, facts, finding in FIRING
    for lang in LANGUAGES
]
BUILT_IDS = [f"{lang} {name}" for name, lang, *_ in BUILT]


def test_every_rule_is_built_in_both_languages():
    built = {(lang, finding.rule_id) for _, lang, _, finding, _ in BUILT}
    assert built == {(lang, rule_id) for lang in LANGUAGES for rule_id in RULE_IDS}


def empty_values(node, path="$"):
    """Paths of null / "" / [] / {} values (CDS Hooks 2.0: optional fields are omitted instead)."""
    if node is None or node == "" or node == [] or node == {}:
        yield path
    elif isinstance(node, dict):
        for key, value in node.items():
            yield from empty_values(value, f"{path}.{key}")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from empty_values(value, f"{path}[{index}]")


@pytest.mark.parametrize(("name", "lang", "facts", "finding", "card"), BUILT, ids=BUILT_IDS)
def test_card_is_conformant(name, lang, facts, finding, card):
    assert 0 < len(card["summary"]) < 140
    assert not card["summary"].endswith("…"), "summary was truncated: shorten the template"
    assert card["indicator"] in ("info", "warning", "critical")
    assert uuid.UUID(card["uuid"]).version == 4
    assert list(empty_values(card)) == []
    source = card["source"]
    assert source["label"] and source["url"].startswith("https://")
    assert source["topic"] == {
        "system": "https://rpl-cds.example.org/fhir/CodeSystem/rule",
        "code": finding.rule_id,
        "display": source["topic"]["display"],
    }
    assert ("suggestions" in card) == ("selectionBehavior" in card)
    if "suggestions" in card:
        assert card["selectionBehavior"] == "any"
        for suggestion in card["suggestions"]:
            assert uuid.UUID(suggestion["uuid"]) and suggestion["label"] and suggestion["actions"]
            for action in suggestion["actions"]:
                assert action["type"] in ("create", "update", "delete") and action["description"]
                if action["type"] == "delete":
                    assert "resource" not in action
                    assert re.fullmatch(r"[A-Za-z]+/[A-Za-z0-9\-.]{1,64}", action["resourceId"])
                else:
                    assert isinstance(action["resource"], dict) and action["resource"]["resourceType"]
    for reason in card.get("overrideReasons", ()):
        assert reason["display"] and reason["code"]
        assert reason["system"] == "https://rpl-cds.example.org/fhir/CodeSystem/override-reason"
    for link in card.get("links", ()):
        assert link["type"] == "absolute" and link["url"].startswith("https://") and link["label"]
        assert "appContext" not in link
    assert not BANNED.search(json.dumps(card, ensure_ascii=False))
    assert "<" not in card["detail"].replace("\\<", ""), "raw HTML in detail"


@pytest.mark.parametrize(("name", "lang", "facts", "finding", "card"), BUILT, ids=BUILT_IDS)
def test_detail_quotes_the_dutch_source_and_names_the_guideline(name, lang, facts, finding, card):
    kn = load_knowledge()
    meta = kn.rules[finding.rule_id]
    detail = card["detail"]
    assert GUIDELINE_NAME in detail
    sentences = list(meta["card_sentences"]) + list(meta.get("leaflet_sentences", ()))
    if finding.rule_id in ORDER_RULE_IDS:
        sentences = list(kn.not_recommended[finding.category].card_sentences)
    assert sentences
    unescaped = detail.replace("\\", "")
    for sentence in sentences:
        assert sentence in unescaped, f"card sentence not quoted: {sentence}"
    for ref in meta["guideline_refs"] if finding.rule_id not in ORDER_RULE_IDS else kn.not_recommended[finding.category].refs:
        assert ref in detail


def test_ambiguity_resolution_is_named_in_the_detail():
    finding = next(f for f in evaluate(progesterone_case(iup=None), "patient-view") if f.rule_id == "progesterone-indicated")
    nl = build_card(finding, facts=progesterone_case(iup=None), language="nl")["detail"]
    en = build_card(finding, facts=progesterone_case(iup=None), language="en")["detail"]
    assert "**Interpretatie (A7):**" in nl and "**Interpretation (A7):**" in en
    assert "Bevestig eerst met echo" in nl and "suggestions" not in build_card(finding, facts=progesterone_case(iup=None), language="nl")


def test_indicator_follows_the_variant():
    cards = {}
    for label, facts in {"sch-consider": rpl(2, tsh_results=(tsh(6.0),), ft4_results=(ft4(15),)),
                         "overt": rpl(2, tsh_results=(tsh(6.0),), ft4_results=(ft4(9),))}.items():
        finding = next(f for f in evaluate(facts, "patient-view") if f.rule_id == "hypothyroidism-treatment")
        assert finding.variant == label
        cards[label] = build_card(finding, facts=facts, language="nl")
    assert cards["sch-consider"]["indicator"] == "info"
    assert cards["overt"]["indicator"] == "warning"


# --- suggestions --------------------------------------------------------------------------------


def delete_cases():
    return [(name, lang, facts, finding, card) for name, lang, facts, finding, card in BUILT
            if finding.rule_id in ORDER_RULE_IDS]


@pytest.mark.parametrize(("name", "lang", "facts", "finding", "card"), delete_cases(),
                         ids=[f"{lang} {name}" for name, lang, *_ in delete_cases()])
def test_warning_removes_exactly_its_own_draft_order(name, lang, facts, finding, card):
    (suggestion,) = card["suggestions"]
    (action,) = suggestion["actions"]
    assert action == {"type": "delete", "description": action["description"], "resourceId": finding.order.resource_ref}
    assert suggestion["isRecommended"] is True
    codes = [r["code"] for r in card["overrideReasons"]]
    assert codes == ["other-indication", "clinical-study", "patient-informed-insists"]
    assert card["overrideReasons"][0]["display"] == {"nl": "Andere indicatie", "en": "Other indication"}[lang]


def test_no_delete_suggestion_for_an_order_without_a_usable_reference():
    facts = rpl(2, interventions=(order(Category.THROMBOPHILIA_TEST, "not a reference"),))
    (finding,) = evaluate(facts, "order-sign")
    card = build_card(finding, facts=facts, language="nl")
    assert "suggestions" not in card and "selectionBehavior" not in card
    assert card["overrideReasons"]


def created_resources():
    out = []
    for name, lang, facts, finding, card in BUILT:
        for suggestion in card.get("suggestions", ()):
            for action in suggestion["actions"]:
                if action["type"] == "create":
                    out.append((name, lang, facts, finding, action["resource"]))
    return out


CREATED = created_resources()
CREATED_IDS = [f"{lang} {name} {res['resourceType']}" for name, lang, _, _, res in CREATED]


def test_suggestions_create_the_expected_resources():
    kinds = {(finding.rule_id, res["resourceType"]) for _, _, _, finding, res in CREATED}
    assert kinds == {
        ("tsh-missing", "ServiceRequest"), ("ft4-missing", "ServiceRequest"), ("apl-missing", "ServiceRequest"),
        ("apl-repeat", "ServiceRequest"), ("karyotype-indicated", "ServiceRequest"),
        ("progesterone-indicated", "MedicationRequest"),
    }


@pytest.mark.parametrize(("name", "lang", "facts", "finding", "resource"), CREATED, ids=CREATED_IDS)
def test_created_resources_are_valid_fhir_drafts(name, lang, facts, finding, resource):
    from fhir.resources.R4B import get_fhir_model_class

    get_fhir_model_class(resource["resourceType"]).model_validate(resource)  # raises when invalid
    assert resource["status"] == "draft" and resource["intent"] == "order"
    assert resource["subject"] == {"reference": PATIENT}
    (reason,) = resource["reasonCode"]
    assert {"system": "http://snomed.info/sct", "code": "102878001", "display": "Recurrent miscarriage (disorder)"} in reason["coding"]
    codeable = resource.get("code") or resource["medicationCodeableConcept"]
    tables = load_code_tables()
    concepts = set()
    for coding in codeable["coding"]:
        found = tables.concepts_for_code(coding["system"], coding["code"])
        assert found, f"{coding} is not a verified code of fhir_mappings' tables"
        concepts |= found
    assert len(concepts) == 1 and Category(concepts.pop()) in {
        Category.TSH, Category.FT4, Category.PARENTAL_KARYOTYPE, Category.PROGESTERONE,
        Category.LUPUS_ANTICOAGULANT, Category.ACL_IGG, Category.ACL_IGM, Category.B2GPI_IGG, Category.B2GPI_IGM,
    }


def test_progesterone_prescription_matches_the_card():
    facts = progesterone_case()
    finding = next(f for f in evaluate(facts, "patient-view") if f.rule_id == "progesterone-indicated")
    card = build_card(finding, facts=facts, language="nl")
    (suggestion,) = card["suggestions"]
    resource = suggestion["actions"][0]["resource"]
    (dosage,) = resource["dosageInstruction"]
    assert dosage["doseAndRate"] == [{"doseQuantity": {"value": 400, "unit": "mg", "system": "http://unitsofmeasure.org", "code": "mg"}}]
    assert dosage["timing"]["repeat"]["frequency"] == 2 and dosage["timing"]["repeat"]["periodUnit"] == "d"
    assert dosage["timing"]["repeat"]["boundsPeriod"]["end"] == finding.params["until_date"]
    assert dosage["route"] == {"text": "vaginaal"}
    assert {"system": "http://www.whocc.no/atc", "code": "G03DA04", "display": "progesterone"} in resource["medicationCodeableConcept"]["coding"]


def test_apl_suggestions_order_one_request_per_missing_test_and_repeat_not_before_due_date():
    facts = rpl(2)
    finding = next(f for f in evaluate(facts, "patient-view") if f.rule_id == "apl-missing")
    actions = build_card(finding, facts=facts, language="nl")["suggestions"][0]["actions"]
    assert [a["resource"]["code"]["coding"][0]["code"] for a in actions] == ["3281-3", "3181-5", "3182-3", "44448-9", "44449-7"]
    repeat_case = next(c for c in CASES["apl-repeat"] if c.name.startswith("positive, never repeated"))
    repeat = next(f for f in evaluate(repeat_case.facts, "patient-view") if f.rule_id == "apl-repeat")
    (action,) = build_card(repeat, facts=repeat_case.facts, language="en")["suggestions"][0]["actions"]
    due = repeat.params["tests"][0]["due_date"]
    if due > TODAY.isoformat():
        assert action["resource"]["occurrencePeriod"] == {"start": due}
    else:
        assert "occurrencePeriod" not in action["resource"]  # already due: no "not before"


def test_without_patient_reference_no_resources_are_suggested():
    facts = dataclasses.replace(rpl(2), patient_ref=None)
    cards = build_cards(evaluate(facts, "patient-view"), facts=facts, language="nl")
    assert cards and all("suggestions" not in c and "selectionBehavior" not in c for c in cards)


@pytest.mark.parametrize("hook", ["order-select", "order-sign"])
def test_no_alert_loop_suggested_resources_never_trigger_a_warning(hook):
    """Feed every suggested resource back as a draft order (mapped by the real FHIR extraction) to
    the same patient: no not-recommended card may fire for it."""
    checked = 0
    for name, _lang, facts, _finding, resource in CREATED:
        draft = dict(resource, id=f"suggested-{checked}")
        mapped = extract_patient_facts([], today=facts.today, draft_orders=[draft], focus_refs=None)
        (intervention,) = mapped.interventions
        assert intervention.state == InterventionState.DRAFT and intervention.reason_is_rpl
        with_draft = dataclasses.replace(facts, interventions=facts.interventions + (intervention,))
        warnings = [f for f in evaluate(with_draft, hook) if f.rule_id in ORDER_RULE_IDS]
        assert warnings == [], f"{name}: suggested {resource['resourceType']} would trigger {warnings}"
        checked += 1
    assert checked >= 6


def test_the_no_loop_check_can_fail():
    """The same mapping for a draft the guideline advises against does produce a warning."""
    facts = rpl(2)
    draft = {"resourceType": "MedicationRequest", "id": "x", "status": "draft", "intent": "order",
             "medicationCodeableConcept": {"coding": [{"system": "http://www.whocc.no/atc", "code": "G03DA04"}]},
             "subject": {"reference": PATIENT}}
    mapped = extract_patient_facts([], today=TODAY, draft_orders=[draft], focus_refs=None)
    with_draft = dataclasses.replace(facts, interventions=mapped.interventions)
    assert [f.rule_id for f in evaluate(with_draft, "order-sign")] == ["not-recommended-treatment"]


# --- texts ------------------------------------------------------------------------------------


def test_ehr_text_is_escaped_in_markdown():
    facts = rpl(2, interventions=(dataclasses.replace(order(Category.THROMBOPHILIA_TEST),
                                                      code_display="<script>alert(1)</script> *bold* [x](http://e)"),))
    (finding,) = evaluate(facts, "order-sign")
    detail = build_card(finding, facts=facts, language="nl")["detail"]
    assert "<script>" not in detail and "\\<script\\>" in detail
    assert "\\*bold\\*" in detail and "\\[x\\]" in detail


def test_unknown_language_falls_back_to_dutch():
    facts = rpl(2)
    finding = next(f for f in evaluate(facts, "patient-view") if f.rule_id == "tsh-missing")
    assert build_card(finding, facts=facts, language="de")["summary"] == build_card(finding, facts=facts, language="nl")["summary"]


def test_pairs_keep_findings_and_skip_a_defective_one(caplog):
    facts = rpl(2)
    findings = evaluate(facts, "patient-view")
    broken = Finding("tsh-missing", {"variant": "no-such-variant"})  # tsh-missing has one summary: still fine
    defective = Finding("apl-missing", {})  # no 'missing' param: cannot be built
    with caplog.at_level(logging.ERROR, logger="cards.build"):
        pairs = build_card_pairs([*findings, broken, defective], facts=facts, language="en")
    assert [f for f, _ in pairs] == [*findings, broken]
    assert all(card["source"]["topic"]["code"] == f.rule_id for f, card in pairs)
    assert "apl-missing" in caplog.text
    assert len(build_cards(findings, facts=facts, language="nl")) == len(findings)


def test_summary_lists_active_orders_the_card_does_not_recommend():
    case = next(c for c in CASES["rpl-summary"] if c.name.startswith("with an active order"))
    summary = next(f for f in evaluate(case.facts, "patient-view") if f.rule_id == "rpl-summary")
    assert "**Nog lopende aanvragen die de kaart niet aanbeveelt:** trombofilie-onderzoek" in build_card(
        summary, facts=case.facts, language="nl")["detail"]


def test_levothyroxine_warning_shows_the_tsh_it_rests_on():
    case = next(c for c in CASES["not-recommended-treatment"] if c.name == "levothyroxine when euthyroid (R14)")
    (finding,) = evaluate(case.facts, "order-sign")
    detail = build_card(finding, facts=case.facts, language="en")["detail"]
    assert "The newest TSH (2 mIU/L on 2025-03-04) is normal" in detail


def test_remembered_overrides_from_the_service_are_shown_in_the_summary():
    facts = rpl(2)
    summary = next(f for f in evaluate(facts, "patient-view") if f.rule_id == "rpl-summary")
    params = dict(summary.params, remembered_overrides=[
        {"rule_id": "not-recommended-test", "category": "thrombophilia-test", "overridden_on": "2025-03-01",
         "remembered_until": "2025-08-28"}])
    detail = build_card(dataclasses.replace(summary, params=params), facts=facts, language="nl")["detail"]
    assert "trombofilie-onderzoek (overschreven op 01-03-2025, onthouden tot 28-08-2025)" in detail


def test_summary_card_never_shows_an_unverified_prognosis_number():
    # Draft values of the 11 unverified Brigham cells (guideline.md 5.2) must never appear.
    drafts = {(20, 4): 88, (20, 5): 85, (25, 4): 82, (25, 5): 79, (30, 4): 76, (35, 4): 68, (35, 5): 62,
              (40, 4): 58, (45, 2): 60, (45, 4): 48, (45, 5): 42}
    for (age, n), value in drafts.items():
        facts = rpl(n, age_years=age)
        summary = next(f for f in evaluate(facts, "patient-view") if f.rule_id == "rpl-summary")
        for lang in LANGUAGES:
            detail = build_card(summary, facts=facts, language=lang)["detail"]
            assert f"{value}%" not in detail
            assert ("niet geverifieerd" if lang == "nl" else "not been verified") in detail
    verified = rpl(3, age_years=30)
    summary = next(f for f in evaluate(verified, "patient-view") if f.rule_id == "rpl-summary")
    assert "**80%**" in build_card(summary, facts=verified, language="nl")["detail"]
    assert sum(1 for c in load_knowledge().prognosis["cells"] if c["verified"]) == 13


def test_leaflet_errors_are_not_repeated():
    facts = CASES["miscarriage-aftercare"][0].facts
    finding = next(f for f in evaluate(facts, "patient-view") if f.rule_id == "miscarriage-aftercare")
    for lang in LANGUAGES:
        detail = build_card(finding, facts=facts, language=lang)["detail"]
        assert "mifepriston" in detail and "200 microgram" in detail
        assert "80%" not in detail and "binnen een week" not in detail and "within a week" not in detail
        assert "tabletten van 200 mg" not in detail and "tablets of 200 mg" not in detail
        assert "na 2 miskramen" not in detail and "after 2 miscarriages" not in detail
    raw = " ".join(load_knowledge().rules["miscarriage-aftercare"]["leaflet_sentences"])
    assert "Misoprostol wordt dan gegeven als een orale tablet van 200 mg" not in raw


# --- knowledge data -------------------------------------------------------------------------


def _normalised(text: str) -> str:
    return re.sub(r"\s+", "", text)


@pytest.mark.skipif(not SHARED.exists(), reason="shared source documents not available")
def test_quoted_sentences_are_verbatim_from_the_sources():
    card = _normalised(next(SHARED.glob("000_*")).read_text(encoding="utf-8"))
    leaflet = _normalised(next(SHARED.glob("002_*")).read_text(encoding="utf-8"))
    kn = load_knowledge()
    sentences = [s for meta in kn.rules.values() for s in meta["card_sentences"]]
    sentences += [s for e in kn.not_recommended.values() for s in e.card_sentences]
    for sentence in sentences:
        # The PDF extraction split "LH-serumtest" over two lines ("LH- serumtest").
        assert _normalised(sentence) in card.replace("LH-serumtest", "LH-serumtest"), sentence
    for meta in kn.rules.values():
        for sentence in meta.get("leaflet_sentences", ()):
            assert _normalised(sentence) in leaflet, sentence


def _with_data(monkeypatch, name: str, mutate):
    original = knowledge_module._read_json

    def patched(file_name):
        data = original(file_name)
        if file_name == name:
            data = json.loads(json.dumps(data))
            mutate(data)
        return data

    monkeypatch.setattr(knowledge_module, "_read_json", patched)
    knowledge_module.load_knowledge.cache_clear()


@pytest.fixture
def fresh_knowledge():
    yield
    knowledge_module.load_knowledge.cache_clear()


@pytest.mark.parametrize(
    ("file_name", "mutate", "message"),
    [
        ("texts.json", lambda d: d["languages"]["en"]["rules"].pop("tsh-missing"), "rule ids differ"),
        ("texts.json", lambda d: d["languages"]["nl"]["rules"]["tsh-missing"].update(summary="x" * 140), "below 140"),
        ("texts.json", lambda d: d["languages"]["nl"]["rules"]["ft4-missing"].update(summary="TSH {tsh} " + "y" * 120),
         "below 140"),
        ("texts.json", lambda d: d["languages"]["nl"]["rules"]["tsh-missing"].update(summary="Geen {x.y}"), "plain"),
        ("texts.json", lambda d: d["languages"]["en"]["categories"].pop("ana"), "every Category"),
        ("texts.json", lambda d: d["languages"]["en"]["override_reasons"].update({"other-indication": ""}), "other-indication"),
        ("rules.json", lambda d: d["not_recommended"]["ana"].update(allowed_when="no-such-predicate"), "no predicate"),
        ("rules.json", lambda d: d["rules"]["tsh-missing"].update(card_sentences=[]), "must quote"),
        ("rules.json", lambda d: d["order_codes"]["tsh"]["codings"][0].update(verification="UNVERIFIED"), "VERIFIED"),
        ("rules.json", lambda d: d["prognosis"]["cells"][2].update(value=88), "is not of type 'null'"),
        ("rules.json", lambda d: d["links"].update(freya="http://www.freya.nl/"), "does not match"),
    ],
)
def test_invalid_knowledge_stops_start_up(monkeypatch, fresh_knowledge, file_name, mutate, message):
    _with_data(monkeypatch, file_name, mutate)
    with pytest.raises(KnowledgeError) as error:
        load_knowledge()
    assert file_name in str(error.value) and message in str(error.value)


def test_banned_term_in_a_data_file_stops_start_up(monkeypatch, fresh_knowledge):
    original = knowledge_module.resources.files

    class Patched:
        def __init__(self, inner):
            self.inner = inner

        def joinpath(self, name):
            inner = self.inner.joinpath(name)
            if name != "texts.json":
                return inner

            class Text:
                def read_text(self, encoding="utf-8"):
                    return inner.read_text(encoding=encoding).replace("Herhaalde miskraam", "Habituele abortus", 1)

            return Text()

    monkeypatch.setattr(knowledge_module.resources, "files", lambda package: Patched(original(package)))
    with pytest.raises(KnowledgeError, match="banned term"):
        load_knowledge()


@pytest.mark.parametrize("schema_name", ["rules.schema.json", "texts.schema.json"])
def test_knowledge_schemas_are_valid_json_schemas(schema_name):
    from jsonschema import Draft202012Validator

    Draft202012Validator.check_schema(knowledge_module._read_json(schema_name))


def test_warm_up_validates_the_suggestion_shapes():
    from cards import build

    build._validated_shapes.clear()
    build.warm_up()
    assert len(build._validated_shapes) >= 3


def test_knowledge_loads_and_is_consistent():
    kn = load_knowledge()
    assert tuple(kn.rules) == RULE_IDS
    assert kn.default_language == "nl" and set(kn.texts) == {"nl", "en"}
    assert kn.selection_behavior == "any"


@pytest.mark.parametrize("ga, said", [
    (weeks_days(9), "de TSH is in deze zwangerschap afgenomen; de bovengrens is verlaagd met 0,5 mIU/L."),
    (None, "de TSH is aangenomen als afgenomen in deze zwangerschap (datum of zwangerschapsduur onbekend"),
])
def test_thyroid_card_says_when_the_pregnancy_limit_rests_on_an_assumption(ga, said):
    """A3: with the pregnancy's age unknown, a recent TSH is only assumed to be of this pregnancy
    (LONGEST_PREGNANCY, an rpl-cds choice); the card must not state it as a fact."""
    facts = rpl(2, pregnant=True, gestational_age_days=ga, tsh_results=(tsh(3.8, when=days_ago(2)),),
                ft4_results=(ft4(9, when=days_ago(2)),))
    (finding,) = [f for f in evaluate(facts, "patient-view") if f.rule_id == "hypothyroidism-treatment"]
    interpretations = build_card(finding, facts=facts, language="nl")["detail"]
    assert said in interpretations
    other = ("aangenomen als afgenomen" if ga is not None else "de TSH is in deze zwangerschap afgenomen")
    assert other not in interpretations
