"""The browser pages served by the service: the playground (`/playground`: run the real hooks on a
synthetic patient and see the cards as an EHR shows them) and the rule book (`/rules`).

The playground never computes cards itself. Its JSON helper only turns a FHIR Bundle into the CDS
Hooks request an EHR would send (prefetch filled per the service's own prefetch templates); the
page's script then POSTs that request to the real `/cds-services/<id>` endpoint and sends real
feedback to `/cds-services/<id>/feedback`.

The playground is on by default in local mode and off otherwise; RPL_CDS_PLAYGROUND=on|off (or
the Flask setting RPL_PLAYGROUND) overrides that. The rule book holds no patient data and is
always served.
"""

from __future__ import annotations

import json
import os
import uuid
from datetime import datetime
from functools import cache
from pathlib import Path
from urllib.parse import parse_qs
from zoneinfo import ZoneInfo

from flask import (
    Blueprint,
    Flask,
    Response,
    abort,
    current_app,
    jsonify,
    redirect,
    render_template,
    request,
    url_for,
)

from .config import SUPPORTED_LANGUAGES, ConfigError
from .errors import ApiError
from .services import CdsService, PrefetchKey

bp = Blueprint("playground", __name__)

PLAYGROUND_ENV = "RPL_CDS_PLAYGROUND"
PLAYGROUND_CONFIG = "RPL_PLAYGROUND"
_ON = ("1", "true", "yes", "on")
_OFF = ("0", "false", "no", "off")

# The pages load only the service's own scripts and styles and talk only to the service itself.
PAGE_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)
PLAYGROUND_USER_ID = "Practitioner/playground"
BCP47 = "urn:ietf:bcp:47"
SEARCHSET_LIMIT = 2000  # a pasted Bundle larger than this is not a realistic single patient
_TEMPLATES = Path(__file__).with_name("templates")
ANALYTICS_PAGE_ENDPOINT = "analytics.analytics_page"  # service/analytics.py, when installed


def init_app(app: Flask) -> None:
    # Decide (and validate) the switch at start-up: a typo in the variable stops the service.
    app.extensions["rpl_playground"] = playground_enabled(app)
    app.register_blueprint(bp)


def playground_enabled(app: Flask) -> bool:
    raw = app.config.get(PLAYGROUND_CONFIG)
    if raw is None:
        raw = os.environ.get(PLAYGROUND_ENV)
    if isinstance(raw, bool):
        return raw
    if raw is None or not str(raw).strip():
        return bool(app.config["RPL_SETTINGS"].local_mode)
    value = str(raw).strip().lower()
    if value in _ON:
        return True
    if value in _OFF:
        return False
    raise ConfigError(f"{PLAYGROUND_ENV}: expected on/off, got {raw!r}")


def _require_playground() -> None:
    if not current_app.extensions.get("rpl_playground"):
        abort(404)


@bp.after_request
def _page_headers(response: Response) -> Response:
    # A CSP already set (by a stricter layer) is kept; the JSON default of the security layer
    # ('default-src none') would block this page's own script and style, so pages set their own.
    if response.mimetype == "text/html":
        response.headers.setdefault("Content-Security-Policy", PAGE_CSP)
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("Referrer-Policy", "no-referrer")
    response.headers["Cache-Control"] = "no-store"
    return response


# --- pages -----------------------------------------------------------------------------------


@bp.get("/")
def root():
    if current_app.extensions.get("rpl_playground"):
        return redirect(url_for("playground.page"))
    abort(404)


@bp.get("/playground")
def page():
    _require_playground()
    lang = page_language()
    services = _services()
    scenarios = [
        {"name": s["name"], "title": _localised(s.get("title"), lang) or s["name"]}
        for s in _scenario_summaries()
    ]
    config = {
        "scenarioUrl": url_for("playground.scenario", name="__NAME__"),
        "buildUrl": url_for("playground.build_request"),
        "serviceUrl": url_for("hooks.call_service", service_id="__ID__"),
        "text": ui_text(lang),
    }
    return render_template(
        "playground.html",
        lang=lang,
        t=ui_text(lang),
        hooks=[s.hook for s in services.values()],
        scenarios=scenarios,
        config=config,
        nav=_nav("playground", lang),
    )


@bp.get("/rules")
def rules_page():
    """The rule book: the same content as `rpl-cds rules`, with the scenarios of each rule."""
    from cards.knowledge import load_knowledge
    from cards.rulebook import LABELS, rule_book, scenario_index

    from .scenarios import all_scenarios

    lang = page_language()
    return render_template(
        "rules.html",
        lang=lang,
        t=ui_text(lang),
        L=LABELS.get(lang, LABELS["en"]),
        guideline=load_knowledge().guideline,
        book=rule_book(lang, scenario_index(all_scenarios())),
        nav=_nav("rules", lang),
    )


