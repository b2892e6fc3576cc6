"""Guideline knowledge as data: `cards/data/rules.json` (rule metadata, the NIET AANBEVOLEN table,
verified order codes, the prognosis table) and `cards/data/texts.json` (card texts, nl and en).

Both files are validated against their JSON Schemas and cross-checked (every rule id has texts in
every language, every template is well formed, every summary fits < 140 characters, no banned
term, ...) once, at start-up: `load_knowledge()` raises `KnowledgeError` on any defect so a broken
data file stops the service instead of producing wrong cards.
"""

from __future__ import annotations

import json
import re
import string
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from types import MappingProxyType
from typing import Any

from jsonschema import Draft202012Validator

from fhir_mappings.facts import Category

from .findings import RULE_IDS

# Every summary variable is clamped to a maximum length when a card is built (numbers and dates
# to their natural width, anything else to 40 characters); with these limits every summary
# template must stay below the CDS Hooks limit of 140 characters (checked below, at start-up).
SUMMARY_VAR_MAX = 40
SUMMARY_VAR_MAX_BY_NAME: Mapping[str, int] = MappingProxyType(
    {"loss_count": 3, "missing_count": 2, "count": 2, "due_date": 10, "until_date": 10, "tsh": 16, "ga": 16}
)


def summary_var_max(name: str) -> int:
    return SUMMARY_VAR_MAX_BY_NAME.get(name, SUMMARY_VAR_MAX)


SUMMARY_LIMIT = 140
# R02: the card asks to avoid the old term for recurrent miscarriage (the one that starts with
# "habitu..."); no text of ours may contain it in any language.
BANNED_TERMS = re.compile(r"habitu", re.IGNORECASE)
_FIELD = re.compile(r"^[a-z][a-z0-9_]*$")


class KnowledgeError(ValueError):
    """The knowledge data files are invalid; the message names the file and the defect."""


@dataclass(frozen=True)
class NotRecommendedEntry:
    category: Category
    kind: str  # "test" | "treatment"
    refs: tuple[str, ...]
    ambiguities: tuple[str, ...]
    allowed_when: str | None  # name of an exception predicate in cards.rules.ALLOWED_WHEN
    card_sentences: tuple[str, ...]


@dataclass(frozen=True)
class Knowledge:
    rules: Mapping[str, Mapping[str, Any]]
    not_recommended: Mapping[Category, NotRecommendedEntry]
    order_codes: Mapping[str, Mapping[str, Any]]
    prognosis: Mapping[str, Any]
    guideline: Mapping[str, str]
    systems: Mapping[str, str]
    sources: Mapping[str, str]
    links: Mapping[str, str]
    override_reasons: tuple[str, ...]
    selection_behavior: str
    texts: Mapping[str, Mapping[str, Any]]  # language -> {common, categories, override_reasons, rules}
    default_language: str
    # Card quote lines by (rule id, category, language), filled by cards.build on first use: they
    # depend only on this knowledge, so they live and die with it.
    quote_lines: dict[tuple, tuple[str, ...]] = field(default_factory=dict, compare=False, repr=False)

    def language(self, requested: str | None) -> str:
        """The requested language when we have texts for it, else the default (Dutch)."""
        return requested if requested in self.texts else self.default_language

    def prognosis_cell(self, age_band: int, losses: int) -> Mapping[str, Any] | None:
        for cell in self.prognosis["cells"]:
            if cell["age"] == age_band and cell["losses"] == losses:
                return cell
        return None


def _read_json(name: str) -> Any:
    text = resources.files("cards.data").joinpath(name).read_text(encoding="utf-8")
    if BANNED_TERMS.search(text):
        raise KnowledgeError(f"{name}: contains a banned term (the one R02 asks to avoid, 'habitu...')")
    return json.loads(text)


