"""Findings -> CDS Hooks 2.0 cards (one card per finding), in Dutch (default) or English.

Texts come from cards/data/texts.json, metadata from cards/data/rules.json. Every card has a
fresh `uuid`, a `summary` < 140 characters, `indicator`, `source` with `topic` (code = rule id),
a Markdown `detail` that quotes the Dutch card sentence and names the guideline, and - only when
they have content - `links`, `suggestions` (+ `selectionBehavior`) and `overrideReasons`.
Optional fields are omitted, never null or empty.

Suggested resources (ServiceRequest / MedicationRequest) are FHIR R4 drafts with status "draft",
intent "order", the patient as subject and reasonCode "recurrent miscarriage" (SNOMED 102878001).
They are validated with fhir.resources (R4B models) once per distinct resource shape; a suggestion
whose resource fails validation is dropped (logged), never sent.

`selectionBehavior` is "any" (rules.json card_defaults): valid CDS Hooks 2.0, the only value Epic
accepts, and no card offers mutually exclusive suggestions.
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Callable, Iterable, Mapping
from datetime import date
from typing import Any

from fhir_mappings.facts import Category, PatientFacts

from .findings import ORDER_RULE_IDS, Finding
from .knowledge import SUMMARY_LIMIT, Knowledge, load_knowledge, summary_var_max

log = logging.getLogger(__name__)

_RESOURCE_ID = re.compile(r"^[A-Za-z]+/[A-Za-z0-9\-.]{1,64}$")
# Characters that start inline Markdown/HTML markup in GFM (block markers such as '#' or '-' only
# act at the start of a line, and our texts never put EHR text there).
_MD_SPECIAL = re.compile(r"([\\`*_\[\]<>|~])")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")
UCUM = "http://unitsofmeasure.org"


# =============================================================================================
# Language helpers
# =============================================================================================


class Lang:
    """Texts and formatting of one language."""

    def __init__(self, knowledge: Knowledge, language: str):
        self.code = knowledge.language(language)
        self.texts = knowledge.texts[self.code]
        self.common = self.texts["common"]

    def rule(self, rule_id: str) -> Mapping[str, Any]:
        return self.texts["rules"][rule_id]

    def category(self, value: str | Category) -> str:
        key = value.value if isinstance(value, Category) else value
        return self.texts["categories"][key]

    def fragment(self, rule_id: str, key: str, **values: Any) -> str:
        return self.rule(rule_id)["fragments"][key].format_map(_stringify(values))

    def date(self, iso: str | None) -> str:
        if not iso:
            return self.common["unknown"]
        return date.fromisoformat(iso).strftime(self.common["date_format"])

    def number(self, value: float | int | None) -> str:
        if value is None:
            return self.common["unknown"]
        return f"{value:g}".replace(".", self.common["decimal_separator"])

    def quantity(self, value: float | None, unit: str | None) -> str:
        if value is None:
            return self.common["unknown"]
        return f"{self.number(value)} {escape_md(unit)}" if unit else self.number(value)

    def ga(self, days: int | None) -> str:
        if days is None:
            return self.common["unknown"]
        return self.common["ga"].format(weeks=days // 7, days=days % 7)

    def join(self, items: Iterable[str]) -> str:
        items = list(items)
        if not items:
            return self.common["none"]
        if len(items) == 1:
            return items[0]
        return ", ".join(items[:-1]) + self.common["list_and"] + items[-1]

    def recorded(self, flag: bool) -> str:
        return self.common["recorded"] if flag else self.common["not_recorded"]


def escape_md(text: str | None, limit: int = 200) -> str:
    """EHR-supplied text inside Markdown: no control characters, no markup, no raw HTML."""
    if not text:
        return ""
    text = _CONTROL.sub(" ", text).strip()[:limit]
    return _MD_SPECIAL.sub(r"\\\1", text)


def _stringify(values: Mapping[str, Any]) -> dict[str, str]:
    return {k: "" if v is None or v is False else ("1" if v is True else str(v)) for k, v in values.items()}


# =============================================================================================
# Template variables per rule: (finding, facts, lang) -> {name: value}
# =============================================================================================

VarsFn = Callable[[Finding, PatientFacts, Lang], dict[str, Any]]


def _vars_rpl_summary(f: Finding, facts: PatientFacts, lang: Lang) -> dict[str, Any]:
    p = f.params
    rid = f.rule_id
    breakdown = [lang.fragment(rid, f"kind.{kind}", count=n) for kind, n in p["breakdown"].items()]
    lines = []
    karyotype_partial = False
    for item in p["checklist"]:
        status = lang.fragment(rid, f"status.{item['status']}", criteria_met=item.get("criteria_met", 0))
        lines.append(lang.fragment(rid, "checklist.line", item=lang.category(item["item"]), status=status))
        if item["status"] == "not-advised" and item.get("criteria_met", 0) > 0:
            karyotype_partial = True
    prognosis = p["prognosis"]
    return {
        "loss_count": p["loss_count"],
        "missing_count": p["open_items"],
        "breakdown": ", ".join(breakdown) if breakdown else lang.fragment(rid, "breakdown.none"),
        "count_basis": lang.fragment(rid, f"basis.{p['loss_count_basis']}"),
        "checklist": "\n".join(lines),
        "not_advised_present": lang.join(lang.category(c) for c in p["not_advised_present"])
        if p["not_advised_present"]
        else "",
        "prognosis": lang.fragment(rid, f"prognosis.{prognosis['status']}", **prognosis),
        "karyotype_partial": karyotype_partial,
        # Added by the service's override memory (service/store.py) when the clinician overrode a
        # not-recommended warning for this patient earlier.
        "remembered_overrides": "; ".join(
            lang.fragment(
                rid,
                "remembered_item",
                category=lang.category(o["category"])
                if o.get("category") in lang.texts["categories"]
                else escape_md(str(o.get("category"))),
                overridden_on=lang.date(o.get("overridden_on")),
                remembered_until=lang.date(o.get("remembered_until")),
            )
            for o in p.get("remembered_overrides") or ()
        ),
    }


def _vars_preconception(f: Finding, facts: PatientFacts, lang: Lang) -> dict[str, Any]:
    return {
        "folic_acid": lang.recorded(f.params["folic_acid_recorded"]),
        "vitamin_d": lang.recorded(f.params["vitamin_d_recorded"]),
    }


def _tsh_text(p: Mapping[str, Any], lang: Lang, rule_id: str | None = None) -> str:
    if p.get("tsh_value") is not None:
        return lang.quantity(p["tsh_value"], p.get("tsh_unit"))
    if rule_id and p.get("tsh_state"):
        return lang.fragment(rule_id, f"state.{p['tsh_state']}")
    return lang.common["unknown"]


def _pregnancy_limit_vars(p: dict) -> dict[str, bool]:
    """Which A3 interpretation the thyroid cards show: the pregnancy limit on a TSH known to be of
    this pregnancy, or on one assumed to be (undated TSH, or pregnancy of unknown age)."""
    limits, assumed = p.get("pregnancy_limits", False), p.get("pregnancy_limits_assumed", False)
    return {"pregnancy_limits_known": limits and not assumed, "pregnancy_limits_assumed": limits and assumed}


def _vars_ft4_missing(f: Finding, facts: PatientFacts, lang: Lang) -> dict[str, Any]:
    p = f.params
    upper = p.get("upper_limit")
    return {
        "tsh": _tsh_text(p, lang, f.rule_id),
        "tsh_date": lang.date(p.get("tsh_date")),
        "tsh_state": lang.fragment(f.rule_id, f"state.{p['tsh_state']}"),
        "upper_limit": lang.quantity(upper, p.get("tsh_unit"))
        if upper is not None
        else lang.common["unknown"],
        **_pregnancy_limit_vars(p),
    }


def _vars_hypothyroidism(f: Finding, facts: PatientFacts, lang: Lang) -> dict[str, Any]:
    p = f.params
    return {
        "tsh": _tsh_text(p, lang),
        "tsh_date": lang.date(p.get("tsh_date")),
        "ft4": lang.quantity(p.get("ft4_value"), p.get("ft4_unit")),
        **_pregnancy_limit_vars(p),
    }


def _vars_apl_missing(f: Finding, facts: PatientFacts, lang: Lang) -> dict[str, Any]:
    missing = f.params["missing"]
    return {"missing_count": len(missing), "missing_list": lang.join(lang.category(c) for c in missing)}


def _vars_apl_repeat(f: Finding, facts: PatientFacts, lang: Lang) -> dict[str, Any]:
    unknown = lang.fragment(f.rule_id, "date_unknown")
    lines = [
        lang.fragment(
            f.rule_id,
            "test_line",
            test=lang.category(t["test"]),
            first_positive=lang.date(t["first_positive"]) if t["first_positive"] else unknown,
            due_date=lang.date(t["due_date"]) if t["due_date"] else unknown,
        )
        for t in f.params["tests"]
    ]
    earliest = f.params.get("earliest_due")
    return {
        "tests_list": "\n".join(lines),
        "due_date": lang.date(earliest) if earliest else unknown,
        "count": len(f.params["tests"]),
    }


def _vars_aps(f: Finding, facts: PatientFacts, lang: Lang) -> dict[str, Any]:
    p = f.params
    tests = lang.join(lang.category(t) for t in p["tests"])
    present = [Category.LOW_DOSE_ASPIRIN.value] * p["aspirin_present"] + [Category.LMWH.value] * p[
        "lmwh_present"
    ]
    return {
        "basis": lang.fragment(f.rule_id, f"basis.{p['basis']}", tests=tests),
        "present": lang.join(lang.category(c) for c in present) if present else "",
        "two_losses_caveat": p["two_losses_caveat"],
    }


def _vars_karyotype(f: Finding, facts: PatientFacts, lang: Lang) -> dict[str, Any]:
    return {"age": f.params["age_years"], "loss_count": f.params["loss_count"]}


def _vars_genetics(f: Finding, facts: PatientFacts, lang: Lang) -> dict[str, Any]:
    return {"triggers": lang.join(lang.fragment(f.rule_id, f"trigger.{t}") for t in f.params["triggers"])}


def _vars_progesterone(f: Finding, facts: PatientFacts, lang: Lang) -> dict[str, Any]:
    p = f.params
    onset = p.get("bleeding_onset_days")
    return {
        "ga": lang.ga(p["gestational_age_days"]),
        "onset": lang.ga(onset) if onset is not None else lang.fragment(f.rule_id, "onset_unknown"),
        "loss_count": p["loss_count"],
        "until_date": lang.date(p["until_date"]),
    }


def _vars_ga(f: Finding, facts: PatientFacts, lang: Lang) -> dict[str, Any]:
    return {"ga": lang.ga(f.params.get("gestational_age_days"))}


def _vars_aftercare(f: Finding, facts: PatientFacts, lang: Lang) -> dict[str, Any]:
    return {"rpl": f.params.get("rpl", False)}


def _vars_not_recommended(f: Finding, facts: PatientFacts, lang: Lang) -> dict[str, Any]:
    p = f.params
    category = lang.category(p["category"])
    criteria = p.get("criteria") or {}
    criteria_met = sum(1 for v in criteria.values() if v)
    fragments = lang.rule(f.rule_id).get("fragments", {})
    note_key = f"note.{p['category']}"
    note_values = {
        "criteria_met": criteria_met,
        "tsh": _tsh_text(p, lang),
        "tsh_date": lang.date(p.get("tsh_date")),
    }
    note = lang.fragment(f.rule_id, note_key, **note_values) if note_key in fragments else ""
    return {
        "category": category,
        "order_display": escape_md(p.get("order_display")) or escape_md(category),
        "note": note,
        "criteria_met": criteria_met,
    }


def _no_vars(f: Finding, facts: PatientFacts, lang: Lang) -> dict[str, Any]:
    return {}


VARS: dict[str, VarsFn] = {
    "rpl-summary": _vars_rpl_summary,
    "preconception-advice": _vars_preconception,
    "tsh-missing": _no_vars,
    "ft4-missing": _vars_ft4_missing,
    "hypothyroidism-treatment": _vars_hypothyroidism,
    "apl-missing": _vars_apl_missing,
    "apl-repeat": _vars_apl_repeat,
    "aps-treatment": _vars_aps,
    "uterine-imaging-missing": _no_vars,
    "urogenital-tract-check": _no_vars,
    "karyotype-indicated": _vars_karyotype,
    "clinical-genetics-referral": _vars_genetics,
    "progesterone-indicated": _vars_progesterone,
    "cervical-surveillance": _no_vars,
    "early-pregnancy-support": _vars_ga,
    "anti-d-indicated": _vars_ga,
    "miscarriage-aftercare": _vars_aftercare,
    "not-recommended-test": _vars_not_recommended,
    "not-recommended-treatment": _vars_not_recommended,
}


# =============================================================================================
# Suggested FHIR resources
# =============================================================================================


def _codings(knowledge: Knowledge, key: str) -> list[dict]:
    return [
        {"system": c["system"], "code": c["code"], "display": c["display"]}
        for c in knowledge.order_codes[key]["codings"]
    ]


def _reason(knowledge: Knowledge, lang: Lang) -> list[dict]:
    # A reason of recurrent miscarriage documents why the order exists (the no-alert-loop property
    # itself comes from only suggesting what the not-recommended rules allow; see the tests).
    return [{"coding": _codings(knowledge, "reason-rpl"), "text": lang.common["reason_text"]}]


def service_request(
    knowledge: Knowledge, lang: Lang, facts: PatientFacts, category: str, *, not_before: date | None = None
) -> dict:
    resource: dict[str, Any] = {
        "resourceType": "ServiceRequest",
        "status": "draft",
        "intent": "order",
        "code": {"coding": _codings(knowledge, category), "text": lang.category(category)},
        "subject": {"reference": facts.patient_ref},
        "authoredOn": facts.today.isoformat(),
        "reasonCode": _reason(knowledge, lang),
    }
    if not_before is not None and not_before > facts.today:
        resource["occurrencePeriod"] = {"start": not_before.isoformat()}
    return resource


def progesterone_request(knowledge: Knowledge, lang: Lang, facts: PatientFacts, until: date) -> dict:
    """R32: "2dd 400mg progesteron vaginaal tot AD 16wk"."""
    rid = "progesterone-indicated"
    return {
        "resourceType": "MedicationRequest",
        "status": "draft",
        "intent": "order",
        "medicationCodeableConcept": {
            "coding": _codings(knowledge, Category.PROGESTERONE.value),
            "text": lang.category(Category.PROGESTERONE),
        },
        "subject": {"reference": facts.patient_ref},
        "authoredOn": facts.today.isoformat(),
        "reasonCode": _reason(knowledge, lang),
        "dosageInstruction": [
            {
                "text": lang.fragment(rid, "dosage_text", until_date=lang.date(until.isoformat())),
                "timing": {
                    "repeat": {
                        "frequency": 2,
                        "period": 1,
                        "periodUnit": "d",
                        "boundsPeriod": {"start": facts.today.isoformat(), "end": until.isoformat()},
                    }
                },
                "route": {"text": lang.fragment(rid, "route")},
                "doseAndRate": [{"doseQuantity": {"value": 400, "unit": "mg", "system": UCUM, "code": "mg"}}],
            }
        ],
    }


_validated_shapes: set[Any] = set()


def _shape(value: Any) -> Any:
    """The structure of a resource (keys and value types, not values), for validation caching."""
    if isinstance(value, dict):
        return tuple(sorted((k, _shape(v)) for k, v in value.items()))
    if isinstance(value, list):
        return ("list", tuple(_shape(v) for v in value))
    return type(value).__name__


def fhir_valid(resource: dict) -> bool:
    """Validate against the fhir.resources R4B model once per distinct shape (a few tenths of a
    millisecond each; the models load lazily on first use)."""
    key = _shape(resource)
    if key in _validated_shapes:
        return True
    try:
        from fhir.resources.R4B import get_fhir_model_class

        get_fhir_model_class(resource["resourceType"]).model_validate(resource)
    except Exception:  # noqa: BLE001 - any validation failure drops the suggestion
        log.error("suggested %s failed FHIR validation; suggestion left out", resource.get("resourceType"))
        return False
    _validated_shapes.add(key)
    return True


def warm_up() -> None:
    """Load the FHIR models and validate every suggested resource shape once, so the first hook
    call does not pay for it (about half a second). Call at start-up, after load_knowledge()."""
    from datetime import timedelta

    from fhir_mappings.facts import PatientFacts as Facts

    knowledge = load_knowledge()
    today = date.today()
    facts = Facts(today=today, patient_ref="Patient/warm-up")
    for language in knowledge.texts:
        lang = Lang(knowledge, language)
        for resource in (
            service_request(knowledge, lang, facts, Category.TSH.value),
            service_request(
                knowledge, lang, facts, Category.ACL_IGG.value, not_before=today + timedelta(days=1)
            ),
            progesterone_request(knowledge, lang, facts, today + timedelta(days=14)),
        ):
            if not fhir_valid(resource):
                raise RuntimeError(f"suggested {resource['resourceType']} does not validate")


def _create_action(description: str, resource: dict) -> dict:
    return {"type": "create", "description": description, "resource": resource}


def _suggestion(label: str, actions: list[dict], *, recommended: bool = True) -> dict:
    suggestion: dict[str, Any] = {"uuid": str(uuid.uuid4()), "label": label, "actions": actions}
    if recommended:
        suggestion["isRecommended"] = True
    return suggestion


def _suggestions(
    finding: Finding, facts: PatientFacts, lang: Lang, knowledge: Knowledge, vars_: Mapping[str, Any]
) -> list[dict]:
    rule_texts = lang.rule(finding.rule_id)
    templates = rule_texts.get("suggestions", {})
    rid = finding.rule_id

    def fmt(template: str, **extra: Any) -> str:
        return template.format_map(_stringify({**vars_, **extra}))

    if "delete" in templates:
        order = finding.order
        ref = order.resource_ref if order is not None else None
        if not ref or not _RESOURCE_ID.match(ref):
            return []
        t = templates["delete"]
        action = {"type": "delete", "description": fmt(t["description"]), "resourceId": ref}
        return [_suggestion(fmt(t["label"]), [action])]

    if "create" not in templates or not facts.patient_ref:
        return []  # ServiceRequest/MedicationRequest.subject is required: no patient, no resource
    t = templates["create"]
    actions: list[dict] = []
    if rid in ("tsh-missing", "ft4-missing", "karyotype-indicated"):
        category = {"tsh-missing": "tsh", "ft4-missing": "ft4", "karyotype-indicated": "parental-karyotype"}[
            rid
        ]
        actions.append(
            _create_action(fmt(t["description"]), service_request(knowledge, lang, facts, category))
        )
    elif rid == "apl-missing":
        for category in finding.params["missing"]:
            code = knowledge.order_codes[category]["codings"][0]["code"]
            actions.append(
                _create_action(
                    fmt(t["description"], test=lang.category(category), code=code),
                    service_request(knowledge, lang, facts, category),
                )
            )
    elif rid == "apl-repeat":
        for test in finding.params["tests"]:
            due = date.fromisoformat(test["due_date"]) if test["due_date"] else None
            code = knowledge.order_codes[test["test"]]["codings"][0]["code"]
            actions.append(
                _create_action(
                    fmt(
                        t["description"],
                        test=lang.category(test["test"]),
                        code=code,
                        due_date=lang.date(test["due_date"]) if due else lang.fragment(rid, "date_unknown"),
                    ),
                    service_request(knowledge, lang, facts, test["test"], not_before=due),
                )
            )
    elif rid == "progesterone-indicated":
        if finding.variant != "confirmed":
            return []  # A7: intrauterine pregnancy not confirmed on ultrasound: no one-click prescription
        until = date.fromisoformat(finding.params["until_date"])
        actions.append(
            _create_action(fmt(t["description"]), progesterone_request(knowledge, lang, facts, until))
        )
    if not actions or not all(fhir_valid(a["resource"]) for a in actions):
        return []
    return [_suggestion(fmt(t["label"]), actions)]


# =============================================================================================
# Cards
# =============================================================================================


def _summary(finding: Finding, lang: Lang, vars_: Mapping[str, Any]) -> str:
    summary = lang.rule(finding.rule_id)["summary"]
    template = summary if isinstance(summary, str) else summary.get(finding.variant, summary.get("default"))
    if template is None:
        raise KeyError(f"{finding.rule_id}: no summary for variant {finding.variant!r}")
    clamped = {}
    for name, value in _stringify(vars_).items():
        limit = summary_var_max(name)
        clamped[name] = value if len(value) <= limit else value[: limit - 1] + "…"
    text = template.format_map(clamped)
    # load_knowledge() proved every template fits with clamped values; this is a last guard.
    return text if len(text) < SUMMARY_LIMIT else text[: SUMMARY_LIMIT - 2] + "…"


def _quote_lines(finding: Finding, lang: Lang, knowledge: Knowledge) -> tuple[str, ...]:
    """The quoted card sentences and references of a rule (for order warnings: of the order's
    category) in one language. They depend on nothing else, so each is built once."""
    category = finding.category if finding.rule_id in ORDER_RULE_IDS else None
    key = (finding.rule_id, category, lang.code)
    lines = knowledge.quote_lines.get(key)
    if lines is None:
        lines = knowledge.quote_lines[key] = tuple(_build_quote_lines(finding.rule_id, category, lang, knowledge))
    return lines


def _build_quote_lines(rule_id: str, category: Category | None, lang: Lang, knowledge: Knowledge) -> list[str]:
    meta = knowledge.rules[rule_id]
    card_sentences = list(meta["card_sentences"])
    refs = list(meta["guideline_refs"])
    ambiguities = list(meta["ambiguities"])
    if category is not None:
        entry = knowledge.not_recommended[category]
        card_sentences, refs, ambiguities = (
            list(entry.card_sentences),
            list(entry.refs),
            list(entry.ambiguities),
        )
    lines = [lang.common["card_quote"].format(sentence=escape_md(s, limit=1000)) for s in card_sentences]
    lines += [
        lang.common["leaflet_quote"].format(sentence=escape_md(s, limit=1000))
        for s in meta.get("leaflet_sentences", ())
    ]
    lines.append(lang.common["guideline_line" if meta["source"] == "guideline" else "leaflet_line"])
    if refs and ambiguities:
        lines.append(lang.common["refs"].format(refs=", ".join(refs), ambiguities=", ".join(ambiguities)))
    elif refs:
        lines.append(lang.common["refs_no_ambiguities"].format(refs=", ".join(refs)))
    return lines


def _detail(finding: Finding, lang: Lang, knowledge: Knowledge, vars_: Mapping[str, Any]) -> str:
    rule_texts = lang.rule(finding.rule_id)
    values = _stringify(vars_)
    blocks = []
    for block in rule_texts["detail"]:
        if isinstance(block, str):
            blocks.append(block.format_map(values))
            continue
        if "if" in block and not values.get(block["if"]):
            continue
        if "variant" in block and finding.variant not in block["variant"]:
            continue
        blocks.append(block["text"].format_map(values))
    for item in rule_texts.get("interpretations", ()):
        if "if" in item and not values.get(item["if"]):
            continue
        blocks.append(
            lang.common["interpretation"].format(ref=item["ref"], text=item["text"].format_map(values))
        )
    blocks.extend(_quote_lines(finding, lang, knowledge))
    return "\n\n".join(b for b in blocks if b.strip())


def build_card(finding: Finding, *, facts: PatientFacts, language: str) -> dict:
    """One CDS Hooks card for one finding. Raises on a defect in the data or the finding."""
    knowledge = load_knowledge()
    lang = Lang(knowledge, language)
    meta = knowledge.rules[finding.rule_id]
    vars_ = VARS[finding.rule_id](finding, facts, lang)
    card: dict[str, Any] = {
        "uuid": str(uuid.uuid4()),
        "summary": _summary(finding, lang, vars_),
        "indicator": meta.get("indicator_by_variant", {}).get(finding.variant, meta["indicator"]),
        "detail": _detail(finding, lang, knowledge, vars_),
        "source": {
            "label": lang.common[f"source_label.{meta['source']}"],
            "url": knowledge.sources[meta["source"]],
            "topic": {
                "system": knowledge.systems["topic"],
                "code": finding.rule_id,
                "display": lang.rule(finding.rule_id)["title"],
            },
        },
    }
    suggestions = _suggestions(finding, facts, lang, knowledge, vars_)
    if suggestions:
        card["suggestions"] = suggestions
        card["selectionBehavior"] = knowledge.selection_behavior
    reasons = [
        {
            "system": knowledge.systems["override_reason"],
            "code": code,
            "display": lang.texts["override_reasons"][code],
        }
        for code in meta["override_reasons"]
    ]
    if reasons:
        card["overrideReasons"] = reasons
    links = [
        {"label": lang.common[f"links.{name}"], "url": knowledge.links[name], "type": "absolute"}
        for name in meta["links"]
    ]
    if links:
        card["links"] = links
    return card


def build_card_pairs(
    findings: Iterable[Finding], *, facts: PatientFacts, language: str
) -> list[tuple[Finding, dict]]:
    """(finding, card) for every finding whose card could be built, in order. A finding whose card
    fails to build (a defect) is logged with its rule id and left out, not sent half-made."""
    pairs = []
    for finding in findings:
        try:
            pairs.append((finding, build_card(finding, facts=facts, language=language)))
        except Exception:  # noqa: BLE001 - one defective card must not take down the response
            log.exception("card for rule %s could not be built; left out", finding.rule_id)
    return pairs


def build_cards(findings: Iterable[Finding], *, facts: PatientFacts, language: str) -> list[dict]:
    """The cards for `findings`, one per finding, in order (see build_card_pairs for pairing)."""
    return [card for _, card in build_card_pairs(findings, facts=facts, language=language)]