def page_language() -> str:
    asked = request.args.get("lang", "")
    if asked in SUPPORTED_LANGUAGES:
        return asked
    return current_app.config["RPL_SETTINGS"].language


def _nav(active: str, lang: str) -> list[dict]:
    t = ui_text(lang)
    items = []
    if current_app.extensions.get("rpl_playground"):
        items.append({"id": "playground", "label": t["nav_playground"],
                      "url": url_for("playground.page", lang=lang)})
    items.append({"id": "rules", "label": t["nav_rules"], "url": url_for("playground.rules_page", lang=lang)})
    analytics = analytics_page_url(lang)
    if analytics:
        items.append({"id": "analytics", "label": t["nav_analytics"], "url": analytics})
    for item in items:
        item["active"] = item["id"] == active
    return items


def analytics_page_url(lang: str) -> str | None:
    """The analytics HTML page, when installed and reachable from a browser.

    With RPL_CDS_AUTH=required /analytics needs a CDS Hooks JWT, which a browser cannot send:
    no link then.
    """
    if current_app.config["RPL_SETTINGS"].auth != "disabled":
        return None
    if ANALYTICS_PAGE_ENDPOINT in current_app.view_functions:
        return url_for(ANALYTICS_PAGE_ENDPOINT, lang=lang)
    return None


@cache
def _ui_texts() -> dict:
    return json.loads((_TEMPLATES / "ui_text.json").read_text(encoding="utf-8"))


def ui_text(lang: str) -> dict:
    texts = _ui_texts()
    return texts.get(lang) or texts["en"]


def _localised(value, lang: str) -> str | None:
    if isinstance(value, dict):
        return value.get(lang) or value.get("en") or value.get("nl")
    return value if isinstance(value, str) else None


# --- JSON helpers used by the playground page ------------------------------------------------


@bp.get("/playground/api/scenarios/<name>")
def scenario(name: str):
    _require_playground()
    from .scenarios import load_scenario, scenario_names

    if name not in scenario_names():
        raise ApiError(404, f"Unknown scenario '{name}'.", expression=["name"])
    today = datetime.now(ZoneInfo(current_app.config["RPL_SETTINGS"].timezone)).date()
    return jsonify(load_scenario(name, today))


@bp.post("/playground/api/hook-request")
def build_request():
    """Turn {bundle, hook, draftOrders, selections, language} into a CDS Hooks request."""
    _require_playground()
    from .validation import parse_json_body

    settings = current_app.config["RPL_SETTINGS"]
    body = parse_json_body(request, settings.max_body_bytes)
    if not isinstance(body, dict):
        raise ApiError(400, "Body must be a JSON object.")
    hook = body.get("hook")
    service = next((s for s in _services().values() if s.hook == hook), None)
    if service is None:
        known = ", ".join(sorted(s.hook for s in _services().values()))
        raise ApiError(400, f"hook must be one of {known}.", expression=["hook"])
    language = body.get("language") or settings.language
    if language not in SUPPORTED_LANGUAGES:
        raise ApiError(400, "language must be 'nl' or 'en'.", expression=["language"])
    resources = resources_from_bundle(body.get("bundle"), "bundle")
    draft_orders = resources_from_bundle(body.get("draftOrders") or [], "draftOrders")
    selections = body.get("selections")
    if selections is not None and (
        not isinstance(selections, list) or not all(isinstance(s, str) for s in selections)
    ):
        raise ApiError(400, "selections must be a list of 'Type/id' strings.", expression=["selections"])
    hook_request, notes = build_hook_request(
        resources, service=service, draft_orders=draft_orders, selections=selections,
        language=language,
    )
    return jsonify({"serviceId": service.id, "request": hook_request, "notes": notes})


def _services() -> dict[str, CdsService]:
    return current_app.extensions["rpl_services"]


def _scenario_summaries() -> list[dict]:
    from .scenarios import load_scenario, scenario_names

    return [load_scenario(name) for name in scenario_names()]


# --- request building (pure) -----------------------------------------------------------------


