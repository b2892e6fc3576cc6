"""Outbound FHIR access: the service's own reads and searches for prefetch keys the client left out.

All queries of one hook call run in parallel on a bounded, process-wide thread pool under ONE
absolute deadline (a `time.monotonic()` value). The caller gets an answer for every key by the
deadline at the latest; a query still running then is reported as timed out.

Safety rules kept here (cds-hooks.md sections 3.4, 3.5):
- the access token goes only to the FHIR server's own origin: `next` links elsewhere are not followed;
  redirects are never followed; cookies are never kept between requests;
- errors and log lines name the prefetch key, the HTTP status and the elapsed time, never the token,
  the URL or anything from the response body (URLs carry patient ids);
- every body is read in streaming mode under a size cap and must be a JSON FHIR resource;
- an OperationOutcome or a non-2xx status is an error; 404/410 on a read means "no such resource" (None).
"""

from __future__ import annotations

import logging
import os
import threading
import time
import urllib.request
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import certifi
import urllib3
import urllib3.exceptions

from .json_codec import DecodeError, decode_json

logger = logging.getLogger(__name__)

DEFAULT_MAX_PAGES = 20
DEFAULT_MAX_BODY_BYTES = 20 * 1024 * 1024
MAX_PARALLEL_QUERIES = 16  # per process; a hook call needs about 8 (one per missing prefetch key)
_READ_CHUNK_BYTES = 64 * 1024
_ACCEPT = "application/fhir+json"
_USER_AGENT = "rpl-cds-fhir-client"
_NO_DATA_ON_READ = (404, 410)  # a read of a resource that does not exist (any more) is "no data"


@dataclass(frozen=True)
class FetchOutcome:
    key: str
    ok: bool
    data: dict | None  # the resource or a merged searchset Bundle (all pages' entries); None = no data
    error: str | None  # short, human-readable, never containing the token
    status: int | None
    elapsed_ms: float


