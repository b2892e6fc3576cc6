"""Integrator tools: `rpl-cds scenarios list|load` and `rpl-cds call`.

`scenarios load` posts the synthetic patients of service/scenarios (dates rolled to today) as
transaction Bundles to any FHIR R4 server (HAPI, the Node test server) and checks every entry.

`call` behaves as an EHR would: it builds the CDS Hooks request (hookInstance, context), fulfils
the discovery prefetch templates itself from the FHIR server (`--prefetch`, as the CDS Hooks
Sandbox does: a key that cannot be read is left out) or leaves them to the service
(`--no-prefetch`), optionally signs a CDS Hooks JWT with a local private key, and prints the cards.

Neither command prints or logs an access token or a JWT.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import textwrap
import time
import uuid
from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import Path
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo

import requests

from .services import substitute_tokens

DEFAULT_SERVICE = "http://127.0.0.1:8080"
DEFAULT_USER = "Practitioner/rpl-cds-cli"
DEFAULT_TIMEZONE = "Europe/Amsterdam"  # the service's default RPL_CDS_TIMEZONE
HOOKS = ("patient-view", "order-select", "order-sign")
FHIR_JSON = "application/fhir+json"
JWT_LIFETIME_SECONDS = 300
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class CliError(Exception):
    """A problem the user can fix (bad option, unreadable file, unreachable server)."""


# ---------------------------------------------------------------------------------------------
# Scenarios


@dataclass
class LoadResult:
    name: str
    patient_id: str
    resources: int
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures


def scenario_patient_id(scenario: dict) -> str:
    for entry in scenario["bundle"].get("entry", ()):
        resource = entry.get("resource") or {}
        if resource.get("resourceType") == "Patient":
            return resource["id"]
    raise CliError(f"scenario {scenario['name']} has no Patient")


def load_scenario_bundle(
    fhir_server: str, scenario: dict, *, token: str | None = None,
    session: requests.Session | None = None, timeout: float = 30.0,
) -> LoadResult:
    """POST the scenario's transaction Bundle; every entry must answer 2xx."""
    bundle = scenario["bundle"]
    result = LoadResult(scenario["name"], scenario_patient_id(scenario), len(bundle.get("entry", ())))
    http = session or requests.Session()
    try:
        response = http.post(
            fhir_server.rstrip("/"), data=json.dumps(bundle), headers=_fhir_headers(token, body=True),
            timeout=timeout,
        )
    except requests.RequestException as error:
        raise CliError(f"cannot reach the FHIR server {fhir_server}: {type(error).__name__}") from None
    if response.status_code // 100 != 2:
        result.failures.append(f"HTTP {response.status_code}: {_outcome_text(_json_or_none(response))}")
        return result
    reply = _json_or_none(response) or {}
    result.failures.extend(transaction_failures(bundle, reply))
    return result


def transaction_failures(bundle: dict, reply: dict) -> list[str]:
    """One line per entry of a transaction-response that did not succeed (or is missing)."""
    sent = bundle.get("entry") or []
    answered = (reply.get("entry") or []) if reply.get("resourceType") == "Bundle" else []
    failures = []
    if len(answered) != len(sent):
        failures.append(f"the server answered {len(answered)} entries for {len(sent)} sent")
    for index, (request_entry, answer) in enumerate(zip(sent, answered, strict=False)):
        response = answer.get("response") or {}
        status = str(response.get("status", ""))
        if not status.startswith("2"):
            target = (request_entry.get("request") or {}).get("url", f"entry {index}")
            failures.append(f"{target}: status {status or 'missing'} {_outcome_text(response.get('outcome'))}".rstrip())
    return failures


def _scenarios_list(args: argparse.Namespace) -> int:
    from .scenarios import all_scenarios

    scenarios = all_scenarios()
    if args.json:
        rows = [
            {"name": s["name"], "patientId": scenario_patient_id(s), "title": s["title"],
             "hooks": [h["hook"] for h in s.get("hooks", ())]}
            for s in scenarios
        ]
        print(json.dumps(rows, ensure_ascii=False, indent=2))
        return EXIT_OK
    width = max(len(s["name"]) for s in scenarios)
    for s in scenarios:
        hooks = ", ".join(h["hook"] for h in s.get("hooks", ()))
        print(f"{s['name']:<{width}}  {s['title'].get(args.language) or s['name']}  [{hooks}]")
    return EXIT_OK


