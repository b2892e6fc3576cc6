"""JWT authentication of CDS clients (cds-hooks.md section 6, tests T-S1 ... T-S12) with real keys
(EC P-384, P-256, RSA), real signed tokens and a real JWK Set endpoint on 127.0.0.1 that records
every request it gets, plus the JWT replay check across real gunicorn workers."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import time

import pytest
import requests

from service import create_app
from service.auth import AuthError, check_audience
from service.config import ConfigError
from service.security import PROTECTED_PREFIXES, UNAUTHENTICATED_MESSAGE, is_protected
from tests.conftest import make_app
from tests.hookdata import full_prefetch, hook_request, miscarriage
from tests.support_jwt import (
    TEST_CLIENT_BASE,
    RecordingServer,
    SigningKey,
    bearer,
    cds_hooks_claims,
    hmac_token,
    jwks_of,
    trusted_clients_file,
    unsigned_token,
)

EHR = "https://ehr.example.org/fhir"  # registered with a jku (the recording server)
INLINE_EHR = "https://inline-ehr.example.org"  # registered with an inline JWK Set (RSA)
TENANT_EHR = "https://tenant-ehr.example.org"  # inline keys, tenants allowlisted
DISCOVERY = f"{TEST_CLIENT_BASE}/cds-services"
PATIENT_VIEW = f"{TEST_CLIENT_BASE}/cds-services/rpl-patient-view"
ORDER_SIGN = f"{TEST_CLIENT_BASE}/cds-services/rpl-order-sign"


class FakeClock:
    """Monotonic time the test moves forward (JWK Set cache and refetch rate limit)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture(scope="module")
def ec_key() -> SigningKey:
    return SigningKey.ec_p384("ehr-ec-1")


@pytest.fixture(scope="module")
def rsa_key() -> SigningKey:
    return SigningKey.rsa("inline-rsa-1", alg="RS384")


@pytest.fixture(scope="module")
def tenant_key() -> SigningKey:
    return SigningKey.ec_p256("tenant-ec-1")


@pytest.fixture
def ehr():
    with RecordingServer() as server:
        yield server


@pytest.fixture
def attacker():
    with RecordingServer() as server:
        yield server


@pytest.fixture
def clients_file(tmp_path, ehr, ec_key, rsa_key, tenant_key):
    ehr.publish_jwks([ec_key])
    return trusted_clients_file(
        tmp_path,
        [
            {"iss": EHR, "name": "Test EHR", "jku": ehr.url("/jwks.json")},
            {"iss": INLINE_EHR, "jwks": jwks_of([rsa_key])},
            {"iss": TENANT_EHR, "jwks": jwks_of([tenant_key]), "tenants": ["hospital-a", "hospital-b"]},
        ],
    )


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def app(settings, clients_file, clock):
    app = make_app(settings, auth="required", trusted_clients_file=str(clients_file))
    app.extensions["rpl_auth"].clock = clock
    return app


@pytest.fixture
def client(app):
    return app.test_client()


def good_token(key: SigningKey, aud: str = DISCOVERY, **kwargs) -> str:
    iss = kwargs.pop("iss", EHR)
    return key.token(iss=iss, aud=aud, **kwargs)


def assert_refused(response) -> None:
    """T-S12: a refusal says 401 and nothing about the reason."""
    assert response.status_code == 401, response.get_data(as_text=True)[:300]
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    body = response.get_json()
    assert body == {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": "login", "details": {"text": UNAUTHENTICATED_MESSAGE}}],
    }


# --------------------------------------------------------------------------------------------
# Good tokens pass


def test_good_ec_token_opens_discovery_and_fetches_the_jwks_once(client, ehr, ec_key):
    for _ in range(3):
        response = client.get("/cds-services", headers=bearer(good_token(ec_key)))
        assert response.status_code == 200
        assert {s["id"] for s in response.get_json()["services"]} >= {"rpl-patient-view"}
    assert ehr.requests_to("/jwks.json") == 1  # cached


def test_good_token_calls_a_hook_with_prefetch(client, ec_key):
    body = hook_request(prefetch=full_prefetch([miscarriage("a", "2023-01-01"), miscarriage("b", "2024-02-01")]))
    response = client.post(
        "/cds-services/rpl-patient-view", json=body, headers=bearer(good_token(ec_key, PATIENT_VIEW))
    )
    assert response.status_code == 200, response.get_data(as_text=True)
    assert isinstance(response.get_json()["cards"], list)


