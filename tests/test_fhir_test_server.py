"""The FHIR test server itself (tests/fhir_server): it must behave like a FHIR R4 server where the
service relies on it, or every integration test built on it proves nothing."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
import uuid

import pytest
import requests

from tests.support import fhir_server as support
from tests.support.fhir_server import FhirLoadError, FhirServerUnavailable, transaction

LOINC = "http://loinc.org"
TSH = "3016-3"
FT4 = "3024-7"


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def observation(patient_id: str, code: str, date: str, system: str = LOINC) -> dict:
    return {
        "resourceType": "Observation",
        "id": new_id("obs"),
        "status": "final",
        "code": {"coding": [{"system": system, "code": code}]},
        "subject": {"reference": f"Patient/{patient_id}"},
        "effectiveDateTime": date,
    }


def ids(bundle: dict) -> set[str]:
    return {entry["resource"]["id"] for entry in bundle.get("entry", [])}


def link(bundle: dict, relation: str) -> str | None:
    return next((item["url"] for item in bundle.get("link", []) if item["relation"] == relation), None)


def test_metadata_is_an_r4_capability_statement(fhir_server):
    response = fhir_server.get("metadata")
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("application/fhir+json")
    body = response.json()
    assert body["resourceType"] == "CapabilityStatement"
    assert body["fhirVersion"] == "4.0.1"


def test_read_returns_the_stored_resource_and_404_outcome_when_unknown(fhir_server):
    patient_id = new_id("p")
    fhir_server.load(transaction([{"resourceType": "Patient", "id": patient_id, "gender": "female"}]))

    found = fhir_server.get(f"Patient/{patient_id}")
    assert found.status_code == 200
    assert found.json()["gender"] == "female"
    assert found.headers["ETag"].startswith('W/"')

    missing = fhir_server.get(f"Patient/{new_id('nobody')}")
    assert missing.status_code == 404
    assert missing.json()["resourceType"] == "OperationOutcome"


def test_search_by_patient_and_code_finds_exactly_that_patients_coded_observations(fhir_server):
    patient_id, other_id = new_id("p"), new_id("p")
    tsh = [observation(patient_id, TSH, "2024-01-01"), observation(patient_id, TSH, "2024-03-01")]
    noise = [observation(patient_id, FT4, "2024-01-01"), observation(other_id, TSH, "2024-01-01")]
    fhir_server.load(transaction([
        {"resourceType": "Patient", "id": patient_id}, {"resourceType": "Patient", "id": other_id},
        *tsh, *noise,
    ]))

    for query in (f"code={LOINC}|{TSH}", f"code=http%3A%2F%2Floinc.org%7C{TSH}"):
        bundle = fhir_server.get(f"Observation?patient={patient_id}&{query}").json()
        assert bundle["type"] == "searchset"
        assert ids(bundle) == {o["id"] for o in tsh}
        assert bundle["total"] == 2
        assert all(e["fullUrl"] == f"{fhir_server.base_url}/Observation/{e['resource']['id']}" for e in bundle["entry"])
        assert link(bundle, "self").startswith(f"{fhir_server.base_url}/Observation?")
        assert link(bundle, "next") is None  # no default page size on this server


def test_explicit_count_pages_with_next_links_through_all_matches(fhir_server):
    patient_id = new_id("p")
    stored = [observation(patient_id, TSH, f"2024-0{month}-01") for month in range(1, 6)]
    fhir_server.load(transaction([{"resourceType": "Patient", "id": patient_id}, *stored]))

    pages = list(_follow(fhir_server, f"Observation?patient={patient_id}&_count=2&_sort=date"))

    assert [len(page.get("entry", [])) for page in pages] == [2, 2, 1]
    assert set().union(*(ids(page) for page in pages)) == {o["id"] for o in stored}
    assert link(pages[1], "previous") is not None
    first_dates = [e["resource"]["effectiveDateTime"] for e in pages[0]["entry"]]
    assert first_dates == sorted(first_dates)


def test_paged_server_gives_searches_without_count_a_small_page_size(fhir_server_paged):
    patient_id = new_id("p")
    stored = [observation(patient_id, TSH, f"2024-0{month}-01") for month in range(1, 6)]
    fhir_server_paged.load(transaction([{"resourceType": "Patient", "id": patient_id}, *stored]))

    pages = list(_follow(fhir_server_paged, f"Observation?patient={patient_id}"))

    assert len(pages) == 3
    assert all(len(page.get("entry", [])) <= support.PAGED_DEFAULT_COUNT for page in pages)
    assert set().union(*(ids(page) for page in pages)) == {o["id"] for o in stored}


def test_transaction_rewrites_urn_uuid_references_to_the_new_ids(fhir_server):
    patient_urn = f"urn:uuid:{uuid.uuid4()}"
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"fullUrl": patient_urn, "resource": {"resourceType": "Patient"},
             "request": {"method": "POST", "url": "Patient"}},
            {"resource": {"resourceType": "Observation", "status": "final",
                          "code": {"coding": [{"system": LOINC, "code": TSH}]},
                          "subject": {"reference": patient_urn}},
             "request": {"method": "POST", "url": "Observation"}},
        ],
    }
    reply = fhir_server.load(bundle)

    assert reply["type"] == "transaction-response"
    patient_ref = reply["entry"][0]["response"]["location"]  # "Patient/<new id>"
    new_patient_id = patient_ref.split("/")[1]
    found = fhir_server.get(f"Observation?patient={new_patient_id}").json()
    assert [e["resource"]["subject"]["reference"] for e in found["entry"]] == [f"Patient/{new_patient_id}"]


def test_load_raises_when_an_entry_fails(fhir_server):
    bundle = {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [{"request": {"method": "GET", "url": f"Patient/{new_id('nobody')}"}}],
    }
    with pytest.raises(FhirLoadError, match="404"):
        fhir_server.load(bundle)


def test_errors_are_operation_outcomes(fhir_server):
    bad_json = requests.post(fhir_server.base_url, data=b"{not json",
                             headers={"Content-Type": "application/fhir+json"}, timeout=10)
    assert bad_json.status_code == 400
    assert bad_json.json()["resourceType"] == "OperationOutcome"

    outside = requests.get(fhir_server.base_url.removesuffix("/fhir") + "/elsewhere", timeout=10)
    assert outside.status_code == 404
    assert outside.json()["resourceType"] == "OperationOutcome"


def test_server_exits_when_the_process_that_started_it_dies():
    """The stdin guard: a crashed test runner must not leave orphan servers behind."""
    script = textwrap.dedent(
        """
        import os
        from tests.support.fhir_server import running_fhir_server
        with running_fhir_server() as server:
            print(server.process.pid, flush=True)
            os._exit(1)  # no cleanup, like a killed runner
        """
    )
    parent = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                            cwd=support.SERVER_DIR.parent.parent)
    node_pid = int(parent.stdout.split()[0])
    deadline = time.monotonic() + 5
    while _alive(node_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(node_pid)


def test_missing_node_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.delenv("FHIR_TEST_NODE", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(FhirServerUnavailable, match="node is not installed"):
        with support.running_fhir_server():
            pass


def test_missing_node_modules_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(support, "SERVER_DIR", tmp_path)
    with pytest.raises(FhirServerUnavailable, match="npm ci"):
        with support.running_fhir_server():
            pass


def _follow(server, relative_url):
    response = server.get(relative_url)
    while True:
        assert response.status_code == 200
        page = response.json()
        yield page
        next_url = link(page, "next")
        if next_url is None:
            return
        assert next_url.startswith(server.base_url + "/")
        response = server.get(next_url.removeprefix(server.base_url + "/"))


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split()[2] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


# --- FHIR_SEED and FHIR_WORKERS (the benchmark's server, answering concurrent requests) ---------


def _seed_file(tmp_path, patient_id: str, observations: int) -> tuple:
    resources = [{"resourceType": "Patient", "id": patient_id, "gender": "female"}]
    resources += [observation(patient_id, TSH, f"2024-01-{day:02d}") for day in range(1, observations + 1)]
    bundle = transaction(resources)
    bundle["type"] = "batch"
    path = tmp_path / "seed.json"
    path.write_text(json.dumps(bundle))
    return path, {r["id"] for r in resources[1:]}


def test_seeded_cluster_answers_every_connection_with_the_same_data(tmp_path):
    """Each worker loads the seed itself: whichever worker a connection reaches, the data is there."""
    patient_id = new_id("pat")
    seed, observation_ids = _seed_file(tmp_path, patient_id, 3)
    with support.running_fhir_server(seed=seed, workers=2) as server:
        answered_by = set()
        for _ in range(6):  # new connections are shared out among the workers in turn
            response = requests.get(f"{server.base_url}/Observation?patient={patient_id}", timeout=10,
                                    headers={"Connection": "close"})
            assert response.status_code == 200
            assert ids(response.json()) == observation_ids
            answered_by.add(response.headers["X-Fhir-Worker"])
        assert len(answered_by) == 2
    deadline = time.monotonic() + 5  # stopping the server stops every worker
    while any(_alive(int(pid)) for pid in answered_by) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(int(pid)) for pid in answered_by)


def test_seeded_cluster_refuses_writes_with_an_operation_outcome(tmp_path):
    patient_id = new_id("pat")
    seed, _ = _seed_file(tmp_path, patient_id, 1)
    with support.running_fhir_server(seed=seed, workers=2) as server:
        response = requests.post(f"{server.base_url}/Patient", json={"resourceType": "Patient"}, timeout=10,
                                 headers={"Content-Type": "application/fhir+json"})
        assert response.status_code == 405
        assert response.headers["Allow"] == "GET"
        outcome = response.json()
        assert outcome["resourceType"] == "OperationOutcome"
        assert "read-only" in outcome["issue"][0]["details"]["text"]


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize(
    "content, reason",
    [
        (json.dumps({"resourceType": "Bundle", "type": "batch", "entry": [
            {"resource": {"resourceType": "Patient", "id": "p1"}, "request": {"method": "PUT", "url": "Patient/other"}},
        ]}), "not loaded in full: .*Incorrect resource ID"),
        (json.dumps({"resourceType": "Bundle", "type": "searchset"}), "not loaded in full: .*bundle type"),
        ("{not json", "could not be read"),
    ],
)
def test_a_seed_that_does_not_load_stops_the_server_with_a_clear_error(tmp_path, workers, content, reason):
    seed = tmp_path / "seed.json"
    seed.write_text(content)
    with pytest.raises(FhirServerUnavailable, match=f"FHIR_SEED .*{reason}"):
        with support.running_fhir_server(seed=seed, workers=workers):
            pass


def test_several_workers_without_a_seed_is_a_clear_error():
    with pytest.raises(FhirServerUnavailable, match="FHIR_WORKERS > 1 needs FHIR_SEED"):
        with support.running_fhir_server(workers=2):
            pass