def _scenarios_load(args: argparse.Namespace) -> int:
    from .scenarios import load_scenario, scenario_names

    names = args.scenario or scenario_names()
    unknown = sorted(set(names) - set(scenario_names()))
    if unknown:
        raise CliError(f"unknown scenario(s): {', '.join(unknown)} (see `rpl-cds scenarios list`)")
    today = _today(args.today)
    session = requests.Session()
    failed = 0
    for name in names:
        result = load_scenario_bundle(
            args.fhir_server, load_scenario(name, today), token=args.token, session=session,
            timeout=args.timeout,
        )
        if result.ok:
            print(f"loaded {name}: Patient/{result.patient_id} ({result.resources} resources)")
        else:
            failed += 1
            print(f"FAILED {name}: Patient/{result.patient_id}", file=sys.stderr)
            for line in result.failures:
                print(f"  {line}", file=sys.stderr)
    print(f"{len(names) - failed} of {len(names)} scenarios loaded into {args.fhir_server} "
          f"(dates as of {today.isoformat()})", file=sys.stderr)
    return EXIT_OK if failed == 0 else EXIT_FAILED


# ---------------------------------------------------------------------------------------------
# Building a CDS Hooks request as an EHR would


def hook_context(
    hook: str, patient_id: str, *, user_id: str = DEFAULT_USER, encounter_id: str | None = None,
    draft_orders: list[dict] | None = None, selections: list[str] | None = None,
) -> dict:
    context: dict = {"userId": user_id, "patientId": patient_id}
    if encounter_id:
        context["encounterId"] = encounter_id
    if hook in ("order-select", "order-sign"):
        orders = draft_orders or []
        context["draftOrders"] = {
            "resourceType": "Bundle", "type": "collection",
            "entry": [{"resource": order} for order in orders],
        }
        if hook == "order-select":
            context["selections"] = list(selections) if selections else [
                f"{o['resourceType']}/{o['id']}" for o in orders[:1]
            ]
    return context


def fill_template(template: str, context: dict) -> str | None:
    """A prefetch template with its CDS Hooks 2.0 tokens filled in; None when a token has no value.
    The same substitution the service applies to the keys it fetches itself."""
    return substitute_tokens(template, context)


def fulfil_prefetch(
    templates: dict[str, str], context: dict, fhir_server: str, *, token: str | None = None,
    session: requests.Session | None = None, timeout: float = 10.0,
) -> tuple[dict, dict[str, str]]:
    """Query the FHIR server for every template, as the CDS Hooks Sandbox does.

    A read that finds nothing (404/410) is `null` (no data); a key that fails otherwise is
    omitted and named in the second return value. A search's first page is passed on as it is,
    `next` link included (the service completes it from `fhirServer`).
    """
    http = session or requests.Session()
    base = fhir_server.rstrip("/") + "/"
    prefetch: dict = {}
    omitted: dict[str, str] = {}
    for key, template in templates.items():
        query = fill_template(template, context)
        if query is None:
            omitted[key] = "its template needs a token this request has no value for"
            continue
        is_read = "?" not in query
        try:
            response = http.get(base + query.lstrip("/"), headers=_fhir_headers(token), timeout=timeout)
        except requests.RequestException as error:
            omitted[key] = f"request failed ({type(error).__name__})"
            continue
        if is_read and response.status_code in (404, 410):
            prefetch[key] = None
            continue
        body = _json_or_none(response)
        if response.status_code // 100 != 2 or not isinstance(body, dict) or "resourceType" not in body:
            omitted[key] = f"HTTP {response.status_code}"
            continue
        prefetch[key] = body
    return prefetch, omitted


def build_hook_request(
    hook: str, context: dict, *, prefetch: dict | None = None, fhir_server: str | None = None,
    token: str | None = None,
) -> dict:
    body: dict = {"hookInstance": str(uuid.uuid4()), "hook": hook, "context": context}
    if fhir_server:
        body["fhirServer"] = fhir_server
        if token:
            body["fhirAuthorization"] = {
                "access_token": token, "token_type": "Bearer", "expires_in": 300,
                "scope": "user/*.read", "subject": "rpl-cds",
            }
    if prefetch is not None:
        body["prefetch"] = prefetch
    return body


