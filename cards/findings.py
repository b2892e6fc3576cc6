"""What a guideline rule concluded about one patient: the contract between `cards.rules` and
`cards.build` (and the service, which records rule id / order / category per card uuid).

A finding carries no text: texts live in `cards/data/texts.json` and are chosen per language
when the card is built.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fhir_mappings.facts import Category, Intervention

# Stable rule ids. Each is also the card's `source.topic.code` (Epic honours overrides per topic
# code), the key in cards/data/rules.json and texts.json, and the name used in the rule book.
RULE_IDS: tuple[str, ...] = (
    "rpl-summary",
    "preconception-advice",
    "tsh-missing",
    "ft4-missing",
    "hypothyroidism-treatment",
    "apl-missing",
    "apl-repeat",
    "aps-treatment",
    "uterine-imaging-missing",
    "urogenital-tract-check",
    "karyotype-indicated",
    "clinical-genetics-referral",
    "progesterone-indicated",
    "cervical-surveillance",
    "early-pregnancy-support",
    "anti-d-indicated",
    "miscarriage-aftercare",
    "not-recommended-test",
    "not-recommended-treatment",
)

# Order-entry rules: one finding (and one card) per order in focus that the guideline advises against.
ORDER_RULE_IDS: tuple[str, ...] = ("not-recommended-test", "not-recommended-treatment")


@dataclass(frozen=True)
class Finding:
    """One conclusion of one rule.

    `params` holds plain JSON-compatible values (str, int, float, bool, None, lists, dicts; dates as
    ISO strings) so the service can store it as it is. `order` is the draft order a
    not-recommended warning concerns; `category` the guideline category the finding is about.
    """

    rule_id: str
    params: Mapping[str, Any] = field(default_factory=dict, hash=False)
    # Not in the hash: an Intervention is mutable (slots, no hash), and params is a dict.
    order: Intervention | None = field(default=None, hash=False)
    category: Category | None = None

    @property
    def variant(self) -> str:
        """Which text variant of the rule applies (e.g. 'overt' vs 'sch-consider'); 'default'."""
        value = self.params.get("variant")
        return value if isinstance(value, str) else "default"