def _validate_schema(data: Any, schema_name: str, data_name: str) -> None:
    schema = _read_json(schema_name)  # the schemas themselves are checked in tests/test_card_building.py
    errors = sorted(Draft202012Validator(schema).iter_errors(data), key=lambda e: list(e.absolute_path))
    if errors:
        first = errors[0]
        where = "/".join(str(p) for p in first.absolute_path) or "(root)"
        raise KnowledgeError(f"{data_name}: {where}: {first.message} ({len(errors)} error(s))")


def template_fields(template: str, where: str) -> list[str]:
    """The placeholders of a str.format template; only plain `{name}` fields are allowed."""
    fields = []
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as error:
        raise KnowledgeError(f"{where}: malformed template: {error}") from None
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if not _FIELD.match(name) or spec or conversion:
            raise KnowledgeError(f"{where}: placeholder {{{name}}} must be a plain lower-case name")
        fields.append(name)
    return fields


def _worst_case_summary(template: str, where: str) -> int:
    filler = {name: "X" * summary_var_max(name) for name in template_fields(template, where)}
    return len(template.format_map(filler))


def _check_texts(rules: Mapping, texts: Mapping) -> None:
    languages = texts["languages"]
    reference = languages[texts["default_language"]]
    category_values = {c.value for c in Category}
    for lang, body in languages.items():
        where = f"texts.json/{lang}"
        if set(body["rules"]) != set(RULE_IDS):
            raise KnowledgeError(
                f"{where}/rules: rule ids differ from RULE_IDS: {sorted(set(body['rules']) ^ set(RULE_IDS))}"
            )
        if set(body["categories"]) != category_values:
            raise KnowledgeError(
                f"{where}/categories: must name every Category exactly: {sorted(set(body['categories']) ^ category_values)}"
            )
        if set(body["override_reasons"]) != set(rules["override_reasons"]):
            raise KnowledgeError(f"{where}/override_reasons: must match rules.json override_reasons")
        if set(body["common"]) != set(reference["common"]):
            raise KnowledgeError(f"{where}/common: keys differ from the default language")
        for name in rules["links"]:
            if f"links.{name}" not in body["common"]:
                raise KnowledgeError(f"{where}/common: no label for link '{name}'")
        for key, value in body["common"].items():
            template_fields(value, f"{where}/common/{key}")
        for rule_id, rule_texts in body["rules"].items():
            _check_rule_texts(rule_id, rule_texts, reference["rules"][rule_id], f"{where}/rules/{rule_id}")


def _check_rule_texts(rule_id: str, rule_texts: Mapping, reference: Mapping, where: str) -> None:
    summary = rule_texts["summary"]
    variants = summary if isinstance(summary, dict) else {"default": summary}
    ref_summary = reference["summary"]
    ref_variants = ref_summary if isinstance(ref_summary, dict) else {"default": ref_summary}
    if set(variants) != set(ref_variants):
        raise KnowledgeError(f"{where}/summary: variants differ from the default language")
    for variant, template in variants.items():
        length = _worst_case_summary(template, f"{where}/summary/{variant}")
        if length >= SUMMARY_LIMIT:
            raise KnowledgeError(
                f"{where}/summary/{variant}: {length} characters with values at their maximum "
                f"length; a summary must stay below {SUMMARY_LIMIT}"
            )
    for index, block in enumerate(rule_texts["detail"]):
        text = block if isinstance(block, str) else block["text"]
        template_fields(text, f"{where}/detail/{index}")
    for index, item in enumerate(rule_texts.get("interpretations", ())):
        template_fields(item["text"], f"{where}/interpretations/{index}")
    for key, text in rule_texts.get("fragments", {}).items():
        template_fields(text, f"{where}/fragments/{key}")
    for part in ("fragments", "suggestions"):
        if set(rule_texts.get(part, {})) != set(reference.get(part, {})):
            raise KnowledgeError(f"{where}/{part}: keys differ from the default language")
    for key, suggestion in rule_texts.get("suggestions", {}).items():
        template_fields(suggestion["label"], f"{where}/suggestions/{key}/label")
        template_fields(suggestion["description"], f"{where}/suggestions/{key}/description")