# ---------------------------------------------------------------------------------------------
# Signing the CDS Hooks JWT


@dataclass(frozen=True)
class Signer:
    """A local private key that signs one fresh JWT per request (CDS Hooks 2.0 'Trusting CDS Clients')."""

    private_key: object
    algorithm: str
    issuer: str
    kid: str
    jku: str | None = None

    def token(self, audience: str, now: float | None = None) -> str:
        import jwt

        issued = int(now if now is not None else time.time())
        claims = {"iss": self.issuer, "aud": audience, "exp": issued + JWT_LIFETIME_SECONDS,
                  "iat": issued, "jti": str(uuid.uuid4())}
        headers = {"typ": "JWT", "kid": self.kid}
        if self.jku:
            headers["jku"] = self.jku
        return jwt.encode(claims, self.private_key, algorithm=self.algorithm, headers=headers)

    def __repr__(self) -> str:  # never show key material in a traceback
        return f"Signer(algorithm={self.algorithm!r}, issuer={self.issuer!r}, kid={self.kid!r})"


def load_signer(pem_path: str, issuer: str, kid: str, jku: str | None = None) -> Signer:
    """ES384 for a P-384 key (ES256 for P-256), RS384 for an RSA key of 2048 bits or more."""
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    try:
        key = load_pem_private_key(Path(pem_path).read_bytes(), password=None)
    except OSError as error:
        raise CliError(f"cannot read the signing key {pem_path}: {error.strerror}") from None
    except (ValueError, TypeError) as error:
        raise CliError(f"{pem_path} is not an unencrypted PEM private key ({error})") from None
    if isinstance(key, ec.EllipticCurvePrivateKey):
        algorithm = {"secp384r1": "ES384", "secp256r1": "ES256"}.get(key.curve.name)
        if algorithm is None:
            raise CliError(f"EC curve {key.curve.name} is not used by CDS Hooks clients (P-384 or P-256)")
    elif isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < 2048:
            raise CliError(f"RSA key of {key.key_size} bits: at least 2048 are needed")
        algorithm = "RS384"
    else:
        raise CliError("the signing key must be an EC (P-384/P-256) or RSA private key")
    return Signer(key, algorithm, issuer, kid, jku)


# ---------------------------------------------------------------------------------------------
# Talking to the CDS service


def service_base(url: str) -> str:
    """`http://host:8080`, `.../cds-services` or `.../cds-services/<id>` -> the base URL."""
    base = url.rstrip("/")
    base = re.sub(r"/cds-services(/[^/]*)?$", "", base)
    parts = urlsplit(base)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise CliError(f"--service {url!r} is not an absolute http(s) URL")
    return base


def discover(base: str, *, signer: Signer | None, session: requests.Session, timeout: float) -> list[dict]:
    url = f"{base}/cds-services"
    try:
        response = session.get(url, headers=_auth_headers(signer, url), timeout=timeout)
    except requests.RequestException as error:
        raise CliError(f"cannot reach the CDS service at {url}: {type(error).__name__}") from None
    body = _json_or_none(response)
    if response.status_code != 200 or not isinstance(body, dict):
        raise ServiceAnswer(url, response.status_code, body)
    return body.get("services") or []


def service_for_hook(services: list[dict], hook: str, service_id: str | None = None) -> dict:
    for service in services:
        if (service_id and service.get("id") == service_id) or (not service_id and service.get("hook") == hook):
            return service
    wanted = f"id {service_id!r}" if service_id else f"hook {hook!r}"
    offered = ", ".join(f"{s.get('id')} ({s.get('hook')})" for s in services) or "none"
    raise CliError(f"the CDS service offers no service with {wanted}; it offers: {offered}")


class ServiceAnswer(Exception):
    """The CDS service answered with a non-2xx status."""

    def __init__(self, url: str, status: int, body: object):
        super().__init__(f"HTTP {status} from {url}")
        self.url, self.status, self.body = url, status, body


def post_hook(
    url: str, body: dict, *, signer: Signer | None, session: requests.Session, timeout: float,
) -> dict:
    try:
        response = session.post(
            url, data=json.dumps(body), timeout=timeout,
            headers={"Content-Type": "application/json", "Accept": "application/json",
                     **_auth_headers(signer, url)},
        )
    except requests.RequestException as error:
        raise CliError(f"cannot reach the CDS service at {url}: {type(error).__name__}") from None
    answer = _json_or_none(response)
    if response.status_code // 100 != 2 or not isinstance(answer, dict):
        raise ServiceAnswer(url, response.status_code, answer)
    return answer