@pytest.mark.parametrize("alg", ["RS384", "RS256", "PS384"])
def test_rsa_algorithms_with_an_inline_key(client, rsa_key, alg):
    token = rsa_key.token(iss=INLINE_EHR, aud=DISCOVERY, alg=alg)
    # The inline JWK names RS384; a key whose JWK has no `alg` accepts every RSA algorithm.
    response = client.get("/cds-services", headers=bearer(token))
    assert response.status_code == (200 if alg == "RS384" else 401)


def test_a_jwk_without_alg_accepts_each_allowlisted_rsa_algorithm(settings, tmp_path):
    key = SigningKey.rsa("no-alg")
    path = trusted_clients_file(tmp_path, [{"iss": INLINE_EHR, "jwks": {"keys": [key.public_jwk(with_alg=False)]}}])
    client = make_app(settings, auth="required", trusted_clients_file=str(path)).test_client()
    for alg in ("RS384", "RS256", "PS384"):
        response = client.get("/cds-services", headers=bearer(key.token(iss=INLINE_EHR, aud=DISCOVERY, alg=alg)))
        assert response.status_code == 200, alg


def test_aud_as_one_element_array_is_accepted(client, ec_key):
    response = client.get("/cds-services", headers=bearer(good_token(ec_key, aud=[DISCOVERY])))
    assert response.status_code == 200


def test_aud_trailing_slash_and_host_case_are_normalised(client, ec_key):
    for aud in (DISCOVERY + "/", "HTTP://LOCALHOST:80/cds-services"):
        assert client.get("/cds-services", headers=bearer(good_token(ec_key, aud=aud))).status_code == 200


def test_t_s11_extra_claims_sub_and_past_nbf_are_accepted(client, ec_key):
    now = int(time.time())
    token = good_token(ec_key, extra_claims={"sub": "epic-client-id", "nbf": now - 300, "x-vendor": {"a": 1}})
    assert client.get("/cds-services", headers=bearer(token)).status_code == 200


def test_tenant_in_allowlist_passes(client, tenant_key):
    token = tenant_key.token(iss=TENANT_EHR, aud=DISCOVERY, tenant="hospital-b")
    assert client.get("/cds-services", headers=bearer(token)).status_code == 200


def test_public_url_defines_the_audience(settings, clients_file, ec_key):
    app = make_app(
        settings, auth="required", trusted_clients_file=str(clients_file),
        public_url="https://cds.example.org/rpl",
    )
    client = app.test_client()
    public_aud = "https://cds.example.org/rpl/cds-services"
    assert client.get("/cds-services", headers=bearer(good_token(ec_key, aud=public_aud))).status_code == 200
    # The Host header no longer counts: a token for the internal URL is refused.
    assert_refused(client.get("/cds-services", headers=bearer(good_token(ec_key, aud=DISCOVERY))))


# --------------------------------------------------------------------------------------------
# Attacks are refused (T-S1 ... T-S10)


def test_t_s1_no_authorization_header(client, ehr):
    assert_refused(client.get("/cds-services"))
    assert_refused(client.post("/cds-services/rpl-patient-view", json=hook_request()))
    assert ehr.requests_to() == 0


@pytest.mark.parametrize(
    "value",
    ["Basic dXNlcjpwYXNz", "Bearer", "Bearer not-a-jwt", "Bearer a.b", "Bearer a.b.c.d.e", "Token x.y.z"],
)
def test_t_s1_malformed_authorization(client, value):
    assert_refused(client.get("/cds-services", headers={"Authorization": value}))


def test_unknown_paths_under_the_protected_prefix_need_a_token_first(client):
    assert_refused(client.get("/cds-services/no-such-service/feedback"))
    assert client.get("/no-such-page").status_code == 404


def test_t_s2_alg_none(client, ehr):
    payload, header = cds_hooks_claims(iss=EHR, aud=DISCOVERY, kid="ehr-ec-1")
    assert_refused(client.get("/cds-services", headers=bearer(unsigned_token(payload, header))))
    assert ehr.requests_to() == 0


