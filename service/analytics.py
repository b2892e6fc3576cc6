"""Usage numbers per rule: cards shown, accepted, overridden (by reason), ignored, and low-value
orders removed. `GET /analytics` (JSON; HTML when the client prefers text/html) and
`GET /analytics/page` (server-rendered HTML with inline SVG charts per week: no scripts, no
external resources). Authentication for /analytics* is added by the security layer.

Definitions (the same in `rpl-cds report`):
- shown: cards issued (recorded) in the period, by card issue time;
- a card's outcome is its newest feedback (by outcomeTimestamp); accepted / overridden count
  cards, not feedback messages, so shown = accepted + overridden + ignored;
- ignored: shown without any feedback (CDS Hooks clients do not report ignored cards);
- overridden by reason: the override reason Coding as "system|code", `null` without a reason;
- low-value orders removed: not-recommended-test/-treatment cards whose accepted suggestions
  include one that deletes the draft order.
"""

from __future__ import annotations

import base64
import hashlib
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from html import escape
from zoneinfo import ZoneInfo

from flask import Blueprint, Response, current_app, jsonify, request

from .errors import ApiError
from .store import CardOutcome, StoreUnavailable, parse_since

bp = Blueprint("analytics", __name__)

COUNTS = ("shown", "accepted", "overridden", "ignored", "lowValueOrdersRemoved")


@dataclass
class Tally:
    shown: int = 0
    accepted: int = 0
    overridden: int = 0
    ignored: int = 0
    low_value_orders_removed: int = 0
    reasons: Counter = field(default_factory=Counter)

    def add(self, card: CardOutcome) -> None:
        self.shown += 1
        if card.outcome == "accepted":
            self.accepted += 1
        elif card.outcome == "overridden":
            self.overridden += 1
            self.reasons[card.override_reason] += 1
        else:
            self.ignored += 1
        if card.removed_order:
            self.low_value_orders_removed += 1

    def counts(self) -> dict:
        return {
            "shown": self.shown,
            "accepted": self.accepted,
            "overridden": self.overridden,
            "ignored": self.ignored,
            "lowValueOrdersRemoved": self.low_value_orders_removed,
        }

    def reasons_list(self) -> list[dict]:
        ordered = sorted(self.reasons.items(), key=lambda item: (-item[1], item[0] or ""))
        return [{"reason": reason, "count": count} for reason, count in ordered]


def week_start(moment: datetime, zone: ZoneInfo) -> date:
    day = moment.astimezone(zone).date()
    return day - timedelta(days=day.weekday())


def summarise(
    outcomes: Iterable[CardOutcome],
    *,
    since: datetime | None,
    zone: ZoneInfo,
    now: datetime,
) -> dict:
    """The analytics document (pure: from card outcomes to numbers)."""
    total = Tally()
    by_rule: dict[str, Tally] = defaultdict(Tally)
    by_week: dict[date, Tally] = defaultdict(Tally)
    for card in outcomes:
        total.add(card)
        by_rule[card.rule_id].add(card)
        by_week[week_start(card.issued_at, zone)].add(card)
    weeks = []
    if by_week:
        current, last = min(by_week), max(by_week)
        while current <= last:  # continuous series: empty weeks are zeros, not gaps
            weeks.append({"weekStart": current.isoformat(), **by_week[current].counts()})
            current += timedelta(days=7)
    return {
        "generatedAt": now.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "since": since.date().isoformat() if since else None,
        "totals": total.counts(),
        "rules": [
            {"ruleId": rule, **tally.counts(), "overriddenByReason": tally.reasons_list()}
            for rule, tally in sorted(by_rule.items())
        ],
        "weeks": weeks,
    }


def analytics_document(app, since: datetime | None) -> dict:
    """Raises StoreUnavailable."""
    store = app.extensions.get("rpl_store")
    if store is None:
        raise StoreUnavailable("no store")
    zone = ZoneInfo(app.config["RPL_SETTINGS"].timezone)
    return summarise(store.card_outcomes(since), since=since, zone=zone, now=store.clock())


def _since_from_query() -> datetime | None:
    raw = request.args.get("since")
    try:
        return parse_since(raw)
    except ValueError:
        raise ApiError(
            400, f"since: expected a date YYYY-MM-DD, got {raw!r}", expression=["since"]
        ) from None


def _document_or_503(since: datetime | None) -> dict:
    try:
        return analytics_document(current_app, since)
    except StoreUnavailable:
        raise ApiError(
            503, "Analytics are unavailable (database unavailable).", headers={"Retry-After": "5"}
        ) from None