# ---------------------------------------------------------------------------------------------
# Printing


def render_cards(answer: dict, service_id: str = "") -> str:
    cards = answer.get("cards") or []
    lines = [f"{len(cards)} card{'s' if len(cards) != 1 else ''}" + (f" from {service_id}" if service_id else "")]
    for number, card in enumerate(cards, 1):
        source = card.get("source") or {}
        topic = (source.get("topic") or {}).get("code", "")
        lines.append("")
        lines.append(f"[{number}] {str(card.get('indicator', '')).upper()}: {card.get('summary', '')}")
        lines.append(f"    rule: {topic}    source: {source.get('label', '')}")
        if card.get("detail"):
            lines.append("    detail:")
            lines.extend(_indented(card["detail"], 6))
        for suggestion in card.get("suggestions") or ():
            marker = " (recommended)" if suggestion.get("isRecommended") else ""
            lines.append(f"    suggestion: {suggestion.get('label', '')}{marker}")
            for action in suggestion.get("actions") or ():
                target = _action_target(action)
                lines.append(f"      - {action.get('type', '')} {target}: {action.get('description', '')}".rstrip(": "))
        for link in card.get("links") or ():
            lines.append(f"    link ({link.get('type', '')}): {link.get('label', '')} <{link.get('url', '')}>")
        reasons = card.get("overrideReasons") or []
        if reasons:
            shown = "; ".join(f"{r.get('display') or r.get('code')} [{r.get('code')}]" for r in reasons)
            lines.append(f"    override reasons: {shown}")
    for action in answer.get("systemActions") or ():
        lines.append(f"system action: {action.get('type', '')} {_action_target(action)}")
    return "\n".join(lines) + "\n"


def render_outcome(error: ServiceAnswer) -> str:
    lines = [f"The CDS service answered HTTP {error.status} ({error.url})."]
    body = error.body
    if isinstance(body, dict) and body.get("resourceType") == "OperationOutcome":
        for issue in body.get("issue") or ():
            details = (issue.get("details") or {}).get("text") or ""
            lines.append(f"  {issue.get('severity', '')} {issue.get('code', '')}: {details}".rstrip())
            if issue.get("diagnostics"):
                lines.append(f"    {issue['diagnostics']}")
            if issue.get("expression"):
                lines.append(f"    at {', '.join(issue['expression'])}")
    elif body is not None:
        lines.append(json.dumps(body, ensure_ascii=False)[:2000])
    return "\n".join(lines) + "\n"


def _action_target(action: dict) -> str:
    resource = action.get("resource")
    if isinstance(resource, dict):
        return f"{resource.get('resourceType', '')}/{resource.get('id', '')}".rstrip("/")
    if action.get("resourceId"):
        ids = action["resourceId"]
        return ", ".join(ids) if isinstance(ids, list) else str(ids)
    return ""


def _indented(text: str, spaces: int) -> list[str]:
    pad = " " * spaces
    out = []
    for line in str(text).splitlines() or [""]:
        wrapped = textwrap.wrap(line, width=100 - spaces) or [""]
        out.extend(pad + part for part in wrapped)
    return out


# ---------------------------------------------------------------------------------------------
# `rpl-cds call`


def _call(args: argparse.Namespace) -> int:
    if args.sign_key and not (args.issuer and args.kid):
        raise CliError("--sign-key needs --issuer and --kid")
    signer = load_signer(args.sign_key, args.issuer, args.kid, args.jku) if args.sign_key else None
    draft_orders, selections, patient_id = _orders_and_patient(args)
    if args.hook == "patient-view" and (draft_orders or selections):
        raise CliError("patient-view takes no draft orders or selections")
    base = service_base(args.service)
    session = requests.Session()
    services = discover(base, signer=signer, session=session, timeout=args.timeout)
    service = service_for_hook(services, args.hook, args.service_id)
    context = hook_context(
        args.hook, patient_id, user_id=args.user, encounter_id=args.encounter,
        draft_orders=draft_orders, selections=selections,
    )
    prefetch = None
    if args.prefetch:
        prefetch, omitted = fulfil_prefetch(
            service.get("prefetch") or {}, context, args.fhir_server, token=args.token,
            session=session, timeout=args.timeout,
        )
        for key, reason in omitted.items():
            print(f"rpl-cds call: prefetch key {key} omitted: {reason}", file=sys.stderr)
    body = build_hook_request(
        args.hook, context, prefetch=prefetch, fhir_server=args.service_fhir_server or args.fhir_server,
        token=args.token,
    )
    url = f"{base}/cds-services/{service['id']}"
    answer = post_hook(url, body, signer=signer, session=session, timeout=args.timeout)
    if args.json:
        print(json.dumps(answer, ensure_ascii=False, indent=2))
    else:
        sys.stdout.write(render_cards(answer, service["id"]))
    return EXIT_OK