@pytest.mark.parametrize("secret_form", ["pem", "jwk-json"])
def test_t_s3_hs256_signed_with_the_public_key(client, ehr, rsa_key, ec_key, secret_form):
    # The RS/HS key-confusion attack: the public key (known to everyone) used as an HMAC secret.
    for key, iss in ((rsa_key, INLINE_EHR), (ec_key, EHR)):
        secret = key.public_pem() if secret_form == "pem" else json.dumps(key.public_jwk()).encode()
        payload, header = cds_hooks_claims(iss=iss, aud=DISCOVERY, kid=key.kid)
        for alg in ("HS256", "HS384"):
            response = client.get("/cds-services", headers=bearer(hmac_token(payload, header, secret, alg)))
            assert_refused(response)
    assert ehr.requests_to() == 0


def test_t_s4_unknown_kid_refused_after_exactly_one_refetch_then_rate_limited(client, ehr, ec_key, clock):
    assert client.get("/cds-services", headers=bearer(good_token(ec_key))).status_code == 200
    assert ehr.requests_to("/jwks.json") == 1
    stranger = SigningKey.ec_p384("not-published")
    clock.advance(61)
    assert_refused(client.get("/cds-services", headers=bearer(good_token(stranger))))
    assert ehr.requests_to("/jwks.json") == 2  # one refetch for the unknown kid
    for n in range(20):  # a flood of made-up kids cannot force more fetches
        assert_refused(client.get("/cds-services", headers=bearer(good_token(stranger, kid=f"made-up-{n}"))))
    assert ehr.requests_to("/jwks.json") == 2
    # and the known key keeps working from the cache
    assert client.get("/cds-services", headers=bearer(good_token(ec_key))).status_code == 200
    assert ehr.requests_to("/jwks.json") == 2


def test_t_s5_issuer_not_allowlisted(client, ehr, attacker, ec_key):
    attacker.publish_jwks([ec_key])
    token = ec_key.token(iss="https://evil.example", aud=DISCOVERY, jku=attacker.url("/jwks.json"))
    assert_refused(client.get("/cds-services", headers=bearer(token)))
    assert attacker.requests_to() == 0 and ehr.requests_to() == 0


def test_t_s6_jku_not_allowlisted_is_refused_without_any_fetch(client, ehr, attacker):
    forged = SigningKey.ec_p384("ehr-ec-1")  # the attacker's own key, under the EHR's kid
    attacker.publish_jwks([forged])
    token = forged.token(iss=EHR, aud=DISCOVERY, jku=attacker.url("/jwks.json"))
    assert_refused(client.get("/cds-services", headers=bearer(token)))
    assert attacker.requests_to() == 0
    assert ehr.requests_to() == 0  # refused before the key lookup


def test_jku_header_on_an_inline_client_is_never_fetched(client, attacker, rsa_key):
    forged = SigningKey.rsa("inline-rsa-1")
    attacker.publish_jwks([forged])
    token = forged.token(iss=INLINE_EHR, aud=DISCOVERY, jku=attacker.url("/jwks.json"))
    assert_refused(client.get("/cds-services", headers=bearer(token)))
    assert attacker.requests_to() == 0
    # The genuine key with the same (ignored) jku header passes: the keys come from the registry.
    genuine = rsa_key.token(iss=INLINE_EHR, aud=DISCOVERY, jku=attacker.url("/jwks.json"))
    assert client.get("/cds-services", headers=bearer(genuine)).status_code == 200
    assert attacker.requests_to() == 0


def test_the_registered_jku_in_the_header_is_accepted(client, ehr, ec_key):
    token = good_token(ec_key, jku=ehr.url("/jwks.json"))
    assert client.get("/cds-services", headers=bearer(token)).status_code == 200


def test_jwks_redirect_is_not_followed(tmp_path, settings, ehr, attacker, ec_key):
    attacker.publish_jwks([ec_key])
    ehr.respond("/moved.json", {}, status=302)
    # a 302 without Location would be odd; the point is that no redirect target is ever visited
    path = trusted_clients_file(tmp_path, [{"iss": EHR, "jku": ehr.url("/moved.json")}], "moved.json")
    client = make_app(settings, auth="required", trusted_clients_file=str(path)).test_client()
    assert_refused(client.get("/cds-services", headers=bearer(good_token(ec_key))))
    assert ehr.requests_to("/moved.json") == 1
    assert attacker.requests_to() == 0


