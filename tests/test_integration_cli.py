"""The integrator commands against real processes: `rpl-cds scenarios load` into the Node FHIR
server, then `rpl-cds call` (with and without prefetch, signed and unsigned) against gunicorn."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from service.cli import main
from service.scenarios import scenario_names
from tests.support_jwt import RecordingServer, SigningKey, trusted_clients_file
from tests.test_gunicorn import free_port, stop
from tests.test_integration_e2e import start_service
from tests.test_scenarios import check_expectations, rolled_scenario, service_today

RPL_CDS = str(Path(sys.executable).with_name("rpl-cds"))
ISSUER = "https://ehr.example.org/cds-client"


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    proc, base = start_service(
        tmp_path_factory.mktemp("cli"), {"RPL_CDS_LOCAL_MODE": "1", "RPL_CDS_SELECT_SIGN_DEDUP": "0"}
    )
    yield base
    stop(proc)


@pytest.fixture(scope="module")
def loaded_fhir_server(fhir_server):
    """All scenarios loaded with the real console command (a subprocess, as a user runs it)."""
    done = subprocess.run(
        [RPL_CDS, "scenarios", "load", "--fhir-server", fhir_server.base_url],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    for name in scenario_names():
        assert f"loaded {name}: Patient/{name} (" in done.stdout
    assert f"{len(scenario_names())} of {len(scenario_names())} scenarios loaded" in done.stderr
    return fhir_server


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def call_json(capsys, service: str, fhir: str, hook: str, scenario: str, *extra: str) -> dict:
    code, out, err = run_cli(capsys, "call", "--hook", hook, "--fhir-server", fhir, "--scenario", scenario,
                             "--service", service, "--json", *extra)
    assert code == 0, err
    return json.loads(out)


def entry_of(scenario: str, hook: str, number: int = 1) -> dict:
    entries = [h for h in rolled_scenario(scenario, service_today())["hooks"] if h["hook"] == hook]
    return entries[number - 1]


@pytest.mark.parametrize("mode", ["--prefetch", "--no-prefetch"])
@pytest.mark.parametrize(
    ("scenario", "hook", "entry"),
    [
        ("apl-persistent-84-days", "patient-view", 1),
        ("apl-persistent-84-days", "order-sign", 1),
        ("order-scope-select-vs-sign", "order-select", 2),
        ("demo-three-losses", "order-select", 1),
    ],
)
def test_call_prints_the_expected_cards(capsys, service, loaded_fhir_server, mode, scenario, hook, entry):
    base = loaded_fhir_server.base_url
    answer = call_json(capsys, service, base, hook, scenario, mode, "--entry", str(entry))
    found = [card["source"]["topic"]["code"] for card in answer["cards"]]
    check_expectations(entry_of(scenario, hook, entry), found, f"{scenario} {hook} {mode}")
    # The readable output shows every card's summary and rule.
    code, out, err = run_cli(capsys, "call", "--hook", hook, "--fhir-server", base, "--scenario", scenario,
                             "--service", service, mode, "--entry", str(entry))
    assert code == 0, err
    assert out.startswith(f"{len(answer['cards'])} card")
    for card in answer["cards"]:
        assert card["summary"] in out
        assert f"rule: {card['source']['topic']['code']}" in out
    if hook == "order-select" and scenario == "demo-three-losses":
        assert "delete ServiceRequest/demo-three-losses-fvl" in out  # the suggested action


def test_console_command_calls_with_draft_orders_from_a_file(service, loaded_fhir_server, tmp_path):
    """The installed `rpl-cds` with --patient, --draft-orders FILE and --selections, as documented."""
    entry = entry_of("order-scope-select-vs-sign", "order-select", 1)
    orders = tmp_path / "drafts.json"
    orders.write_text(json.dumps({"resourceType": "Bundle", "type": "collection",
                                  "entry": [{"resource": o} for o in entry["draftOrders"]]}))
    nk_order = "ServiceRequest/order-scope-select-vs-sign-nk"
    done = subprocess.run(
        [RPL_CDS, "call", "--hook", "order-select", "--fhir-server", loaded_fhir_server.base_url,
         "--patient", "order-scope-select-vs-sign", "--draft-orders", str(orders),
         "--selections", nk_order, "--service", service],
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "rule: not-recommended-test" in done.stdout
    assert f"delete {nk_order}" in done.stdout


def test_service_fhir_server_is_what_the_service_is_told(capsys, service, loaded_fhir_server):
    """docker compose case: the tool and the service reach the FHIR server under different URLs."""
    unreachable_for_the_tool = f"http://127.0.0.1:{free_port()}/fhir"
    code, out, err = run_cli(capsys, "call", "--hook", "patient-view", "--fhir-server", unreachable_for_the_tool,
                             "--service-fhir-server", loaded_fhir_server.base_url, "--no-prefetch",
                             "--scenario", "demo-three-losses", "--service", service, "--json")
    assert code == 0, err
    found = [card["source"]["topic"]["code"] for card in json.loads(out)["cards"]]
    check_expectations(entry_of("demo-three-losses", "patient-view"), found, "service-fhir-server")


def test_call_shows_the_operation_outcome_and_fails_when_data_is_unavailable(capsys, service):
    closed = f"http://127.0.0.1:{free_port()}/fhir"
    code, out, err = run_cli(capsys, "call", "--hook", "patient-view", "--fhir-server", closed,
                             "--patient", "demo-three-losses", "--no-prefetch", "--service", service)
    assert code == 1
    assert out == ""
    assert "HTTP 412" in err and "prefetch.conditions" in err


def test_call_with_prefetch_omits_keys_the_fhir_server_cannot_answer(capsys, service):
    closed = f"http://127.0.0.1:{free_port()}/fhir"
    code, out, err = run_cli(capsys, "call", "--hook", "patient-view", "--fhir-server", closed,
                             "--patient", "demo-three-losses", "--service", service)
    assert code == 1
    assert "prefetch key conditions omitted" in err and "HTTP 412" in err


def test_scenarios_load_reports_failed_entries(capsys):
    """A server that rejects one entry of the transaction: exit 1, the failing entry named."""
    with RecordingServer() as fhir:
        fhir.respond("/fhir", {"resourceType": "Bundle", "type": "transaction-response", "entry": [
            {"response": {"status": "200 OK"}},
            {"response": {"status": "400 Bad Request", "outcome": {
                "resourceType": "OperationOutcome",
                "issue": [{"severity": "error", "code": "invalid", "diagnostics": "unknown code system"}]}}},
        ]})
        code, out, err = run_cli(capsys, "scenarios", "load", "--fhir-server", fhir.url("/fhir"),
                                 "--scenario", "biochemical-loss-counted", "--token", "secret-token-123")
        posted = [r for r in fhir.requests if r.method == "POST"]
    assert code == 1
    assert "FAILED biochemical-loss-counted" in err
    assert "Condition/biochemical-loss-counted-loss-1: status 400 Bad Request unknown code system" in err
    assert posted and posted[0].headers.get("Authorization") == "Bearer secret-token-123"
    assert json.loads(posted[0].body)["type"] == "transaction"
    assert "secret-token-123" not in out + err


def test_scenarios_list_names_every_scenario(capsys):
    code, out, _ = run_cli(capsys, "scenarios", "list", "--json")
    assert code == 0
    rows = json.loads(out)
    assert [row["name"] for row in rows] == scenario_names()
    assert all(row["patientId"] == row["name"] for row in rows)


def test_usage_errors_exit_2(capsys):
    code, _, err = run_cli(capsys, "call", "--hook", "order-sign", "--fhir-server", "http://127.0.0.1:9/fhir",
                           "--patient", "p1")
    assert code == 2 and "needs draft orders" in err
    code, _, err = run_cli(capsys, "call", "--hook", "patient-view", "--fhir-server", "http://127.0.0.1:9/fhir",
                           "--patient", "p1", "--sign-key", "key.pem")
    assert code == 2 and "--issuer and --kid" in err


# --- signed calls against a service that requires CDS Hooks JWTs ------------------------------------


@pytest.fixture(scope="module")
def signing_keys(tmp_path_factory):
    """An EC P-384 and an RSA key of one EHR; private keys as PEM files, public keys registered."""
    folder = tmp_path_factory.mktemp("keys")
    keys = {"ec": SigningKey.ec_p384("ehr-ec-1"), "rsa": SigningKey.rsa("ehr-rsa-1")}
    paths = {}
    for name, key in keys.items():
        path = folder / f"{name}.pem"
        path.write_bytes(key.private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        paths[name] = path
    registry = trusted_clients_file(folder, [{"iss": ISSUER, "name": "test EHR",
                                              "jwks": {"keys": [k.public_jwk() for k in keys.values()]}}])
    return keys, paths, registry


@pytest.fixture(scope="module")
def secured_service(tmp_path_factory, signing_keys, fhir_server):
    _, _, registry = signing_keys
    proc, base = start_service(tmp_path_factory.mktemp("cli-auth"), {
        "RPL_CDS_AUTH": "required",
        "RPL_CDS_TRUSTED_CLIENTS": str(registry),
        "RPL_CDS_FHIR_SERVERS": fhir_server.base_url,
    })
    yield base
    stop(proc)


@pytest.mark.parametrize(("key", "mode"), [("ec", "--prefetch"), ("rsa", "--no-prefetch")])
def test_signed_call_is_accepted_by_a_service_that_requires_jwts(capsys, secured_service, signing_keys,
                                                                 loaded_fhir_server, key, mode):
    keys, paths, _ = signing_keys
    code, out, err = run_cli(
        capsys, "call", "--hook", "patient-view", "--fhir-server", loaded_fhir_server.base_url,
        "--scenario", "demo-three-losses", "--service", secured_service, mode, "--json",
        "--sign-key", str(paths[key]), "--issuer", ISSUER, "--kid", keys[key].kid,
    )
    assert code == 0, err
    found = [card["source"]["topic"]["code"] for card in json.loads(out)["cards"]]
    check_expectations(entry_of("demo-three-losses", "patient-view"), found, f"signed {key}")


def test_unsigned_call_to_a_service_that_requires_jwts_fails_with_401(capsys, secured_service, loaded_fhir_server):
    code, out, err = run_cli(capsys, "call", "--hook", "patient-view", "--fhir-server", loaded_fhir_server.base_url,
                             "--scenario", "demo-three-losses", "--service", secured_service)
    assert code == 1 and out == ""
    assert "HTTP 401" in err