def _orders_and_patient(args: argparse.Namespace) -> tuple[list[dict], list[str], str]:
    draft_orders: list[dict] = []
    selections: list[str] = list(args.selections or [])
    patient_id = args.patient
    if args.scenario:
        from .scenarios import load_scenario, scenario_names

        if args.scenario not in scenario_names():
            raise CliError(f"unknown scenario {args.scenario!r} (see `rpl-cds scenarios list`)")
        scenario = load_scenario(args.scenario, _today(args.today))
        patient_id = patient_id or scenario_patient_id(scenario)
        entries = [h for h in scenario.get("hooks", ()) if h["hook"] == args.hook]
        if args.hook != "patient-view":
            if not entries:
                raise CliError(f"scenario {args.scenario} has no {args.hook} entry")
            if not 1 <= args.entry <= len(entries):
                raise CliError(f"scenario {args.scenario} has {len(entries)} {args.hook} entries; --entry {args.entry}")
            entry = entries[args.entry - 1]
            draft_orders = entry.get("draftOrders") or []
            selections = selections or list(entry.get("selections") or [])
    if args.draft_orders:
        draft_orders = read_draft_orders(args.draft_orders)
    if not patient_id:
        raise CliError("--patient is required (or --scenario NAME)")
    if args.hook in ("order-select", "order-sign") and not draft_orders:
        raise CliError(f"{args.hook} needs draft orders: --draft-orders FILE or --scenario NAME")
    return draft_orders, selections, patient_id