def resources_from_bundle(value: object, field: str) -> list[dict]:
    """Resources of a Bundle (any type) or of a JSON list of resources.

    Entries without an id get one from their `urn:uuid:` fullUrl, and references to such
    fullUrls are rewritten to `Type/id`, as a FHIR server does when it stores a transaction.
    """
    if isinstance(value, dict) and value.get("resourceType") == "Bundle":
        entries = [e for e in value.get("entry") or () if isinstance(e, dict)]
    elif isinstance(value, list):
        entries = [{"resource": item} for item in value]
    else:
        raise ApiError(400, f"{field} must be a FHIR Bundle or a list of resources.", expression=[field])
    if len(entries) > SEARCHSET_LIMIT:
        raise ApiError(400, f"{field} holds more than {SEARCHSET_LIMIT} resources.", expression=[field])
    resources: list[dict] = []
    renamed: dict[str, str] = {}
    for index, entry in enumerate(entries):
        resource = entry.get("resource")
        if not isinstance(resource, dict) or not isinstance(resource.get("resourceType"), str):
            raise ApiError(
                400, f"{field} entry {index} has no resource with a resourceType.",
                expression=[f"{field}.entry[{index}]"],
            )
        resource = json.loads(json.dumps(resource))  # a private copy we may rewrite
        full_url = entry.get("fullUrl")
        if not resource.get("id"):
            resource["id"] = _id_from_full_url(full_url) or f"{resource['resourceType'].lower()}-{index + 1}"
        if isinstance(full_url, str) and full_url.startswith("urn:"):
            renamed[full_url] = f"{resource['resourceType']}/{resource['id']}"
        resources.append(resource)
    return [_rewrite_references(r, renamed) for r in resources] if renamed else resources


def _id_from_full_url(full_url: object) -> str | None:
    if not isinstance(full_url, str) or not full_url:
        return None
    tail = full_url.rsplit(":", 1)[-1].rsplit("/", 1)[-1]
    cleaned = "".join(ch for ch in tail if ch.isalnum() or ch in "-.")[:64]
    return cleaned or None


def _rewrite_references(node, renamed: dict[str, str]):
    if isinstance(node, dict):
        return {
            key: (renamed.get(value, value) if key == "reference" and isinstance(value, str)
                  else _rewrite_references(value, renamed))
            for key, value in node.items()
        }
    if isinstance(node, list):
        return [_rewrite_references(item, renamed) for item in node]
    return node


def build_hook_request(
    resources: list[dict],
    *,
    service: CdsService,
    draft_orders: list[dict],
    selections: list[str] | None,
    language: str,
    hook_instance: str | None = None,
) -> tuple[dict, list[str]]:
    """The CDS Hooks request an EHR would send for this patient, and notes on what was left out."""
    patients = [r for r in resources if r["resourceType"] == "Patient"]
    if not patients:
        raise ApiError(400, "The Bundle holds no Patient resource.", expression=["bundle"])
    patient = patients[0]
    practitioner = playground_practitioner(language)
    prefetch, notes = fill_prefetch(resources, service.prefetch, patient, practitioner)
    context: dict = {"userId": PLAYGROUND_USER_ID, "patientId": patient["id"]}
    if service.hook in ("order-select", "order-sign"):
        drafts = [_with_id(order, index) for index, order in enumerate(draft_orders)]
        context["draftOrders"] = {
            "resourceType": "Bundle",
            "type": "collection",
            "entry": [{"resource": order} for order in drafts],
        }
        if service.hook == "order-select":
            present = [f"{o['resourceType']}/{o['id']}" for o in drafts]
            chosen = [s for s in (selections or present) if s in present]
            dropped = sorted(set(selections or ()) - set(present))
            if dropped:
                notes.append("Selections not among the draft orders were left out: " + ", ".join(dropped))
            context["selections"] = chosen
    elif draft_orders:
        notes.append(f"{service.hook} has no draft orders; the pasted orders were not sent.")
    request_body = {
        "hook": service.hook,
        "hookInstance": hook_instance or str(uuid.uuid4()),
        "context": context,
        "prefetch": prefetch,
    }
    if len(patients) > 1:
        notes.append(f"The Bundle holds {len(patients)} Patients; the first ({patient['id']}) is used.")
    return request_body, notes


def _with_id(order: dict, index: int) -> dict:
    if order.get("id"):
        return order
    return {**order, "id": f"draft-{index + 1}"}


def playground_practitioner(language: str) -> dict:
    """The user of the playground: a Practitioner whose communication picks the card language."""
    return {
        "resourceType": "Practitioner",
        "id": PLAYGROUND_USER_ID.split("/", 1)[1],
        "name": [{"text": "Playground user"}],
        "communication": [{"coding": [{"system": BCP47, "code": language}]}],
    }