def test_t_s7_aud_of_another_endpoint(client, ec_key):
    body = hook_request(prefetch=full_prefetch([]))
    for aud in (ORDER_SIGN, DISCOVERY, [ORDER_SIGN], "https://other-cds.example.org/cds-services/rpl-patient-view",
                PATIENT_VIEW + "/feedback", "http://localhost:8080/cds-services/rpl-patient-view"):
        response = client.post("/cds-services/rpl-patient-view", json=body, headers=bearer(good_token(ec_key, aud=aud)))
        assert_refused(response)
    assert_refused(client.get("/cds-services", headers=bearer(good_token(ec_key, aud=PATIENT_VIEW))))


def test_t_s8_expired_and_badly_timed_tokens(client, ec_key):
    now = int(time.time())
    cases = {
        "expired beyond leeway": dict(iat=now - 400, exp=now - 61),
        "issued in the future": dict(iat=now + 120, exp=now + 300),
        "not yet valid (nbf)": dict(extra_claims={"nbf": now + 120}),
        "lifetime over an hour": dict(iat=now, exp=now + 3601 + 60),
        "exp before iat": dict(iat=now, exp=now - 1),
    }
    for name, claims in cases.items():
        response = client.get("/cds-services", headers=bearer(good_token(ec_key, **claims)))
        assert response.status_code == 401, name


def test_clock_skew_within_leeway_is_tolerated(client, ec_key):
    now = int(time.time())
    for claims in (dict(iat=now - 330, exp=now - 30), dict(iat=now + 30, exp=now + 330)):
        assert client.get("/cds-services", headers=bearer(good_token(ec_key, **claims))).status_code == 200


def test_t_s9_replayed_jti(client, ec_key):
    token = good_token(ec_key)
    assert client.get("/cds-services", headers=bearer(token)).status_code == 200
    assert_refused(client.get("/cds-services", headers=bearer(token)))
    # the same jti in a freshly signed token is a replay too
    again = good_token(ec_key, jti=json.loads(_segment(token, 1))["jti"])
    assert_refused(client.get("/cds-services", headers=bearer(again)))


def test_t_s9_a_refused_token_does_not_burn_its_jti(client, ec_key):
    # Only valid tokens take a place in the replay store: a forged token cannot block a real one.
    jti = "shared-nonce-1"
    assert_refused(client.get("/cds-services", headers=bearer(good_token(ec_key, aud=PATIENT_VIEW, jti=jti))))
    assert client.get("/cds-services", headers=bearer(good_token(ec_key, jti=jti))).status_code == 200


@pytest.mark.parametrize("missing", ["iat", "jti", "exp", "iss", "aud", "typ", "kid"])
def test_t_s10_missing_required_fields(client, ec_key, missing):
    assert_refused(client.get("/cds-services", headers=bearer(good_token(ec_key, omit=[missing]))))


@pytest.mark.parametrize(
    "claims",
    [{"jti": ""}, {"jti": 12}, {"iat": "yesterday"}, {"aud": []}, {"aud": [7]}, {"tenant": ["x"]}],
)
def test_wrongly_typed_claims(client, ec_key, claims):
    assert_refused(client.get("/cds-services", headers=bearer(good_token(ec_key, extra_claims=claims))))


def test_wrong_typ_header(client, ec_key):
    assert_refused(client.get("/cds-services", headers=bearer(good_token(ec_key, typ="at+jwt"))))


def test_algorithm_must_fit_the_key(client):
    # Keys of the wrong type or curve presented under the registered kid "ehr-ec-1" (ES384, P-384).
    for impostor in (SigningKey.ec_p256("ehr-ec-1"), SigningKey.rsa("ehr-ec-1")):
        assert_refused(client.get("/cds-services", headers=bearer(impostor.token(iss=EHR, aud=DISCOVERY))))


def test_bad_signature(client, ec_key):
    token = good_token(ec_key)
    head, payload, signature = token.split(".")
    tampered = ".".join([head, _b64json({**json.loads(_segment(token, 1)), "iss": EHR, "jti": "tampered"}), signature])
    assert_refused(client.get("/cds-services", headers=bearer(tampered)))


