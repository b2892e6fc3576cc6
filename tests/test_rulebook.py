"""The rule book (cards.rulebook) and its generated copy docs/rules.md."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from cards.findings import ORDER_RULE_IDS, RULE_IDS
from cards.knowledge import load_knowledge
from cards.rulebook import render_rule_book, rule_book, scenario_index

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("language", ["nl", "en"])
def test_rule_book_lists_every_rule_with_its_source(language):
    book = rule_book(language)
    kn = load_knowledge()
    assert [e["rule_id"] for e in book] == list(RULE_IDS)
    for entry in book:
        assert entry["title"] and entry["condition"]
        assert entry["hooks"] == list(kn.rules[entry["rule_id"]]["hooks"])
        if entry["rule_id"] in ORDER_RULE_IDS:
            kind = "test" if entry["rule_id"] == "not-recommended-test" else "treatment"
            assert {i["category"] for i in entry["not_recommended"]} == {
                c.value for c, e in kn.not_recommended.items() if e.kind == kind
            }
            assert all(i["card_sentences"] and i["refs"] for i in entry["not_recommended"])
        else:
            assert entry["card_sentences"] or entry["leaflet_sentences"]


def test_rule_book_shows_the_codes_of_each_category():
    tsh_entry = next(e for e in rule_book("nl") if e["rule_id"] == "tsh-missing")
    (tsh,) = tsh_entry["categories"]
    assert tsh["category"] == "tsh" and tsh["display"] == "TSH"
    assert {"system": "http://loinc.org", "code": "3016-3"}.items() <= tsh["codes"][0].items()
    assert tsh_entry["order_codes"]["tsh"][0]["code"] == "3016-3"
    assert tsh_entry["order_codes"]["reason-rpl"][0]["code"] == "102878001"


def test_scenarios_are_listed_per_rule():
    scenarios = [
        {"name": "three-losses", "hooks": [{"hook": "patient-view", "expect": ["rpl-summary", "tsh-missing"]}]},
        {"name": "thrombophilia-order", "hooks": [{"hook": "order-sign", "expect": ["not-recommended-test"]},
                                                   {"hook": "order-select", "expect": ["not-recommended-test"]}]},
    ]
    index = scenario_index(scenarios)
    assert index == {"rpl-summary": ["three-losses"], "tsh-missing": ["three-losses"],
                     "not-recommended-test": ["thrombophilia-order"]}
    book = {e["rule_id"]: e for e in rule_book("en", index)}
    assert book["tsh-missing"]["scenarios"] == ["three-losses"]
    assert book["apl-missing"]["scenarios"] == []
    assert "three-losses" in render_rule_book("markdown", "en", index)


def test_the_project_scenarios_name_only_known_rule_ids():
    scenarios_module = pytest.importorskip("service.scenarios")
    index = scenario_index(scenarios_module.all_scenarios())
    assert set(index) <= set(RULE_IDS)


@pytest.mark.parametrize("fmt", ["text", "markdown"])
@pytest.mark.parametrize("language", ["nl", "en"])
def test_rendered_rule_book_quotes_every_card_sentence(fmt, language):
    text = render_rule_book(fmt, language)
    kn = load_knowledge()
    for rule_id in RULE_IDS:
        assert rule_id in text
        for sentence in kn.rules[rule_id]["card_sentences"]:
            assert sentence in text
    for entry in kn.not_recommended.values():
        for sentence in entry.card_sentences:
            assert sentence in text
    assert not re.search("habitu", text, re.IGNORECASE)


def test_unknown_format_is_refused():
    with pytest.raises(ValueError):
        render_rule_book("html")


def test_docs_rules_md_is_generated_from_the_current_rule_book():
    """docs/rules.md must equal `rpl-cds rules --format markdown` (regenerate with `make docs`)."""
    script = Path(sys.executable).with_name("rpl-cds")
    if not script.exists():
        pytest.skip("console script rpl-cds not installed")
    result = subprocess.run([str(script), "rules", "--format", "markdown"], capture_output=True, text=True,
                            timeout=120, check=True)
    assert (ROOT / "docs" / "rules.md").read_text(encoding="utf-8") == result.stdout, "run `make docs`"