def _check_rules(rules: Mapping) -> None:
    from . import rules as rule_module  # late import: rules imports this module

    if tuple(rules["rules"]) != RULE_IDS:
        raise KnowledgeError("rules.json/rules: must list exactly the rule ids of RULE_IDS, in that order")
    if set(rule_module.RULES) != set(RULE_IDS):
        raise KnowledgeError("cards.rules.RULES does not implement every rule id")
    category_values = {c.value for c in Category}
    for rule_id, meta in rules["rules"].items():
        where = f"rules.json/rules/{rule_id}"
        for category in meta["categories"]:
            if category not in category_values:
                raise KnowledgeError(f"{where}/categories: unknown category '{category}'")
        for link in meta["links"]:
            if link not in rules["links"]:
                raise KnowledgeError(f"{where}/links: unknown link '{link}'")
        for reason in meta["override_reasons"]:
            if reason not in rules["override_reasons"]:
                raise KnowledgeError(f"{where}/override_reasons: unknown reason '{reason}'")
        if (
            meta["source"] == "guideline"
            and not meta["card_sentences"]
            and rule_id not in ("not-recommended-test", "not-recommended-treatment")
        ):
            raise KnowledgeError(f"{where}: a guideline rule must quote its card sentence(s)")
        if meta["source"] == "leaflet" and not meta.get("leaflet_sentences"):
            raise KnowledgeError(f"{where}: a leaflet rule must quote its leaflet sentence(s)")
    for category, entry in rules["not_recommended"].items():
        where = f"rules.json/not_recommended/{category}"
        if category not in category_values:
            raise KnowledgeError(f"{where}: unknown category")
        predicate = entry["allowed_when"]
        if predicate is not None and predicate not in rule_module.ALLOWED_WHEN:
            raise KnowledgeError(
                f"{where}/allowed_when: no predicate named '{predicate}' in cards.rules.ALLOWED_WHEN"
            )
    for key in rules["order_codes"]:
        if key != "reason-rpl" and key not in category_values:
            raise KnowledgeError(f"rules.json/order_codes/{key}: unknown category")
    cells = {(c["age"], c["losses"]) for c in rules["prognosis"]["cells"]}
    if len(cells) != len(rules["prognosis"]["cells"]):
        raise KnowledgeError("rules.json/prognosis/cells: duplicate (age, losses) cell")


def _freeze(value: Any) -> Any:
    if isinstance(value, dict):
        return MappingProxyType({k: _freeze(v) for k, v in value.items()})
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


@cache
def load_knowledge() -> Knowledge:
    """Load, validate and cross-check both data files (once per process)."""
    rules = _read_json("rules.json")
    texts = _read_json("texts.json")
    _validate_schema(rules, "rules.schema.json", "rules.json")
    _validate_schema(texts, "texts.schema.json", "texts.json")
    _check_rules(rules)
    _check_texts(rules, texts)
    not_recommended = {
        Category(category): NotRecommendedEntry(
            category=Category(category),
            kind=entry["kind"],
            refs=tuple(entry["refs"]),
            ambiguities=tuple(entry["ambiguities"]),
            allowed_when=entry["allowed_when"],
            card_sentences=tuple(entry["card_sentences"]),
        )
        for category, entry in rules["not_recommended"].items()
    }
    return Knowledge(
        rules=_freeze(rules["rules"]),
        not_recommended=MappingProxyType(not_recommended),
        order_codes=_freeze(rules["order_codes"]),
        prognosis=_freeze(rules["prognosis"]),
        guideline=_freeze(rules["guideline"]),
        systems=_freeze(rules["systems"]),
        sources=_freeze(rules["sources"]),
        links=_freeze(rules["links"]),
        override_reasons=tuple(rules["override_reasons"]),
        selection_behavior=rules["card_defaults"]["selectionBehavior"],
        texts=_freeze(texts["languages"]),
        default_language=texts["default_language"],
    )
