"""Data gathering: prefetch semantics of CDS Hooks 2.0, then the FHIR server for what is missing.

For each prefetch key of the service (cds-hooks.md section 3.4):
- a key with data is used (a searchset Bundle with a `next` link is completed from the FHIR server);
- `null` means "no data" and is never re-queried;
- an OperationOutcome, or a Bundle holding an error OperationOutcome, counts as missing;
- a missing key is fetched from `fhirServer` (allowlisted only) with the client's access token,
  all missing keys in parallel under one deadline;
- a required key that still cannot be had gives 412 with an OperationOutcome naming the keys.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from . import fhir_client
from .config import is_loopback_host
from .errors import ApiError
from .services import CdsService, PrefetchKey, substitute_tokens


@dataclass
class GatheredData:
    by_key: dict[str, list[dict]] = field(default_factory=dict)
    fetched_keys: list[str] = field(default_factory=list)  # keys that needed the FHIR server
    fetch_ms: float = 0.0


@dataclass(frozen=True)
class FhirAccess:
    """Where and how the service may query the client's FHIR server for missing keys."""

    base_url: str | None
    access_token: str | None
    allowed: bool
    refusal: str | None = None  # why `allowed` is False (for the 412 message and the log)


def decide_fhir_access(body: dict, allowlist: tuple[str, ...], allow_loopback: bool) -> FhirAccess:
    base_url = body.get("fhirServer")
    auth = body.get("fhirAuthorization") or {}
    token = auth.get("access_token")
    if not base_url:
        return FhirAccess(None, None, False, "the request names no fhirServer")
    try:
        urlsplit(base_url).port  # parses the host (IPv6 brackets) and the port
    except ValueError:
        raise ApiError(400, "fhirServer is not a valid URL", expression=["fhirServer"]) from None
    if fhir_server_allowed(base_url, allowlist, allow_loopback):
        return FhirAccess(base_url, token, True)
    # Never call, and never hand the token to, a server that is not on the allowlist.
    return FhirAccess(base_url, None, False, "its fhirServer is not on this service's allowlist")


def fhir_server_allowed(base_url: str, allowlist: tuple[str, ...], allow_loopback: bool) -> bool:
    normalized = base_url.rstrip("/")
    for allowed in allowlist:
        if normalized == allowed or normalized.startswith(allowed + "/"):
            return True
    return allow_loopback and is_loopback_host(urlsplit(normalized).hostname)


def gather(
    body: dict,
    service: CdsService,
    access: FhirAccess,
    *,
    deadline: float,
    max_pages: int,
) -> GatheredData:
    prefetch = body.get("prefetch") or {}
    context = body["context"]
    gathered = GatheredData()
    to_fetch: dict[str, str] = {}
    unbuildable: list[PrefetchKey] = []
    problems: dict[str, str] = {}
    started = time.monotonic()

    for key in service.prefetch:
        if key.key in prefetch:
            value = prefetch[key.key]
            if value is None:
                gathered.by_key[key.key] = []
                continue
            usable, reason = check_prefetch_value(key, value)
            if usable:
                if _has_next_link(value):
                    completed = _complete_pages(value, access, deadline, max_pages)
                    if completed is not None:
                        gathered.by_key[key.key] = completed
                        continue
                    reason = "it holds only the first page of results and the rest could not be read"
                else:
                    gathered.by_key[key.key] = resources_of(value)
                    continue
            problems[key.key] = f"prefetch.{key.key} {reason}"
        query = substitute_tokens(key.template, context)
        if query is None:
            unbuildable.append(key)
            continue
        to_fetch[key.key] = query

    if to_fetch and access.allowed:
        outcomes = fhir_client.fetch_queries(
            access.base_url, to_fetch, access_token=access.access_token,
            deadline=deadline, max_pages=max_pages,
        )
        for name, outcome in outcomes.items():
            if outcome.ok:
                gathered.by_key[name] = resources_of(outcome.data) if outcome.data else []
                gathered.fetched_keys.append(name)
            else:
                problems[name] = f"fetching {name} from the FHIR server failed: {outcome.error}"
    elif to_fetch:
        for name in to_fetch:
            before = problems.get(name, f"{name} was not prefetched")
            problems[name] = f"{before}, and the service cannot query the FHIR server: {access.refusal}"

    missing_required = [
        key for key in service.prefetch if key.required and key.key not in gathered.by_key
    ]
    if missing_required:
        raise _precondition_failed(missing_required, problems, unbuildable)
    gathered.fetch_ms = (time.monotonic() - started) * 1000
    return gathered