@bp.get("/analytics")
def analytics_json():
    since = _since_from_query()
    # Browsers (text/html first) get the page; API clients and `*/*` get JSON.
    wanted = request.accept_mimetypes.best_match(["application/json", "text/html"])
    if wanted == "text/html":
        return _page(since)
    return jsonify(_document_or_503(since))


@bp.get("/analytics/page")
def analytics_page():
    return _page(_since_from_query())


def _page(since: datetime | None) -> Response:
    html = render_page(_document_or_503(since))
    response = Response(html, mimetype="text/html")
    # Self-contained page: the one style block is allowed by its hash, nothing else loads.
    response.headers["Content-Security-Policy"] = (
        f"default-src 'none'; style-src '{STYLE_HASH}'; base-uri 'none'; "
        "form-action 'self'; frame-ancestors 'none'"
    )
    response.headers["Cache-Control"] = "no-store"
    return response


def init_app(app) -> None:
    app.register_blueprint(bp)


# --------------------------------------------------------------------------------------------
# HTML rendering (plain server-side HTML + inline SVG; colours chosen for >= 4.5:1 contrast
# on white, and every chart repeats its numbers in a table)

SERIES = (
    ("accepted", "Accepted", "#1a6632"),
    ("overridden", "Overridden", "#a84300"),
    ("ignored", "No feedback (ignored)", "#595959"),
)
REMOVED_COLOUR = "#1f4e99"

STYLE = (
    "body{font-family:system-ui,sans-serif;color:#1a1a1a;background:#fff;margin:2rem;"
    "max-width:72rem}"
    "table{border-collapse:collapse;margin:1rem 0}"
    "th,td{border:1px solid #767676;padding:.3rem .6rem;text-align:right}"
    "th:first-child,td:first-child,td.text{text-align:left}"
    "td.text ul{margin:0;padding-left:1rem}"
    "td.text{overflow-wrap:anywhere}.rules{width:100%}.rules th:last-child{text-align:left}"
    "caption{text-align:left;font-weight:bold;margin-bottom:.3rem}"
    "figure{margin:1.5rem 0}figcaption{font-weight:bold;margin-bottom:.5rem}"
    ".legend{list-style:none;padding:0;display:flex;gap:1.5rem;flex-wrap:wrap}"
    ".swatch{display:inline-block;width:1rem;height:1rem;margin-right:.4rem;"
    "vertical-align:middle;border:1px solid #1a1a1a}"
    + "".join(f".s-{key}{{background:{colour}}}" for key, _label, colour in SERIES)
    + f".s-removed{{background:{REMOVED_COLOUR}}}"
    "a{color:#1f4e99}:focus{outline:3px solid #1f4e99;outline-offset:2px}"
)
STYLE_HASH = "sha256-" + base64.b64encode(hashlib.sha256(STYLE.encode()).digest()).decode()


def render_page(document: dict) -> str:
    since = document["since"]
    totals = document["totals"]
    weeks = document["weeks"]
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        "<title>rpl-cds analytics</title>",
        f"<style>{STYLE}</style></head><body><main>",
        "<h1>rpl-cds: use of the cards</h1>",
        f"<p>Generated {escape(document['generatedAt'])}. "
        + (f"Cards issued since {escape(since)}." if since else "All recorded cards.")
        + " Ignored means shown without feedback; a card counts once, with its latest outcome."
        "</p>",
        '<form method="get" action=""><label for="since">Since (YYYY-MM-DD)</label> '
        f'<input id="since" name="since" type="date" value="{escape(since or "")}"> '
        '<button type="submit">Show</button></form>',
        _totals_table(totals),
        _rules_table(document["rules"]),
    ]
    if weeks:
        parts.append(_outcome_chart(weeks))
        parts.append(_removed_chart(weeks))
        parts.append(_weeks_table(weeks))
    else:
        parts.append("<p>No cards were recorded in this period.</p>")
    parts.append("</main></body></html>")
    return "\n".join(parts)


def _row(cells: list, header: bool = False) -> str:
    if header:
        return "<tr>" + "".join(f'<th scope="col">{cell}</th>' for cell in cells) + "</tr>"
    rest = "".join(f"<td>{cell}</td>" for cell in cells[1:])
    return f'<tr><th scope="row">{cells[0]}</th>{rest}</tr>'


HEADINGS = ["Shown", "Accepted", "Overridden", "Ignored", "Low-value orders removed"]


