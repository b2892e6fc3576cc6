"""Analytics: the numbers (pure), GET /analytics (JSON), and the HTML page with its charts."""

from __future__ import annotations

import base64
import hashlib
import re
import uuid
import xml.etree.ElementTree as ET
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from service.analytics import STYLE, render_page, summarise
from service.store import CardOutcome, FeedbackRow, feedback_dedup_key
from service.validation import validator
from tests.test_store import card_for, hook_call, warning

MONDAY = datetime(2025, 3, 3, 9, 0, tzinfo=UTC)
ZONE = ZoneInfo("Europe/Amsterdam")


def outcome(rule="not-recommended-test", at=MONDAY, result=None, reason=None, removed=False):
    return CardOutcome(rule, at, result, reason, removed)


def test_summary_counts_each_card_once_by_its_final_outcome():
    cards = [
        outcome(result="accepted", removed=True),
        outcome(result="overridden", reason="s|indicated"),
        outcome(result="overridden", reason="s|indicated", at=MONDAY + timedelta(days=15)),
        outcome(result="overridden", reason=None),
        outcome(),
        outcome(rule="rpl-summary"),
    ]
    document = summarise(cards, since=None, zone=ZONE, now=MONDAY)
    validator("analytics-response.schema.json").validate(document)
    (warning_rule,) = [r for r in document["rules"] if r["ruleId"] == "not-recommended-test"]
    assert warning_rule == {
        "ruleId": "not-recommended-test",
        "shown": 5, "accepted": 1, "overridden": 3, "ignored": 1, "lowValueOrdersRemoved": 1,
        "overriddenByReason": [{"reason": "s|indicated", "count": 2}, {"reason": None, "count": 1}],
    }
    assert document["totals"] == {
        "shown": 6, "accepted": 1, "overridden": 3, "ignored": 2, "lowValueOrdersRemoved": 1
    }
    # Weeks run without gaps from the first to the last card (Mondays, local time).
    assert [w["weekStart"] for w in document["weeks"]] == ["2025-03-03", "2025-03-10", "2025-03-17"]
    assert [w["shown"] for w in document["weeks"]] == [5, 0, 1]


def test_week_boundaries_follow_the_service_time_zone():
    # Sunday 23:30 UTC is Monday 00:30 in Amsterdam: the next week there.
    sunday_night = datetime(2025, 3, 9, 23, 30, tzinfo=UTC)
    document = summarise([outcome(at=sunday_night)], since=None, zone=ZONE, now=MONDAY)
    assert document["weeks"][0]["weekStart"] == "2025-03-10"


def _record(store, rule_outcomes):
    """Issue cards through the store and give them feedback: [(issued_at, outcome|None)]."""
    for issued_at, result in rule_outcomes:
        store.clock = lambda at=issued_at: at
        finding = warning()
        card = card_for(finding)
        store.record_cards(hook_call("order-select", patient_id=str(uuid.uuid4())), [(finding, card)])
        if result:
            suggestions = (card["suggestions"][0]["uuid"],) if result == "accepted" else ()
            store.store_feedback([
                FeedbackRow(feedback_dedup_key(card["uuid"], result, issued_at, suggestions),
                            card["uuid"], result, issued_at, suggestions,
                            "http://example.org/r" if result == "overridden" else None,
                            "other" if result == "overridden" else None, False)
            ])
    store.clock = lambda: datetime.now(UTC)


@pytest.fixture
def analytics_client(app):
    store = app.extensions["rpl_store"]
    now = datetime.now(UTC)
    _record(store, [
        (now - timedelta(days=20), "accepted"),
        (now - timedelta(days=20), "overridden"),
        (now - timedelta(days=6), None),
        (now - timedelta(days=1), "accepted"),
    ])
    return app.test_client()