def fill_prefetch(
    resources: list[dict],
    keys: tuple[PrefetchKey, ...],
    patient: dict,
    practitioner: dict,
) -> tuple[dict, list[str]]:
    """Fulfil each prefetch template from the resources, as the EHR's FHIR server would."""
    patient_refs = {f"Patient/{patient['id']}"}
    prefetch: dict = {}
    used: set[int] = set()
    notes: list[str] = []
    for key in keys:
        if key.is_read:
            if key.read_type == "Patient":
                prefetch[key.key] = patient
                used.add(id(patient))
            elif key.read_type == "Practitioner":
                prefetch[key.key] = practitioner
            continue
        resource_type, query = key.template.split("?", 1)
        codes = _code_filter(query)
        matches = [
            r for r in resources
            if r["resourceType"] == resource_type
            and _belongs_to(r, patient_refs)
            and (codes is None or _has_code(r, codes))
        ]
        used.update(id(r) for r in matches)
        prefetch[key.key] = searchset(matches)
    left_out = sorted({r["resourceType"] for r in resources if id(r) not in used})
    if left_out:
        notes.append(
            "Not sent (no prefetch key asks for them, or another patient / an unlisted code): "
            + ", ".join(left_out)
        )
    return prefetch, notes


def searchset(resources: list[dict]) -> dict:
    return {
        "resourceType": "Bundle",
        "type": "searchset",
        "total": len(resources),
        "entry": [
            {"fullUrl": f"urn:uuid:{uuid.uuid4()}", "resource": r, "search": {"mode": "match"}}
            for r in resources
        ],
    }


def _code_filter(query: str) -> set[tuple[str, str]] | None:
    """The `code=system|code,...` parameter of a search template (None: no code filter)."""
    values = parse_qs(query).get("code")
    if not values:
        return None
    codes = set()
    for item in ",".join(values).split(","):
        system, _, code = item.rpartition("|")
        if code:
            codes.add((system, code))
    return codes or None


def _has_code(resource: dict, codes: set[tuple[str, str]]) -> bool:
    bare = {code for system, code in codes if not system}
    for coding in (resource.get("code") or {}).get("coding") or ():
        if not isinstance(coding, dict):
            continue
        if (coding.get("system"), coding.get("code")) in codes or coding.get("code") in bare:
            return True
    return False


def _belongs_to(resource: dict, patient_refs: set[str]) -> bool:
    """True unless the resource's subject/patient names another patient."""
    for field in ("subject", "patient"):
        reference = resource.get(field)
        if isinstance(reference, dict) and isinstance(reference.get("reference"), str):
            ref = reference["reference"]
            return any(ref == p or ref.endswith("/" + p) for p in patient_refs)
    return True


# --- OpenAPI ---------------------------------------------------------------------------------


def openapi_paths(components: dict) -> dict:
    """The playground's JSON helpers (404 when the playground is switched off)."""
    from .openapi import ERROR_DESCRIPTIONS, error_response

    return {
        "/playground/api/scenarios/{name}": {
            "get": {
                "summary": "Playground: a synthetic scenario with its dates shifted to today",
                "operationId": "playgroundScenario",
                "security": [],
                "parameters": [
                    {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}
                ],
                "responses": {
                    "200": {
                        "description": "The scenario: name, title, referenceDate, bundle, hooks.",
                        "content": {"application/json": {"schema": {"type": "object"}}},
                    },
                    "404": error_response("Unknown scenario, or the playground is off."),
                },
            }
        },
        "/playground/api/hook-request": {
            "post": {
                "summary": "Playground: build the CDS Hooks request an EHR would send for a Bundle",
                "operationId": "playgroundHookRequest",
                "security": [],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "required": ["hook", "bundle"],
                                "properties": {
                                    "hook": {"type": "string", "enum": ["patient-view", "order-select", "order-sign"]},
                                    "bundle": {"type": "object", "description": "FHIR Bundle with a Patient"},
                                    "draftOrders": {"type": ["object", "array"]},
                                    "selections": {"type": "array", "items": {"type": "string"}},
                                    "language": {"type": "string", "enum": ["nl", "en"]},
                                },
                            }
                        }
                    },
                },
                "responses": {
                    "200": {
                        "description": "serviceId, request (a HookRequest) and notes.",
                        "content": {
                            "application/json": {
                                "schema": {
                                    "type": "object",
                                    "properties": {
                                        "serviceId": {"type": "string"},
                                        "request": {"$ref": "#/components/schemas/HookRequest"},
                                        "notes": {"type": "array", "items": {"type": "string"}},
                                    },
                                }
                            }
                        },
                    },
                    "400": error_response("Invalid input; the OperationOutcome names the field."),
                    "404": error_response("The playground is off."),
                    "413": error_response(ERROR_DESCRIPTIONS["413"]),
                    "415": error_response(ERROR_DESCRIPTIONS["415"]),
                },
            }
        },
    }