def test_tenant_not_allowlisted_or_missing(client, tenant_key):
    for tenant in ("hospital-c", None):
        token = tenant_key.token(iss=TENANT_EHR, aud=DISCOVERY, tenant=tenant)
        assert_refused(client.get("/cds-services", headers=bearer(token)))


def test_t_s12_every_refusal_looks_the_same(client, ec_key):
    now = int(time.time())
    responses = [
        client.get("/cds-services"),
        client.get("/cds-services", headers=bearer(good_token(ec_key, exp=now - 3600, iat=now - 3700))),
        client.get("/cds-services", headers=bearer(good_token(ec_key, aud=PATIENT_VIEW))),
        client.get("/cds-services", headers=bearer(good_token(SigningKey.ec_p384("ehr-ec-1")))),
        client.get("/cds-services", headers=bearer(good_token(ec_key, iss="https://nobody.example"))),
    ]
    bodies = {r.get_data() for r in responses}
    assert len(bodies) == 1
    text = json.loads(bodies.pop())["issue"][0]["details"]["text"].lower()
    for leak in ("expire", "signature", "kid", "aud", "issuer", "jti", "tenant", "key", "replay", "https://"):
        assert leak not in text


def test_t_s4_rotated_key_works_after_exactly_one_refetch(client, ehr, ec_key, clock):
    assert client.get("/cds-services", headers=bearer(good_token(ec_key))).status_code == 200
    assert ehr.requests_to("/jwks.json") == 1
    rotated = SigningKey.ec_p384("ehr-ec-2")
    ehr.publish_jwks([rotated])  # the EHR rotates: the old key is gone
    clock.advance(300)
    assert client.get("/cds-services", headers=bearer(good_token(rotated))).status_code == 200
    assert ehr.requests_to("/jwks.json") == 2
    for _ in range(3):
        assert client.get("/cds-services", headers=bearer(good_token(rotated))).status_code == 200
    assert ehr.requests_to("/jwks.json") == 2
    # the retired key no longer opens the door
    assert_refused(client.get("/cds-services", headers=bearer(good_token(ec_key))))


def test_jwks_is_refreshed_after_its_cache_time(client, ehr, ec_key, clock):
    assert client.get("/cds-services", headers=bearer(good_token(ec_key))).status_code == 200
    clock.advance(3601)
    assert client.get("/cds-services", headers=bearer(good_token(ec_key))).status_code == 200
    assert ehr.requests_to("/jwks.json") == 2


def test_a_failing_jwks_endpoint_keeps_the_cached_keys_and_is_not_hammered(client, ehr, ec_key, clock):
    assert client.get("/cds-services", headers=bearer(good_token(ec_key))).status_code == 200
    ehr.respond("/jwks.json", {"error": "down"}, status=500)
    clock.advance(3601)  # cache expired, refresh fails: the known key still works
    assert client.get("/cds-services", headers=bearer(good_token(ec_key))).status_code == 200
    assert ehr.requests_to("/jwks.json") == 2
    for _ in range(5):
        assert client.get("/cds-services", headers=bearer(good_token(ec_key))).status_code == 200
    assert ehr.requests_to("/jwks.json") == 2


def test_the_spec_example_jwks_is_a_valid_inline_registry_entry(settings, tmp_path, ec_key):
    """The JWK Set printed in CDS Hooks 2.0 (EC P-384, `alg` ES384) loads as an inline entry; a
    token under its kid that was not signed by its private key is refused."""
    jwks = {"keys": [{
        "kty": "EC", "use": "sig", "crv": "P-384", "kid": "example-kid", "alg": "ES384",
        "x": "46SDH7Znh821wblCBglA61sNE9ZrHYKKt3qRtRTmSXyOI_FIGBLWrWa0GPUkDCEk",
        "y": "XMcRuuoGW7CXjQdy-F5i3FeBE0x9hPLdeFdSoDd3ELmx404tLX0VRRcqzAsPhXcI",
    }]}
    path = trusted_clients_file(tmp_path, [{"iss": "https://fhir-ehr.example.com/", "jwks": jwks}])
    app = make_app(settings, auth="required", trusted_clients_file=str(path))
    assert set(app.extensions["rpl_auth"].clients["https://fhir-ehr.example.com/"].inline_keys) == {"example-kid"}
    token = ec_key.token(iss="https://fhir-ehr.example.com/", aud=DISCOVERY, kid="example-kid")
    assert_refused(app.test_client().get("/cds-services", headers=bearer(token)))