def _totals_table(totals: dict) -> str:
    return (
        "<table><caption>All rules together</caption>"
        + _row(["", *HEADINGS], header=True)
        + _row(["All cards", *(totals[key] for key in COUNTS)])
        + "</table>"
    )


def _rules_table(rules: list[dict]) -> str:
    if not rules:
        return ""
    rows = []
    for rule in rules:
        reasons = "".join(
            f"<li>{escape(item['reason'] or 'no reason given')}: {item['count']}</li>"
            for item in rule["overriddenByReason"]
        )
        cells = "".join(f"<td>{rule[key]}</td>" for key in COUNTS)
        reasons_cell = f'<td class="text"><ul>{reasons}</ul></td>' if reasons else '<td class="text">–</td>'
        rows.append(f'<tr><th scope="row">{escape(rule["ruleId"])}</th>{cells}{reasons_cell}</tr>')
    return (
        '<table class="rules"><caption>Per rule (card topic)</caption>'
        + _row(["Rule", *HEADINGS, "Override reasons"], header=True)
        + "".join(rows)
        + "</table>"
    )


def _weeks_table(weeks: list[dict]) -> str:
    return (
        "<table><caption>Per week (the numbers behind the charts)</caption>"
        + _row(["Week starting", *HEADINGS], header=True)
        + "".join(_row([w["weekStart"], *(w[key] for key in COUNTS)]) for w in weeks)
        + "</table>"
    )


def _nice_max(value: int) -> int:
    if value <= 5:
        return max(value, 1)
    magnitude = 10 ** (len(str(value)) - 1)
    for step in (1, 2, 5, 10):
        if value <= step * magnitude:
            return step * magnitude
    return value


W, H, LEFT, RIGHT, TOP, BOTTOM = 720, 260, 56, 16, 16, 56