class _FetchError(Exception):
    """A failed query; the message is safe to show and to log (no token, no URL, no body)."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


# --- process-wide connections and thread pool (re-created after a fork, e.g. gunicorn --preload) ---


class FhirConnections:
    """Keep-alive connection pools to FHIR servers (urllib3).

    urllib3 directly rather than `requests`: a hook's eight parallel queries cost 6.3 ms of CPU in
    the worker through `requests` and 3.0 ms through urllib3 (wall 10.0 -> 7.2 ms against the Node
    test server; bench/README.md). What `requests` did for us is kept explicit here:
    - no cookies are ever stored or sent (urllib3 has no cookie jar): a cookie set by one EHR's
      server must never ride along on another hook call;
    - no credentials from ~/.netrc; redirects and retries are never followed;
    - TLS certificates are verified against REQUESTS_CA_BUNDLE or SSL_CERT_FILE when set, else
      certifi's bundle (as `requests` did);
    - HTTP(S)_PROXY and NO_PROXY from the environment are honoured (read once per process).
    """

    def __init__(self, pool_size: int = MAX_PARALLEL_QUERIES) -> None:
        self._options = {
            "num_pools": 8, "maxsize": pool_size, "retries": False, "ca_certs": _ca_bundle(),
        }
        self._direct = urllib3.PoolManager(**self._options)
        self._proxies = urllib.request.getproxies_environment()
        self._proxied: dict[str, urllib3.ProxyManager] = {}
        self._lock = threading.Lock()

    def _manager_for(self, url: str) -> urllib3.PoolManager:
        parts = urlsplit(url)
        proxy = self._proxies.get(parts.scheme)
        if not proxy or urllib.request.proxy_bypass_environment(parts.hostname or "", self._proxies):
            return self._direct
        with self._lock:
            manager = self._proxied.get(proxy)
            if manager is None:
                manager = self._proxied[proxy] = urllib3.ProxyManager(proxy, **self._options)
            return manager

    def get(self, url: str, headers: dict[str, str], timeout: float) -> urllib3.BaseHTTPResponse:
        return self._manager_for(url).request(
            "GET", url, headers=headers, timeout=urllib3.Timeout(connect=timeout, read=timeout),
            redirect=False, retries=False, preload_content=False,
        )

    def clear(self) -> None:
        self._direct.clear()
        with self._lock:
            for manager in self._proxied.values():
                manager.clear()

    def __enter__(self) -> FhirConnections:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.clear()


def _ca_bundle() -> str | None:
    configured = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("SSL_CERT_FILE")
    if configured:
        return configured
    return certifi.where()


_lock = threading.Lock()
_shared: dict[str, object] = {}


def shared_session() -> FhirConnections:
    """One set of pools per process: connections to the FHIR server are reused across calls."""
    with _lock:
        if _shared.get("pid") != os.getpid():
            _shared.clear()
            _shared["pid"] = os.getpid()
        if "session" not in _shared:
            _shared["session"] = FhirConnections()
        return _shared["session"]  # type: ignore[return-value]


def _executor() -> ThreadPoolExecutor:
    with _lock:
        if _shared.get("pid") != os.getpid():
            _shared.clear()
            _shared["pid"] = os.getpid()
        if "executor" not in _shared:
            _shared["executor"] = ThreadPoolExecutor(
                max_workers=MAX_PARALLEL_QUERIES, thread_name_prefix="fhir-fetch"
            )
        return _shared["executor"]  # type: ignore[return-value]


# --- public API ---


def fetch_queries(
    base_url: str,
    queries: dict[str, str],
    *,
    access_token: str | None,
    deadline: float,
    max_pages: int = DEFAULT_MAX_PAGES,
    session: FhirConnections | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
) -> dict[str, FetchOutcome]:
    """Run every query (relative URL, tokens already filled in) against `base_url` in parallel.

    Returns one outcome per key by `deadline` at the latest. Searches come back as one searchset
    Bundle holding the entries of all pages.
    """
    started = time.monotonic()
    try:
        client = _Client(base_url, access_token, deadline, max_pages, session, max_body_bytes)
    except ValueError as error:
        return {key: _failure(key, str(error), None, started) for key in queries}
    jobs = {key: (lambda query=query: client.run_query(query)) for key, query in queries.items()}
    return _run_all(jobs, deadline, started)


def complete_paged_bundle(
    bundle: dict,
    *,
    base_url: str | None,
    access_token: str | None,
    deadline: float,
    max_pages: int = DEFAULT_MAX_PAGES,
    session: FhirConnections | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    key: str = "prefetch",
) -> FetchOutcome:
    """Fetch the remaining pages of a prefetched searchset Bundle that has a `next` link, and merge.

    `max_pages` counts the prefetched page too. Without a FHIR base URL no link is followed:
    the origin of a client-supplied `next` link can only be trusted when it is the FHIR server's.
    """
    started = time.monotonic()
    if not base_url:
        return _failure(key, "no FHIR server is known to fetch the remaining pages from", None, started)
    try:
        client = _Client(base_url, access_token, deadline, max_pages, session, max_body_bytes)
    except ValueError as error:
        return _failure(key, str(error), None, started)
    return _run_all({key: lambda: client.complete(bundle)}, deadline, started)[key]


# --- running jobs under the deadline ---


def _run_all(jobs: dict, deadline: float, started: float) -> dict[str, FetchOutcome]:
    outcomes: dict[str, FetchOutcome] = {}
    futures: dict[Future, str] = {}
    if time.monotonic() < deadline:
        pool = _executor()
        futures = {pool.submit(job): key for key, job in jobs.items()}
    pending = set(futures)
    while pending:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        done, pending = wait(pending, timeout=remaining, return_when=FIRST_COMPLETED)
        for future in done:
            key = futures[future]
            outcomes[key] = _outcome_of(key, future, started)
    for future in pending:
        future.cancel()  # not started yet: never starts; running: it stops at its own deadline check
        key = futures[future]
        outcomes[key] = _failure(key, "timed out (deadline reached)", None, started)
    for key in jobs.keys() - outcomes.keys():
        outcomes[key] = _failure(key, "timed out (no time left)", None, started)
    for outcome in outcomes.values():
        _log(outcome)
    return {key: outcomes[key] for key in jobs}


def _outcome_of(key: str, future: Future, started: float) -> FetchOutcome:
    elapsed = (time.monotonic() - started) * 1000
    try:
        data, status = future.result()
    except _FetchError as error:
        return FetchOutcome(key, False, None, str(error), error.status, elapsed)
    except Exception as error:  # noqa: BLE001 - a bug must not take the hook call down
        return FetchOutcome(key, False, None, f"internal error ({type(error).__name__})", None, elapsed)
    return FetchOutcome(key, True, data, None, status, elapsed)


def _failure(key: str, message: str, status: int | None, started: float) -> FetchOutcome:
    return FetchOutcome(key, False, None, message, status, (time.monotonic() - started) * 1000)


def _log(outcome: FetchOutcome) -> None:
    if outcome.ok:
        logger.info(
            "fhir fetch key=%s status=%s elapsed_ms=%.1f", outcome.key, outcome.status, outcome.elapsed_ms
        )
    else:
        logger.warning(
            "fhir fetch failed key=%s status=%s elapsed_ms=%.1f error=%s",
            outcome.key, outcome.status, outcome.elapsed_ms, outcome.error,
        )


# --- one query: request, checks, paging ---


class _Client:
    def __init__(self, base_url, access_token, deadline, max_pages, session, max_body_bytes):
        parts = urlsplit(base_url or "")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("base_url must be an absolute http(s) URL")
        self.base = base_url.rstrip("/") + "/"
        self.origin = _origin(self.base)
        self.auth = _BearerAuth(access_token)
        self.deadline = deadline
        self.max_pages = max(1, max_pages)
        self.session = session or shared_session()
        self.max_body_bytes = max_body_bytes

    def run_query(self, query: str) -> tuple[dict | None, int]:
        if urlsplit(query).scheme or query.startswith("//"):
            raise _FetchError("the query must be a URL relative to the FHIR server")
        relative = query.lstrip("/")
        is_read = _is_read(relative)
        url = self.base + relative
        status, body = self.get(url, none_on=_NO_DATA_ON_READ if is_read else ())
        if body is None:
            return None, status
        if is_read:
            expected_type = relative.split("/", 1)[0]
            if body["resourceType"] != expected_type:
                raise _FetchError(f"expected a {expected_type} resource, got {body['resourceType']}", status)
            return body, status
        if body["resourceType"] != "Bundle":
            raise _FetchError(f"expected a searchset Bundle, got {body['resourceType']}", status)
        return self.follow_pages(body, seen={_normalized(url)}), status

    def complete(self, bundle: dict) -> tuple[dict, int | None]:
        if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
            raise _FetchError("only a Bundle can be completed")
        seen = {_normalized(u) for u in [link(bundle, "self")] if u}
        return self.follow_pages(bundle, seen), None

    def follow_pages(self, first: dict, seen: set[str]) -> dict:
        pages = [first]
        _check_search_outcomes(first)
        while (next_url := link(pages[-1], "next")) is not None:
            next_url = urljoin(self.base, next_url)
            if _origin(next_url) != self.origin:
                raise _FetchError("a next link points to another server; not followed")
            if _normalized(next_url) in seen:
                raise _FetchError("paging loop: a next link repeats an earlier page")
            if len(pages) >= self.max_pages:
                raise _FetchError(f"the result has more than {self.max_pages} pages; not read in full")
            seen.add(_normalized(next_url))
            status, page = self.get(next_url)
            if page is None or page.get("resourceType") != "Bundle":
                raise _FetchError("a next page is not a Bundle", status)
            _check_search_outcomes(page)
            pages.append(page)
        return _merged(pages)

    def get(self, url: str, none_on: tuple[int, ...] = ()) -> tuple[int, dict | None]:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise _FetchError("timed out (deadline reached)")
        try:
            response = self.session.get(url, self.auth.headers(), remaining)
        except urllib3.exceptions.NewConnectionError:  # (a subclass of the timeout error)
            raise _FetchError("could not connect to the FHIR server") from None
        except urllib3.exceptions.TimeoutError:
            raise _FetchError("timed out") from None
        except (urllib3.exceptions.ProtocolError, OSError):
            raise _FetchError("could not connect to the FHIR server") from None
        except (urllib3.exceptions.HTTPError, ValueError) as error:
            raise _FetchError(f"request failed ({type(error).__name__})") from None
        complete = False
        try:
            status = response.status
            if status in none_on:
                return status, None
            if not 200 <= status < 300:
                raise _FetchError(f"the FHIR server answered HTTP {status}{_status_hint(status)}", status)
            body = self.read_json(response)
            complete = True
        finally:
            # A connection is reused only when its response was read to the end.
            if complete:
                response.release_conn()
            else:
                response.close()
        if not isinstance(body, dict) or not isinstance(body.get("resourceType"), str):
            raise _FetchError("the response is not a FHIR resource", status)
        if body["resourceType"] == "OperationOutcome":
            raise _FetchError(f"the FHIR server answered with an OperationOutcome{_issue_codes(body)}", status)
        return status, body

    def read_json(self, response: urllib3.BaseHTTPResponse) -> object:
        status = response.status
        declared = response.headers.get("Content-Length", "")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            raise _FetchError(f"the response is larger than {_mb(self.max_body_bytes)}", status)
        read = response.read1  # returns as soon as bytes arrive
        body = bytearray()
        try:
            while chunk := read(_READ_CHUNK_BYTES, decode_content=True):
                body += chunk
                if len(body) > self.max_body_bytes:
                    raise _FetchError(f"the response is larger than {_mb(self.max_body_bytes)}", status)
                if time.monotonic() >= self.deadline:
                    raise _FetchError("timed out while reading the response", status)
        except (OSError, urllib3.exceptions.HTTPError) as error:
            timeout = "timeout" in type(error).__name__.lower()
            raise _FetchError("timed out" if timeout else "the response was cut off", status) from None
        try:
            return decode_json(body)
        except DecodeError:
            raise _FetchError("the response is not JSON", status) from None


class _BearerAuth:
    """The request headers, with `Authorization: Bearer` only when there is a token."""

    def __init__(self, token: str | None):
        if token and not (token.isascii() and token.isprintable() and not any(c.isspace() for c in token)):
            raise ValueError("the access token is not a valid HTTP header value")
        self._token = token or None  # an empty token is no token

    def headers(self) -> dict[str, str]:
        headers = {"Accept": _ACCEPT, "User-Agent": _USER_AGENT}
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        return headers

    def __repr__(self) -> str:  # never show the token in a traceback or a debugger
        return "_BearerAuth(<hidden>)" if self._token else "_BearerAuth(None)"


# --- small pure helpers ---


def _is_read(relative: str) -> bool:
    """`Patient/123` (or a vread) is a read; anything with a query, or a bare type, is a search."""
    if "?" in relative:
        return False
    segments = relative.split("#", 1)[0].split("/")
    return len(segments) in (2, 4) and all(s and s[0] not in "$_" for s in segments[:2])


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    try:
        port = parts.port or {"http": 80, "https": 443}.get(scheme)
    except ValueError:
        port = -1  # an invalid port never equals the base's origin
    return scheme, (parts.hostname or "").lower(), port


def _normalized(url: str) -> str:
    return url.split("#", 1)[0]


def link(bundle: dict, relation: str) -> str | None:
    """The URL of a Bundle's link with this relation ("next", "self"), if any."""
    links = bundle.get("link")
    for candidate in links if isinstance(links, list) else ():
        if isinstance(candidate, dict) and candidate.get("relation") == relation and isinstance(candidate.get("url"), str):
            return candidate["url"]
    return None