# --------------------------------------------------------------------------------------------
# Protected paths, disabled mode, fail-closed


def test_protected_paths_rule():
    assert PROTECTED_PREFIXES == ("/cds-services", "/analytics")
    for path in ("/cds-services", "/cds-services/", "/cds-services/rpl-order-sign",
                 "/cds-services/rpl-order-sign/feedback", "/analytics", "/analytics/cards.csv"):
        assert is_protected(path), path
    for path in ("/", "/healthz", "/readyz", "/metrics", "/playground", "/static/app.js",
                 "/cds-servicesX", "/analyticsfoo", "/rules"):
        assert not is_protected(path), path


def test_auth_disabled_needs_no_token(settings):
    client = make_app(settings, auth="disabled").test_client()
    assert client.get("/cds-services").status_code == 200


def test_replay_store_down_fails_closed(settings, clients_file, tmp_path, ec_key):
    unreachable = f"sqlite:///{tmp_path / 'no-such-dir' / 'db.sqlite'}"
    app = make_app(settings, auth="required", trusted_clients_file=str(clients_file), database_url=unreachable)
    response = app.test_client().get("/cds-services", headers=bearer(good_token(ec_key)))
    assert response.status_code == 503
    assert response.get_json()["resourceType"] == "OperationOutcome"


# --------------------------------------------------------------------------------------------
# The registry file is checked at start-up


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("not json", "not valid JSON"),
        ("[]", "should be non-empty|too short"),
        ('[{"iss": "https://a"}]', "exactly one of 'jku'"),
        ('[{"iss": "https://a", "jku": "https://a/jwks", "jwks": {"keys": []}}]', "exactly one of 'jku'"),
        ('[{"iss": "https://a", "jku": "http://ehr.example.org/jwks"}]', "must use https"),
        ('[{"iss": "https://a", "jku": "https://a/j"}, {"iss": "https://a", "jku": "https://a/k"}]', "registered twice"),
        ('[{"iss": "https://a", "jku": "https://a/j", "tenant": ["x"]}]', "Additional properties"),
        ('[{"iss": "https://a", "jwks": {"keys": [{"kty": "oct", "kid": "k", "k": "c2VjcmV0"}]}}]', "oct"),
    ],
)
def test_bad_registry_stops_start_up(settings, tmp_path, content, message):
    path = tmp_path / "clients.json"
    path.write_text(content)
    with pytest.raises(ConfigError, match=message):
        make_app(settings, auth="required", trusted_clients_file=str(path))


def test_registry_refuses_private_keys(settings, tmp_path):
    from jwt.algorithms import ECAlgorithm

    key = SigningKey.ec_p384("leaky")
    private_jwk = ECAlgorithm.to_jwk(key.private_key, as_dict=True) | {"kid": "leaky"}
    path = trusted_clients_file(tmp_path, [{"iss": "https://a", "jwks": {"keys": [private_jwk]}}])
    with pytest.raises(ConfigError, match="PRIVATE"):
        make_app(settings, auth="required", trusted_clients_file=str(path))


def test_auth_required_without_registry_stops_start_up(settings):
    with pytest.raises(ConfigError, match="RPL_CDS_TRUSTED_CLIENTS"):
        make_app(settings, auth="required", trusted_clients_file=None)


def test_check_audience_unit():
    check_audience("https://cds.example.org/cds-services", "https://cds.example.org:443/cds-services/")
    with pytest.raises(AuthError):
        check_audience("https://cds.example.org/CDS-services", "https://cds.example.org/cds-services")
    with pytest.raises(AuthError):
        check_audience("http://cds.example.org/cds-services", "https://cds.example.org/cds-services")
    with pytest.raises(AuthError):
        check_audience("https://cds.example.org/cds-services?x=1", "https://cds.example.org/cds-services")


# --------------------------------------------------------------------------------------------
# FHIR-server allowlist under authentication