def _axes(maximum: int, weeks: list[dict], y_title: str) -> list[str]:
    plot_h = H - TOP - BOTTOM
    middle = TOP + plot_h / 2
    out = [
        f'<text x="14" y="{middle:.1f}" text-anchor="middle" font-size="12" fill="#1a1a1a" '
        f'transform="rotate(-90 14 {middle:.1f})">{escape(y_title)}</text>',
        f'<line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{H - BOTTOM}" stroke="#1a1a1a"/>',
        f'<line x1="{LEFT}" y1="{H - BOTTOM}" x2="{W - RIGHT}" y2="{H - BOTTOM}" '
        'stroke="#1a1a1a"/>',
    ]
    for tick in sorted({0, maximum // 2, maximum}):
        y = H - BOTTOM - plot_h * tick / maximum
        out.append(
            f'<text x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end" font-size="12" '
            f'fill="#1a1a1a">{tick}</text>'
        )
        out.append(
            f'<line x1="{LEFT}" y1="{y:.1f}" x2="{W - RIGHT}" y2="{y:.1f}" stroke="#d0d0d0"/>'
        )
    step = max(1, len(weeks) // 8)  # at most ~8 date labels
    slot = (W - LEFT - RIGHT) / len(weeks)
    for index in range(0, len(weeks), step):
        x = LEFT + slot * (index + 0.5)
        out.append(
            f'<text x="{x:.1f}" y="{H - BOTTOM + 18}" text-anchor="middle" font-size="11" '
            f'fill="#1a1a1a">{weeks[index]["weekStart"]}</text>'
        )
    out.append(
        f'<text x="{(LEFT + W - RIGHT) / 2:.1f}" y="{H - 10}" text-anchor="middle" '
        'font-size="12" fill="#1a1a1a">Week starting (Monday)</text>'
    )
    return out


def _svg(chart_id: str, title: str, description: str, body: list[str]) -> str:
    return (
        f'<svg role="img" aria-labelledby="{chart_id}-t {chart_id}-d" viewBox="0 0 {W} {H}" '
        f'width="100%" preserveAspectRatio="xMinYMin meet" xmlns="http://www.w3.org/2000/svg">'
        f'<title id="{chart_id}-t">{escape(title)}</title>'
        f'<desc id="{chart_id}-d">{escape(description)}</desc>' + "".join(body) + "</svg>"
    )


def _legend(entries: list[tuple[str, str]]) -> str:
    items = "".join(
        f'<li><span class="swatch s-{key}" aria-hidden="true"></span>{escape(label)}</li>'
        for key, label in entries
    )
    return f'<ul class="legend">{items}</ul>'


def _outcome_chart(weeks: list[dict]) -> str:
    maximum = _nice_max(max(w["shown"] for w in weeks))
    plot_h = H - TOP - BOTTOM
    slot = (W - LEFT - RIGHT) / len(weeks)
    bar = max(2.0, slot * 0.7)
    body = _axes(maximum, weeks, "Cards")
    for index, week in enumerate(weeks):
        x = LEFT + slot * index + (slot - bar) / 2
        y = H - BOTTOM
        for key, label, colour in SERIES:
            value = week[key]
            if not value:
                continue
            height = plot_h * value / maximum
            y -= height
            body.append(
                f'<rect x="{x:.1f}" y="{y:.1f}" width="{bar:.1f}" height="{height:.1f}" '
                f'fill="{colour}" stroke="#ffffff" stroke-width="0.5">'
                f"<title>{week['weekStart']}: {escape(label)} {value}</title></rect>"
            )
    total = sum(w["shown"] for w in weeks)
    description = (
        f"Stacked bars, one per week from {weeks[0]['weekStart']} to {weeks[-1]['weekStart']}: "
        f"cards shown ({total} in total), split into accepted, overridden and no feedback. "
        "The table below lists the same numbers."
    )
    return (
        '<figure><figcaption id="outcomes-caption">Cards shown per week, by outcome'
        "</figcaption>"
        + _legend([(key, label) for key, label, _c in SERIES])
        + _svg("outcomes", "Cards shown per week, by outcome", description, body)
        + "</figure>"
    )


def _removed_chart(weeks: list[dict]) -> str:
    maximum = _nice_max(max(w["lowValueOrdersRemoved"] for w in weeks))
    plot_h = H - TOP - BOTTOM
    slot = (W - LEFT - RIGHT) / len(weeks)
    bar = max(2.0, slot * 0.7)
    body = _axes(maximum, weeks, "Orders removed")
    for index, week in enumerate(weeks):
        value = week["lowValueOrdersRemoved"]
        if not value:
            continue
        height = plot_h * value / maximum
        x = LEFT + slot * index + (slot - bar) / 2
        body.append(
            f'<rect x="{x:.1f}" y="{H - BOTTOM - height:.1f}" width="{bar:.1f}" '
            f'height="{height:.1f}" fill="{REMOVED_COLOUR}">'
            f"<title>{week['weekStart']}: {value} low-value orders removed</title></rect>"
        )
    total = sum(w["lowValueOrdersRemoved"] for w in weeks)
    description = (
        f"Bars, one per week: draft orders the guideline advises against that were removed by "
        f"accepting the card's suggestion ({total} in total). The table below lists the numbers."
    )
    return (
        "<figure><figcaption>Low-value orders removed per week</figcaption>"
        + _legend([("removed", "Orders removed via the card's suggestion")])
        + _svg("removed", "Low-value orders removed per week", description, body)
        + "</figure>"
    )


# --------------------------------------------------------------------------------------------
# OpenAPI


def openapi_paths(components: dict) -> dict:
    from .openapi import error_response

    since = {
        "name": "since",
        "in": "query",
        "required": False,
        "description": "Only cards issued on or after this date (YYYY-MM-DD, UTC) or RFC 3339 "
        "date-time. Empty (as the page's form sends it): all cards.",
        "schema": {"anyOf": [{"type": "string", "format": "date"},
                             {"type": "string", "format": "date-time"},
                             {"type": "string", "maxLength": 0}]},
    }
    errors = {
        "400": error_response("`since` is not a date."),
        "401": error_response("Not authenticated."),
        "503": error_response("Database unavailable."),
    }
    return {
        "/analytics": {
            "get": {
                "summary": "Card use per rule and per week (JSON; HTML if preferred by Accept)",
                "operationId": "analytics",
                "parameters": [since],
                "responses": {
                    "200": {
                        "description": "Counts per rule and per week.",
                        "content": {
                            "application/json": {
                                "schema": {"$ref": "#/components/schemas/AnalyticsResponse"}
                            },
                        },
                    },
                    **errors,
                },
            }
        },
        "/analytics/page": {
            "get": {
                "summary": "The same numbers as an HTML page with charts (no scripts)",
                "operationId": "analyticsPage",
                "parameters": [since],
                "responses": {
                    "200": {
                        "description": "HTML page.",
                        "content": {"text/html": {"schema": {"type": "string"}}},
                    },
                    **errors,
                },
            }
        },
    }
