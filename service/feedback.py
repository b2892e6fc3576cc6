"""`POST /cds-services/{id}/feedback` (CDS Hooks 2.0): what the clinician did with a card.

Checks, in order: the service exists (404); the body is JSON (415/413/400); it matches
service/schemas/feedback-request.schema.json (400 naming `feedback[i].field`); each timestamp is
a real RFC 3339 date-time; each card was issued by THIS service and each accepted suggestion
belongs to that card (400 naming the item). Then every item is stored in one transaction (all or
nothing); a repeated item (same card, outcome, outcomeTimestamp and suggestions) is not stored
twice. 200 comes only after the commit; 503 with Retry-After when the database is unavailable.

The clinician's free-text `userComment` is not stored (it may name the patient); only whether
there was one.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime

from flask import Blueprint, current_app, g, jsonify, request

from .errors import ApiError
from .store import FeedbackRow, IssuedCard, StoreUnavailable, feedback_dedup_key
from .validation import parse_json_body, validate_or_400

bp = Blueprint("feedback", __name__)

RETRY_AFTER_SECONDS = 5
_FRACTION = re.compile(r"\.(\d+)")


def parse_rfc3339(value: str) -> datetime:
    """An RFC 3339 date-time (already shape-checked by the schema) as an aware UTC datetime."""
    text = value.upper().replace("Z", "+00:00")
    # Python takes at most 6 fractional digits; a leap second becomes the last microsecond.
    text = _FRACTION.sub(lambda m: "." + m.group(1)[:6].ljust(6, "0"), text, count=1)
    leap = text[17:19] == "60"
    if leap:
        text = text[:17] + "59" + text[19:]
    moment = datetime.fromisoformat(text)
    if leap:
        moment = moment.replace(microsecond=999_999)
    return moment.astimezone(UTC)


def parse_items(items: list[dict]) -> list[FeedbackRow]:
    """Schema-valid items -> rows (400 for impossible timestamps such as February 30)."""
    rows = []
    for index, item in enumerate(items):
        try:
            outcome_at = parse_rfc3339(item["outcomeTimestamp"])
        except ValueError:
            field = f"feedback[{index}].outcomeTimestamp"
            raise ApiError(
                400, f"{field}: not a valid RFC 3339 date-time", expression=[field]
            ) from None
        suggestions = tuple(sorted({s["id"] for s in item.get("acceptedSuggestions") or ()}))
        override = item.get("overrideReason") or {}
        reason = override.get("reason") or {}
        rows.append(
            FeedbackRow(
                dedup_key=feedback_dedup_key(item["card"], item["outcome"], outcome_at, suggestions),
                card_uuid=item["card"],
                outcome=item["outcome"],
                outcome_at=outcome_at,
                accepted_suggestions=suggestions,
                override_reason_system=reason.get("system"),
                override_reason_code=reason.get("code"),
                override_has_comment=bool((override.get("userComment") or "").strip()),
            )
        )
    return rows


def check_against_issued(
    service_id: str, items: list[dict], issued: dict[str, IssuedCard]
) -> None:
    """400 unless every card was issued by this service and every suggestion is on its card."""
    for index, item in enumerate(items):
        field = f"feedback[{index}].card"
        card = issued.get(item["card"])
        if card is None:
            raise ApiError(
                400,
                f"{field}: no card with uuid {item['card']!r} was issued by this service "
                "(or it has been deleted after the retention period)",
                expression=[field],
            )
        if card.service_id != service_id:
            raise ApiError(
                400,
                f"{field}: card {item['card']!r} was issued by service '{card.service_id}', "
                f"not by '{service_id}'",
                expression=[field],
            )
        for position, suggestion in enumerate(item.get("acceptedSuggestions") or ()):
            if suggestion["id"] not in card.suggestion_uuids:
                where = f"feedback[{index}].acceptedSuggestions[{position}].id"
                raise ApiError(
                    400,
                    f"{where}: {suggestion['id']!r} is not a suggestion of card {item['card']!r}",
                    expression=[where],
                )


def _unavailable() -> ApiError:
    return ApiError(
        503,
        "Feedback cannot be stored right now (database unavailable); nothing was stored. "
        "Please send it again later.",
        headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
    )


@bp.post("/cds-services/<service_id>/feedback")
def receive_feedback(service_id: str):
    service = current_app.extensions["rpl_services"].get(service_id)
    if service is None:
        raise ApiError(404, f"Unknown CDS Service '{service_id}'.", expression=["id"])
    g.rpl_service_id = service.id
    settings = current_app.config["RPL_SETTINGS"]
    body = parse_json_body(request, settings.max_body_bytes)
    validate_or_400(body, "feedback-request.schema.json")
    assert isinstance(body, dict)
    items: list[dict] = body["feedback"]
    rows = parse_items(items)
    store = current_app.extensions.get("rpl_store")
    if store is None:
        raise _unavailable()
    try:
        issued = store.issued_cards(item["card"] for item in items)
        check_against_issued(service.id, items, issued)
        stored = store.store_feedback(rows)
    except StoreUnavailable:
        raise _unavailable() from None
    return jsonify({"received": len(items), "stored": stored, "duplicates": len(items) - stored})


def init_app(app) -> None:
    app.register_blueprint(bp)


# --------------------------------------------------------------------------------------------
# OpenAPI (service/openapi.py collects this)


def openapi_paths(components: dict) -> dict:
    from .analytics import openapi_paths as analytics_paths
    from .openapi import ERROR_DESCRIPTIONS, error_response

    feedback = {
        "/cds-services/{id}/feedback": {
            "post": {
                "summary": "Feedback on cards (CDS Hooks 2.0): accepted or overridden",
                "operationId": "feedback",
                "parameters": [
                    {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}
                ],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {"$ref": "#/components/schemas/FeedbackRequest"}
                        }
                    },
                },
                "responses": {
                    "200": {
                        "description": "Every item is durably stored (duplicates once).",
                        "content": {
                            "application/json": {
                                "schema": {"$ref": "#/components/schemas/FeedbackResponse"}
                            }
                        },
                    },
                    "400": error_response(
                        "Invalid body, unknown card, card of another service, or a suggestion "
                        "not on the card; the OperationOutcome names feedback[i] and the field."
                    ),
                    "401": error_response("Missing or invalid CDS Hooks JWT."),
                    "404": error_response(ERROR_DESCRIPTIONS["404"]),
                    "413": error_response(ERROR_DESCRIPTIONS["413"]),
                    "415": error_response(ERROR_DESCRIPTIONS["415"]),
                    "503": {
                        **error_response("Database unavailable; nothing was stored. Retry later."),
                        "headers": {
                            "Retry-After": {
                                "description": "Seconds to wait before sending again.",
                                "schema": {"type": "integer"},
                            }
                        },
                    },
                },
            }
        }
    }
    feedback.update(analytics_paths(components))
    return feedback