def test_no_outbound_call_and_no_token_to_a_non_allowlisted_fhir_server(settings, clients_file, ec_key, attacker):
    app = make_app(settings, auth="required", trusted_clients_file=str(clients_file), local_mode=False)
    client = app.test_client()
    body = hook_request(fhir_server=attacker.url("/fhir"), access_token="access-token-must-stay-home")
    response = client.post(
        "/cds-services/rpl-patient-view", json=body, headers=bearer(good_token(ec_key, PATIENT_VIEW))
    )
    assert response.status_code == 412, response.get_data(as_text=True)
    assert attacker.requests_to() == 0


def test_an_allowlisted_fhir_server_is_queried_with_the_access_token(settings, clients_file, ec_key, attacker):
    """The counterpart of the test above: the same sink does see calls when it is allowed."""
    attacker.respond("/fhir/Patient/p1", {"resourceType": "Patient", "id": "p1", "gender": "female", "birthDate": "1990-01-01"})
    attacker.respond("/fhir/*", {"resourceType": "Bundle", "type": "searchset", "entry": []})
    app = make_app(
        settings, auth="required", trusted_clients_file=str(clients_file), local_mode=False,
        fhir_servers=(attacker.url("/fhir"),),
    )
    body = hook_request(fhir_server=attacker.url("/fhir"), access_token="allowed-access-token")
    response = app.test_client().post(
        "/cds-services/rpl-patient-view", json=body, headers=bearer(good_token(ec_key, PATIENT_VIEW))
    )
    assert response.status_code == 200, response.get_data(as_text=True)
    assert attacker.requests_to("/fhir/") > 0
    assert all(r.headers.get("Authorization") == "Bearer allowed-access-token" for r in attacker.requests)


# --------------------------------------------------------------------------------------------
# Replay across real gunicorn workers sharing one database


@pytest.mark.slow
def test_replay_is_refused_across_gunicorn_workers(tmp_path, ec_key):
    _replay_across_workers(tmp_path, ec_key, database_url=None)


@pytest.mark.slow
@pytest.mark.postgres
def test_replay_is_refused_across_gunicorn_workers_on_postgresql(tmp_path, ec_key):
    url = os.environ.get("RPL_CDS_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
    try:
        import psycopg

        psycopg.connect(url, connect_timeout=2).close()
    except Exception as error:  # noqa: BLE001
        pytest.skip(f"PostgreSQL not reachable at {url}: {error}")
    _replay_across_workers(tmp_path, ec_key, database_url=url)


def _replay_across_workers(tmp_path, ec_key, database_url):
    from tests.test_gunicorn import start_gunicorn, stop

    path = trusted_clients_file(tmp_path, [{"iss": EHR, "jwks": jwks_of([ec_key])}])
    env = {"RPL_CDS_AUTH": "required", "RPL_CDS_TRUSTED_CLIENTS": str(path), "RPL_CDS_THREADS": "8"}
    if database_url:
        env["RPL_CDS_DATABASE_URL"] = database_url
    proc, base = start_gunicorn(tmp_path, env, workers=2)
    try:
        url = f"{base}/cds-services"
        token = ec_key.token(iss=EHR, aud=url)
        assert requests.get(url, headers=bearer(token), timeout=10).status_code == 200
        assert requests.get(url, headers=bearer(token), timeout=10).status_code == 401

        for _round in range(3):
            token = ec_key.token(iss=EHR, aud=url)
            with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:
                statuses = list(pool.map(
                    lambda _: requests.get(url, headers=bearer(token), timeout=20).status_code, range(16)
                ))
            assert sorted(statuses) == [200] + [401] * 15, statuses
    finally:
        stop(proc)


# --------------------------------------------------------------------------------------------


def _segment(token: str, index: int) -> str:
    import base64

    part = token.split(".")[index]
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)).decode()


def _b64json(obj: dict) -> str:
    import base64

    return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()


def test_create_app_accepts_tuning_from_flask_config(settings, clients_file):
    required = dataclasses.replace(settings, auth="required", trusted_clients_file=str(clients_file))
    app = create_app({"TESTING": True, "RPL_SETTINGS": required, "RPL_JWKS_MIN_REFETCH_SECONDS": 5})
    assert app.extensions["rpl_auth"].jwks_min_refetch_seconds == 5
