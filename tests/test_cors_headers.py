"""CORS for browser clients such as the CDS Hooks Sandbox (cds-hooks.md 6.9, T-S13) and the
security headers of every answer."""

from __future__ import annotations

import pytest
from flask import Response

from service.config import ConfigError
from tests.conftest import make_app
from tests.support_jwt import TEST_CLIENT_BASE, SigningKey, bearer, jwks_of, trusted_clients_file

SANDBOX = "https://sandbox.cds-hooks.org"
ISS = "https://ehr.example.org"
CDS_PATHS = (
    "/cds-services",
    "/cds-services/rpl-patient-view",
    "/cds-services/rpl-order-select",
    "/cds-services/rpl-order-sign",
    "/cds-services/rpl-order-sign/feedback",
)


def preflight(client, path: str, origin: str = SANDBOX, method: str = "POST"):
    return client.options(
        path,
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": method,
            "Access-Control-Request-Headers": "authorization,content-type",
        },
    )


@pytest.fixture(scope="module")
def key() -> SigningKey:
    return SigningKey.ec_p384("cors-key")


@pytest.fixture
def production_app(settings, tmp_path, key):
    """JWT required, not local mode, only the Sandbox origin allowed."""
    path = trusted_clients_file(tmp_path, [{"iss": ISS, "jwks": jwks_of([key])}])
    return make_app(
        settings, auth="required", local_mode=False, trusted_clients_file=str(path),
        cors_origins=(SANDBOX,),
    )


@pytest.mark.parametrize("path", CDS_PATHS)
def test_t_s13_preflight_without_jwt_is_answered_with_the_cors_headers(production_app, path):
    response = preflight(production_app.test_client(), path)
    assert response.status_code == 204
    assert response.headers["Access-Control-Allow-Origin"] == SANDBOX
    assert set(response.headers["Access-Control-Allow-Methods"].replace(" ", "").split(",")) == {"GET", "POST", "OPTIONS"}
    allowed_headers = {h.strip().lower() for h in response.headers["Access-Control-Allow-Headers"].split(",")}
    assert {"content-type", "authorization"} <= allowed_headers
    assert "Origin" in response.headers.get("Vary", "")
    assert "Access-Control-Allow-Credentials" not in response.headers
    assert response.get_data() == b""


def test_preflight_from_another_origin_gets_no_allow_origin(production_app):
    response = preflight(production_app.test_client(), "/cds-services/rpl-patient-view", origin="https://evil.example")
    assert response.status_code == 204
    assert "Access-Control-Allow-Origin" not in response.headers


def test_a_401_carries_cors_headers_so_the_browser_can_read_it(production_app):
    response = production_app.test_client().post(
        "/cds-services/rpl-patient-view", json={}, headers={"Origin": SANDBOX}
    )
    assert response.status_code == 401
    assert response.headers["Access-Control-Allow-Origin"] == SANDBOX
    assert "WWW-Authenticate" in response.headers["Access-Control-Expose-Headers"]


def test_an_authenticated_answer_carries_cors_headers(production_app, key):
    token = key.token(iss=ISS, aud=f"{TEST_CLIENT_BASE}/cds-services")
    response = production_app.test_client().get(
        "/cds-services", headers={"Origin": SANDBOX, **bearer(token)}
    )
    assert response.status_code == 200
    assert response.headers["Access-Control-Allow-Origin"] == SANDBOX


def test_production_default_allows_no_browser_origin(settings, tmp_path, key):
    path = trusted_clients_file(tmp_path, [{"iss": ISS, "jwks": jwks_of([key])}])
    app = make_app(settings, auth="required", local_mode=False, trusted_clients_file=str(path))
    response = preflight(app.test_client(), "/cds-services")
    assert response.status_code == 204
    assert "Access-Control-Allow-Origin" not in response.headers


