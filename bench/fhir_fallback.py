"""The FHIR-fallback path: hooks without prefetch, answered from the Node FHIR test server.

The same synthetic patient is loaded into the FHIR server. Every prefetch query of the service
(templates from its discovery document) is then timed alone from this process, following `next`
links as the service must, which gives the slowest single query and the sequential cost (the sum).
The hook's total latency without prefetch is measured by the load generator with one client.
"""

from __future__ import annotations

import http.client
import json
import statistics
import time
from pathlib import Path
from urllib.parse import urlsplit

from bench.synthetic import PRACTITIONER_ID, fhir_batch, patient_record
from service.services import substitute_tokens


class FhirHttp:
    """A keep-alive connection to the FHIR server (the fastest a client can ask)."""

    def __init__(self, base_url: str):
        parts = urlsplit(base_url)
        self.base_url = base_url.rstrip("/")
        self.host, self.port, self.base_path = parts.hostname, parts.port, parts.path.rstrip("/")
        self.conn = http.client.HTTPConnection(self.host, self.port, timeout=60)

    def request(self, method: str, url: str, body: dict | None = None) -> tuple[int, dict]:
        path = url if url.startswith("/") else f"{self.base_path}/{url}"
        if url.startswith("http"):
            parts = urlsplit(url)
            path = parts.path + (f"?{parts.query}" if parts.query else "")
        payload = json.dumps(body).encode() if body is not None else None
        headers = {"Accept": "application/fhir+json"}
        if payload is not None:
            headers["Content-Type"] = "application/fhir+json"
        self.conn.request(method, path, body=payload, headers=headers)
        response = self.conn.getresponse()
        data = response.read()
        return response.status, (json.loads(data) if data else {})

    def close(self) -> None:
        self.conn.close()


def write_seed(path: Path, sizes: list[int], patient_id_format: str) -> None:
    """One batch Bundle with a synthetic patient of each size (ids from `patient_id_format`), for
    the FHIR test server's FHIR_SEED: every worker of the server loads it before it answers."""
    entries: list[dict] = []
    for size in sizes:
        patient_id = patient_id_format.format(size=size)
        entries.extend(fhir_batch(patient_record(size, patient_id), patient_id)["entry"])
    path.write_text(json.dumps({"resourceType": "Bundle", "type": "batch", "entry": entries}))


def fill_template(template: str, patient_id: str) -> str:
    """The query the service sends for `template` (its own token substitution)."""
    query = substitute_tokens(template, {"patientId": patient_id, "userId": f"Practitioner/{PRACTITIONER_ID}"})
    if query is None:
        raise RuntimeError(f"template {template!r} needs a token the bench does not fill")
    return query


def fetch_all_pages(client: FhirHttp, query: str, max_pages: int = 50) -> tuple[int, int]:
    """(resources, pages) of one query, following `next` links."""
    status, bundle = client.request("GET", query)
    if status != 200:
        raise RuntimeError(f"GET {query}: HTTP {status}")
    found, pages = len(bundle.get("entry", [])) if bundle.get("resourceType") == "Bundle" else 1, 1
    while pages < max_pages:
        next_url = next((l["url"] for l in bundle.get("link", []) if l.get("relation") == "next"), None)
        if not next_url:
            break
        status, bundle = client.request("GET", next_url)
        found += len(bundle.get("entry", []))
        pages += 1
    return found, pages


def time_single_queries(base_url: str, templates: dict[str, str], patient_id: str,
                        repeats: int) -> dict[str, dict]:
    """Median and spread of each prefetch query measured alone (after one untimed warm-up)."""
    client = FhirHttp(base_url)
    results = {}
    try:
        for key, template in templates.items():
            query = fill_template(template, patient_id)
            found, pages = fetch_all_pages(client, query)  # warm-up: FHIRPath compile, caches
            timings = []
            for _ in range(repeats):
                started = time.perf_counter()
                fetch_all_pages(client, query)
                timings.append((time.perf_counter() - started) * 1000)
            results[key] = {
                "query": query if len(query) < 160 else query[:157] + "...",
                "resources": found, "pages": pages,
                "p50_ms": statistics.median(timings), "min_ms": min(timings), "max_ms": max(timings),
            }
    finally:
        client.close()
    return results


def time_parallel_queries(base_url: str, templates: dict[str, str], patient_id: str,
                          repeats: int) -> dict:
    """All prefetch queries at once, one thread and connection each, as the service sends them:
    the fastest the FHIR server itself can answer the set (p50 of `repeats`)."""
    import threading

    queries = [fill_template(t, patient_id) for t in templates.values()]
    clients = [FhirHttp(base_url) for _ in queries]
    timings = []
    try:
        for client, query in zip(clients, queries):
            fetch_all_pages(client, query)  # warm-up and connect
        for _ in range(repeats):
            threads = [threading.Thread(target=fetch_all_pages, args=(c, q)) for c, q in zip(clients, queries)]
            started = time.perf_counter()
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            timings.append((time.perf_counter() - started) * 1000)
    finally:
        for client in clients:
            client.close()
    return {"p50_ms": statistics.median(timings), "min_ms": min(timings), "max_ms": max(timings)}


def discovery_templates(service_base: str, service_id: str) -> dict[str, str]:
    parts = urlsplit(service_base)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        conn.request("GET", "/cds-services")
        document = json.loads(conn.getresponse().read())
    finally:
        conn.close()
    for service in document["services"]:
        if service["id"] == service_id:
            return dict(service.get("prefetch", {}))
    raise RuntimeError(f"service {service_id} is not in discovery")