def error_outcome_in(bundle: dict) -> dict | None:
    """The first OperationOutcome entry of a searchset that reports an error (severity error or
    fatal, or no issue at all: an outcome without issues is not a valid one), else None. Such a
    search is incomplete, whether it was prefetched or fetched here."""
    entries = bundle.get("entry")
    for entry in entries if isinstance(entries, list) else ():
        resource = entry.get("resource") if isinstance(entry, dict) else None
        if isinstance(resource, dict) and resource.get("resourceType") == "OperationOutcome":
            issues = resource.get("issue")
            if not isinstance(issues, list) or not issues or any(
                isinstance(i, dict) and i.get("severity") in ("error", "fatal") for i in issues
            ):
                return resource
    return None


def _check_search_outcomes(bundle: dict) -> None:
    outcome = error_outcome_in(bundle)
    if outcome is not None:
        raise _FetchError(f"the search reported an error{_issue_codes(outcome)}")


def _merged(pages: list[dict]) -> dict:
    """One searchset with every page's entries; a resource repeated across pages is kept once."""
    first = pages[0]
    merged = {k: v for k, v in first.items() if k not in ("entry", "link")}
    self_link = link(first, "self")
    if self_link:
        merged["link"] = [{"relation": "self", "url": self_link}]
    entries, seen = [], set()
    for page in pages:
        for entry in page.get("entry") or ():
            resource = entry.get("resource") if isinstance(entry, dict) else None
            identity = (
                (resource.get("resourceType"), resource.get("id"))
                if isinstance(resource, dict) and resource.get("id")
                else None
            )
            if identity is not None and identity in seen:
                continue
            if identity is not None:
                seen.add(identity)
            entries.append(entry)
    merged["entry"] = entries
    return merged


def _issue_codes(outcome: dict) -> str:
    codes = sorted(
        {i.get("code") for i in outcome.get("issue") or () if isinstance(i, dict) and isinstance(i.get("code"), str)}
    )
    return f" ({', '.join(codes)[:80]})" if codes else ""


def _status_hint(status: int) -> str:
    return {401: " (not authorized)", 403: " (forbidden)", 404: " (not found)", 429: " (too many requests)"}.get(
        status, ""
    )


def _mb(size: int) -> str:
    return f"{size / (1024 * 1024):g} MB"