def test_analytics_json(analytics_client):
    response = analytics_client.get("/analytics")
    assert response.status_code == 200 and response.mimetype == "application/json"
    document = response.get_json()
    validator("analytics-response.schema.json").validate(document)
    assert document["totals"] == {
        "shown": 4, "accepted": 2, "overridden": 1, "ignored": 1, "lowValueOrdersRemoved": 2
    }
    assert document["rules"][0]["overriddenByReason"] == [
        {"reason": "http://example.org/r|other", "count": 1}
    ]
    assert sum(w["shown"] for w in document["weeks"]) == 4

    since = (datetime.now(UTC) - timedelta(days=10)).date().isoformat()
    recent = analytics_client.get(f"/analytics?since={since}").get_json()
    assert recent["since"] == since and recent["totals"]["shown"] == 2


def test_analytics_rejects_a_bad_since(analytics_client):
    response = analytics_client.get("/analytics?since=last-week")
    assert response.status_code == 400
    assert "since" in response.get_json()["issue"][0]["details"]["text"]


def _contrast(hex_colour: str, background: str = "#ffffff") -> float:
    def luminance(value: str) -> float:
        channels = [int(value[i : i + 2], 16) / 255 for i in (1, 3, 5)]
        linear = [c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4 for c in channels]
        return 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]

    light, dark = sorted((luminance(hex_colour), luminance(background)), reverse=True)
    return (light + 0.05) / (dark + 0.05)


@pytest.mark.parametrize("path,headers", [
    ("/analytics/page", {}),
    ("/analytics", {"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"}),
])
def test_analytics_page_is_self_contained_and_accessible(analytics_client, path, headers):
    response = analytics_client.get(path, headers=headers)
    assert response.status_code == 200 and response.mimetype == "text/html"
    html = response.get_data(as_text=True)
    # Nothing is loaded from anywhere: no scripts, no src/href, no CSS url() or @import.
    assert "<script" not in html
    assert not re.search(r"\b(src|href)\s*=|url\(|@import", html)
    # The style block is allowed by its hash in the page's Content-Security-Policy.
    digest = base64.b64encode(hashlib.sha256(STYLE.encode()).digest()).decode()
    assert f"'sha256-{digest}'" in response.headers["Content-Security-Policy"]
    assert f"<style>{STYLE}</style>" in html
    assert '<html lang="en">' in html

    charts = re.findall(r"<svg.*?</svg>", html, flags=re.S)
    assert len(charts) == 2
    for chart in charts:
        svg = ET.fromstring(chart)
        label_ids = svg.get("aria-labelledby").split()
        ns = "{http://www.w3.org/2000/svg}"
        assert svg.get("role") == "img"
        assert {e.get("id") for e in svg.iter() if e.get("id")} >= set(label_ids)
        assert svg.find(f"{ns}title").text and svg.find(f"{ns}desc").text
        bars = svg.findall(f"{ns}rect")
        assert bars and all(bar.find(f"{ns}title").text for bar in bars)
        for colour in {bar.get("fill") for bar in bars} | {t.get("fill") for t in svg.iter(f"{ns}text")}:
            assert _contrast(colour) >= 4.5, colour
    # The numbers behind the charts are in tables with headers.
    assert html.count("<table") == 3 and '<th scope="col">Week starting</th>' in html


def test_page_without_data_says_so():
    document = summarise([], since=None, zone=ZONE, now=MONDAY)
    html = render_page(document)
    assert "No cards were recorded in this period." in html and "<svg" not in html


def test_page_escapes_what_it_shows():
    document = summarise(
        [outcome(rule="<b>x</b>", result="overridden", reason="<i>s</i>|c")],
        since=None, zone=ZONE, now=MONDAY,
    )
    html = render_page(document)
    assert "<b>x</b>" not in html and "&lt;b&gt;x&lt;/b&gt;" in html
    assert "<i>s</i>" not in html


def test_long_periods_keep_the_date_labels_readable():
    start = date(2024, 1, 1)
    cards = [outcome(at=datetime(start.year, 1, 1, tzinfo=UTC) + timedelta(weeks=w)) for w in range(60)]
    html = render_page(summarise(cards, since=None, zone=ZONE, now=MONDAY))
    chart = re.search(r"<svg.*?</svg>", html, flags=re.S).group(0)
    labels = re.findall(r">(\d{4}-\d{2}-\d{2})</text>", chart)
    assert 2 <= len(labels) <= 10
