"""Discovery and the three hook endpoints. Thin: parse, validate, gather, then hand over to the
pure guideline layer (fhir_mappings -> cards) and return its cards."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import date, datetime
from itertools import chain
from zoneinfo import ZoneInfo

from flask import Blueprint, Response, current_app, g, jsonify, request

from cards.build import build_card_pairs
from cards.rules import evaluate
from fhir_mappings.extract import extract_patient_facts, flatten_bundle

from .config import Settings
from .errors import ApiError
from .gather import decide_fhir_access, gather
from .json_codec import json_response
from .language import choose_language
from .services import CdsService
from .validation import CONTEXT_SCHEMA_BY_HOOK, check_json_body_headers, read_json_body, validate_or_400

log = logging.getLogger(__name__)
bp = Blueprint("hooks", __name__)


@dataclass(frozen=True)
class HookCall:
    """What the rest of the service (storage, metrics, logs) needs to know about one hook call."""

    service: CdsService
    hook_instance: str
    patient_id: str
    user_id: str
    encounter_id: str | None
    today: date


def registry() -> dict[str, CdsService]:
    return current_app.extensions["rpl_services"]


@bp.get("/cds-services")
def discovery():
    return jsonify({"services": [s.discovery_entry() for s in registry().values()]})


@bp.post("/cds-services/<service_id>")
def call_service(service_id: str):
    service = registry().get(service_id)
    if service is None:
        raise ApiError(404, f"Unknown CDS Service '{service_id}'.", expression=["id"])
    g.rpl_service_id = service.id
    settings = current_app.config["RPL_SETTINGS"]
    check_json_body_headers(request, settings.max_body_bytes)
    gate = current_app.extensions.get("rpl_large_bodies")
    if gate is None:
        return answer_hook(service, settings)
    # The body and everything made from it are freed when answer_hook returns, inside the turn.
    with gate.turn(request.environ):
        return answer_hook(service, settings)


def answer_hook(service: CdsService, settings: Settings) -> Response:
    """Read the hook request and answer it with cards (the body-free checks are done)."""
    deadline = time.monotonic() + settings.deadline_ms / 1000
    body = read_json_body(request, settings.max_body_bytes)
    validate_hook_request(body, service)
    g.rpl_hook_instance = body["hookInstance"]
    context = body["context"]
    draft_orders = flatten_bundle(context.get("draftOrders"))
    focus_refs = selected_refs(context, draft_orders) if service.hook == "order-select" else None

    access = decide_fhir_access(
        body, settings.fhir_servers, allow_loopback=settings.local_mode
    )
    gathered = gather(
        body, service, access, deadline=deadline, max_pages=settings.max_fhir_pages
    )
    g.rpl_fetched_keys = gathered.fetched_keys
    g.rpl_fetch_ms = gathered.fetch_ms
    call = HookCall(
        service=service,
        hook_instance=body["hookInstance"],
        patient_id=context["patientId"],
        user_id=context["userId"],
        encounter_id=context.get("encounterId"),
        today=datetime.now(ZoneInfo(settings.timezone)).date(),
    )
    facts = extract_patient_facts(
        # In the discovery document's key order, as before; no flattened copy.
        chain.from_iterable(gathered.by_key.get(key.key, ()) for key in service.prefetch),
        today=call.today,
        draft_orders=draft_orders,
        focus_refs=focus_refs,
        codes=current_app.extensions["rpl_codes"],
    )
    language = choose_language(gathered.by_key.get("practitioner", ()), settings.language)
    findings = evaluate(facts, service.hook)
    store = current_app.extensions.get("rpl_store")
    if store is not None:
        findings = store.filter_findings(call, facts, findings)
    # Pairs, not two lists: a card that fails to build is left out with its finding, so the
    # store records each card uuid against the finding that produced it.
    pairs = build_card_pairs(findings, facts=facts, language=language)
    cards = [card for _, card in pairs]
    if store is not None:
        store.record_cards_in_background(call, pairs)
    g.rpl_card_topics = [c["source"].get("topic", {}).get("code") for c in cards]
    return json_response({"cards": cards})


def validate_hook_request(body: object, service: CdsService) -> None:
    validate_or_400(body, "hook-request.schema.json")
    assert isinstance(body, dict)
    if body["hook"] != service.hook:
        raise ApiError(
            400,
            f"hook '{str(body['hook'])[:64]}' does not match service '{service.id}', "
            f"which answers the '{service.hook}' hook.",
            expression=["hook"],
        )
    validate_or_400(body["context"], CONTEXT_SCHEMA_BY_HOOK[service.hook], prefix="context")


def selected_refs(context: dict, draft_orders: list[dict]) -> set[str]:
    """order-select focuses on `selections`; each must name an order in draftOrders."""
    present = {f"{r.get('resourceType')}/{r.get('id')}" for r in draft_orders if r.get("id")}
    selections = set(context.get("selections") or ())
    absent = sorted(selections - present)
    if absent:
        raise ApiError(
            400,
            "context.selections names orders that are not in context.draftOrders: "
            + ", ".join(absent),
            expression=["context.selections"],
        )
    return selections