def check_prefetch_value(key: PrefetchKey, value: object) -> tuple[bool, str]:
    """Is a prefetched value usable data? (False, reason) for errors; 400 for a wrong shape."""
    if not isinstance(value, dict) or not isinstance(value.get("resourceType"), str):
        raise ApiError(
            400, f"prefetch.{key.key}: expected a FHIR resource or null",
            expression=[f"prefetch.{key.key}"],
        )
    resource_type = value["resourceType"]
    if resource_type == "OperationOutcome":
        return False, "is an OperationOutcome (the client could not prefetch it)"
    if key.is_read:
        if resource_type != key.read_type:
            raise ApiError(
                400,
                f"prefetch.{key.key}: expected a {key.read_type} resource, got {resource_type[:64]}",
                expression=[f"prefetch.{key.key}"],
            )
        return True, ""
    if resource_type != "Bundle":
        raise ApiError(
            400, f"prefetch.{key.key}: expected a searchset Bundle, got {resource_type[:64]}",
            expression=[f"prefetch.{key.key}"],
        )
    # `link` too: an unreadable one would hide a `next` page, and part of a search read as all.
    for member in ("entry", "link"):
        if value.get(member) is not None and not isinstance(value[member], list):
            raise ApiError(
                400, f"prefetch.{key.key}.{member}: expected an array",
                expression=[f"prefetch.{key.key}"],
            )
    if fhir_client.error_outcome_in(value) is not None:
        return False, "holds an OperationOutcome with an error (incomplete search)"
    return True, ""


def resources_of(value: dict) -> list[dict]:
    """A read result is one resource; a search result is its entries' resources (outcomes skipped)."""
    if value.get("resourceType") != "Bundle":
        return [value]
    found = []
    for entry in value.get("entry") or ():
        resource = entry.get("resource") if isinstance(entry, dict) else None
        if isinstance(resource, dict) and resource.get("resourceType") != "OperationOutcome":
            found.append(resource)
    return found


def _has_next_link(value: dict) -> bool:
    return value.get("resourceType") == "Bundle" and bool(fhir_client.link(value, "next"))


def _complete_pages(
    bundle: dict, access: FhirAccess, deadline: float, max_pages: int
) -> list[dict] | None:
    if not access.allowed:
        return None
    outcome = fhir_client.complete_paged_bundle(
        bundle, base_url=access.base_url, access_token=access.access_token,
        deadline=deadline, max_pages=max_pages,
    )
    if not outcome.ok or outcome.data is None:
        return None
    return resources_of(outcome.data)


def _precondition_failed(
    missing: list[PrefetchKey], problems: dict[str, str], unbuildable: list[PrefetchKey]
) -> ApiError:
    names = [key.key for key in missing]
    issues = []
    for key in missing:
        if key in unbuildable:
            reason = f"{key.key} was not prefetched and its template cannot be filled from the context"
        else:
            reason = problems.get(key.key, f"{key.key} was not prefetched")
        issues.append(
            {
                "severity": "error",
                "code": "processing",
                "details": {"text": f"Required data '{key.key}' is unavailable."},
                "diagnostics": reason,
                "expression": [f"prefetch.{key.key}"],
            }
        )
    message = "Required FHIR data could not be obtained: " + ", ".join(names)
    return ApiError(412, message, issues=issues)