def test_local_mode_allows_any_origin(client):
    response = preflight(client, "/cds-services/rpl-order-select", origin="http://localhost:3000")
    assert response.status_code == 204
    assert response.headers["Access-Control-Allow-Origin"] == "*"
    answer = client.get("/cds-services", headers={"Origin": "http://localhost:3000"})
    assert answer.status_code == 200 and answer.headers["Access-Control-Allow-Origin"] == "*"


@pytest.mark.parametrize(
    ("request_kwargs", "status"),
    [
        ({"method": "POST", "path": "/cds-services/rpl-patient-view", "data": "{", "content_type": "application/json"}, 400),
        ({"method": "POST", "path": "/cds-services/no-such-service", "json": {}}, 404),
        ({"method": "DELETE", "path": "/cds-services"}, 405),
    ],
)
def test_error_answers_carry_cors_and_security_headers(client, request_kwargs, status):
    kwargs = dict(request_kwargs)
    response = client.open(kwargs.pop("path"), headers={"Origin": SANDBOX}, **kwargs)
    assert response.status_code == status
    assert response.headers["Access-Control-Allow-Origin"] == "*"
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.get_json()["resourceType"] == "OperationOutcome"


def test_configured_origins_replace_the_local_wildcard(settings):
    app = make_app(settings, cors_origins=("https://ehr.example.org",))
    client = app.test_client()
    assert preflight(client, "/cds-services", origin="https://ehr.example.org").headers[
        "Access-Control-Allow-Origin"] == "https://ehr.example.org"
    assert "Access-Control-Allow-Origin" not in preflight(client, "/cds-services", origin=SANDBOX).headers


@pytest.mark.parametrize("bad", ["sandbox.cds-hooks.org", "https://sandbox.cds-hooks.org/path", "ftp://x.example"])
def test_a_malformed_origin_stops_start_up(settings, bad):
    with pytest.raises(ConfigError, match="RPL_CDS_CORS_ORIGINS"):
        make_app(settings, cors_origins=(bad,))


# --------------------------------------------------------------------------------------------
# Security headers


def test_json_answers_have_the_security_headers(production_app, client):
    for response in (client.get("/cds-services"), production_app.test_client().get("/cds-services")):
        headers = response.headers
        assert headers["X-Content-Type-Options"] == "nosniff"
        assert headers["Cache-Control"] == "no-store"
        assert headers["Referrer-Policy"] == "no-referrer"
        assert headers["Content-Security-Policy"].startswith("default-src 'none'")
        assert "frame-ancestors 'none'" in headers["Content-Security-Policy"]


def test_a_view_can_set_its_own_content_security_policy(settings):
    app = make_app(settings)
    page_csp = "default-src 'self'; script-src 'self'"

    @app.get("/test-html-page")
    def page():
        response = Response("<!doctype html><p>hi</p>", mimetype="text/html")
        response.headers["Content-Security-Policy"] = page_csp
        response.headers["Cache-Control"] = "max-age=60"
        return response

    response = app.test_client().get("/test-html-page")
    assert response.headers["Content-Security-Policy"] == page_csp
    assert response.headers["Cache-Control"] == "max-age=60"
    assert response.headers["X-Content-Type-Options"] == "nosniff"


def test_hsts_only_over_https(client):
    assert "Strict-Transport-Security" not in client.get("/cds-services").headers
    secure = client.get("/cds-services", base_url="https://localhost")
    assert secure.headers["Strict-Transport-Security"].startswith("max-age=")


def test_development_server_hides_its_version():
    """`rpl-cds serve` can pass service.security.QuietRequestHandler to app.run()."""
    import threading

    import requests
    from flask import Flask
    from werkzeug.serving import make_server

    from service.security import QuietRequestHandler

    app = Flask("probe")
    app.get("/")(lambda: "ok")
    server = make_server("127.0.0.1", 0, app, request_handler=QuietRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        response = requests.get(f"http://127.0.0.1:{server.server_port}/", timeout=5)
    finally:
        server.shutdown()
    assert response.headers["Server"] == "rpl-cds"