def read_draft_orders(path: str) -> list[dict]:
    """A JSON file with a Bundle, a list of resources, or one resource."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as error:
        raise CliError(f"cannot read {path}: {error.strerror}") from None
    except ValueError as error:
        raise CliError(f"{path} is not JSON: {error}") from None
    if isinstance(data, dict) and data.get("resourceType") == "Bundle":
        data = [e.get("resource") for e in data.get("entry") or ()]
    elif isinstance(data, dict):
        data = [data]
    if not isinstance(data, list) or not all(
        isinstance(r, dict) and r.get("resourceType") and r.get("id") for r in data
    ):
        raise CliError(f"{path}: expected a Bundle or a list of resources, each with resourceType and id")
    return data


# ---------------------------------------------------------------------------------------------
# Small helpers


def _fhir_headers(token: str | None, body: bool = False) -> dict[str, str]:
    headers = {"Accept": FHIR_JSON}
    if body:
        headers["Content-Type"] = FHIR_JSON
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return headers


def _auth_headers(signer: Signer | None, url: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {signer.token(url)}"} if signer else {}


def _json_or_none(response: requests.Response) -> object:
    try:
        return response.json()
    except ValueError:
        return None


def _outcome_text(outcome: object) -> str:
    if not isinstance(outcome, dict):
        return ""
    texts = []
    for issue in outcome.get("issue") or ():
        text = issue.get("diagnostics") or (issue.get("details") or {}).get("text") or issue.get("code")
        if text:
            texts.append(str(text))
    return "; ".join(texts)[:500]


def _today(value: str | None) -> date:
    if value:
        try:
            return date.fromisoformat(value)
        except ValueError:
            raise CliError(f"--today {value!r} is not a date (YYYY-MM-DD)") from None
    return datetime.now(ZoneInfo(DEFAULT_TIMEZONE)).date()


def _guarded(handler):
    def run(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except CliError as error:
            print(f"rpl-cds {args.command}: {error}", file=sys.stderr)
            return EXIT_USAGE
        except ServiceAnswer as error:
            sys.stderr.write(render_outcome(error))
            return EXIT_FAILED
        except BrokenPipeError:  # `rpl-cds scenarios list | head`: the reader left, not an error
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - keeps the interpreter's final flush quiet
            return EXIT_OK

    return run


# ---------------------------------------------------------------------------------------------
# Registration (service/cli.py calls `register`)


def register(subparsers: argparse._SubParsersAction) -> None:
    scenarios = subparsers.add_parser("scenarios", help="list the synthetic patients or load them into a FHIR server")
    scenario_commands = scenarios.add_subparsers(dest="scenarios_command", required=True)

    listing = scenario_commands.add_parser("list", help="list the scenarios")
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")
    listing.add_argument("--language", choices=("nl", "en"), default="en")
    listing.set_defaults(handler=_guarded(_scenarios_list))

    load = scenario_commands.add_parser(
        "load", help="POST the scenarios (dates rolled to today) as transaction Bundles to a FHIR server"
    )
    load.add_argument("--fhir-server", required=True, metavar="URL", help="FHIR R4 base URL, e.g. http://localhost:8090/fhir")
    load.add_argument("--token", help="bearer access token for the FHIR server (never printed)")
    load.add_argument("--scenario", action="append", metavar="NAME", help="load only this scenario (repeatable)")
    load.add_argument("--today", metavar="YYYY-MM-DD", help="roll the dates to this day instead of today")
    load.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS")
    load.set_defaults(handler=_guarded(_scenarios_load))

    call = subparsers.add_parser("call", help="call the CDS service as an EHR would and print the cards")
    call.add_argument("--hook", required=True, choices=HOOKS)
    call.add_argument("--fhir-server", required=True, metavar="URL", help="the EHR's FHIR R4 base URL (sent as fhirServer)")
    call.add_argument("--service-fhir-server", metavar="URL",
                      help="fhirServer to send when the service reaches the FHIR server under another URL "
                           "than this tool (docker compose: http://hapi:8080/fhir)")
    call.add_argument("--patient", metavar="ID", help="context.patientId (default with --scenario: its patient)")
    call.add_argument("--scenario", metavar="NAME", help="take draft orders and selections from this scenario's hook entry")
    call.add_argument("--entry", type=int, default=1, metavar="N", help="with --scenario: the N-th entry of this hook (default 1)")
    call.add_argument("--draft-orders", metavar="FILE", help="JSON file: a Bundle or a list of draft order resources")
    call.add_argument("--selections", nargs="+", metavar="REF", help="order-select: Type/id of the selected orders")
    mode = call.add_mutually_exclusive_group()
    mode.add_argument("--prefetch", dest="prefetch", action="store_true", default=True,
                      help="fulfil the discovery prefetch templates from the FHIR server (default)")
    mode.add_argument("--no-prefetch", dest="prefetch", action="store_false",
                      help="send no prefetch: the service queries the FHIR server itself")
    call.add_argument("--service", default=DEFAULT_SERVICE, metavar="URL", help=f"CDS service base URL (default {DEFAULT_SERVICE})")
    call.add_argument("--service-id", metavar="ID", help="call this service id instead of the one found for --hook")
    call.add_argument("--user", default=DEFAULT_USER, metavar="REF", help=f"context.userId (default {DEFAULT_USER})")
    call.add_argument("--encounter", metavar="ID", help="context.encounterId")
    call.add_argument("--json", action="store_true", help="print the service's JSON answer")
    call.add_argument("--token", help="FHIR access token: sent as fhirAuthorization and used for prefetch (never printed)")
    call.add_argument("--sign-key", metavar="PEM", help="sign a CDS Hooks JWT with this private key (EC: ES384, RSA: RS384)")
    call.add_argument("--issuer", metavar="ISS", help="JWT iss (the trusted client's iss at the service)")
    call.add_argument("--kid", metavar="KID", help="JWT header kid (the key's id in the client's JWK Set)")
    call.add_argument("--jku", metavar="URL", help="JWT header jku (optional; must equal the registered one)")
    call.add_argument("--today", metavar="YYYY-MM-DD", help="with --scenario: roll its dates to this day")
    call.add_argument("--timeout", type=float, default=10.0, metavar="SECONDS")
    call.set_defaults(handler=_guarded(_call))
