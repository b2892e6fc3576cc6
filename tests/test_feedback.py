"""Feedback end to end, through the real hook and feedback endpoints, on SQLite and on the real
PostgreSQL: a card is issued, feedback is stored once, the overridden warning is not repeated for
the same patient (but is for another patient, and again after the memory period), the report
counts it; select->sign de-duplication; validation; and a database outage."""

from __future__ import annotations

import dataclasses
import json
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from tests.assertions import assert_outcome
from service import create_app
from service.validation import validator
from tests.hookdata import full_prefetch, hook_request, miscarriage, patient, service_request
from tests.test_store import absent_postgres_database, backend_url, count_rows  # noqa: F401

THROMBOPHILIA = ("http://loinc.org", "21668-9", "Factor V Leiden")
REASON_SYSTEM = "https://example.org/cds-hooks/override-reason"


def store_app(settings, url: str, **config):
    app = create_app(
        {"TESTING": True, "RPL_SETTINGS": dataclasses.replace(settings, database_url=url), **config}
    )
    assert "rpl_store" in app.extensions, "create_app must call service.store.init_app(app)"
    app.extensions["rpl_store"].retry_after_failure_s = 0  # retry the database on every request
    return app


def rpl_prefetch(patient_id: str) -> dict:
    losses = [
        miscarriage(f"{patient_id}-c1", "2023-03-01", patient_id=patient_id),
        miscarriage(f"{patient_id}-c2", "2024-01-10", patient_id=patient_id),
    ]
    return full_prefetch(losses, patient(patient_id))


def thrombophilia_order(patient_id: str, order_id: str = "o1", **extra) -> dict:
    return service_request(
        order_id, *THROMBOPHILIA, subject={"reference": f"Patient/{patient_id}"}, **extra
    )


def call_hook(client, hook: str, patient_id: str = "p1", *, encounter: str | None = "enc-1",
              order: dict | None = None) -> list[dict]:
    body = hook_request(
        hook,
        patient_id=patient_id,
        prefetch=rpl_prefetch(patient_id),
        draft_orders=[order or thrombophilia_order(patient_id)] if hook != "patient-view" else None,
    )
    if encounter:
        body["context"]["encounterId"] = encounter
    service = {"patient-view": "rpl-patient-view", "order-select": "rpl-order-select",
               "order-sign": "rpl-order-sign"}[hook]
    response = client.post(f"/cds-services/{service}", json=body)
    assert response.status_code == 200, response.get_data(as_text=True)
    return response.get_json()["cards"]


def warnings(cards: list[dict]) -> list[dict]:
    return [c for c in cards if c["source"].get("topic", {}).get("code") == "not-recommended-test"]


def removal_suggestion(card: dict) -> dict:
    return next(
        s for s in card["suggestions"] if any(a["type"] == "delete" for a in s["actions"])
    )


def stamp(moment: datetime | None = None) -> str:
    return (moment or datetime.now(UTC)).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def overridden(card: dict, *, reason: str | None = "test-indicated", when: str | None = None):
    item = {"card": card["uuid"], "outcome": "overridden", "outcomeTimestamp": when or stamp()}
    if reason:
        # As the CDS Hooks Sandbox sends it: system and code, no display.
        item["overrideReason"] = {"reason": {"system": REASON_SYSTEM, "code": reason}}
    return item


def accepted(card: dict, when: str | None = None) -> dict:
    return {
        "card": card["uuid"],
        "outcome": "accepted",
        "acceptedSuggestions": [{"id": removal_suggestion(card)["uuid"]}],
        "outcomeTimestamp": when or stamp(),
    }


def post_feedback(client, items: list[dict], service: str = "rpl-order-select"):
    return client.post(f"/cds-services/{service}/feedback", json={"feedback": items})


# ---------------------------------------------------------------------------------------------


def test_feedback_flow_end_to_end(settings, backend_url, monkeypatch, capsys):
    app = store_app(settings, backend_url)
    client = app.test_client()
    store = app.extensions["rpl_store"]

    (card,) = warnings(call_hook(client, "order-select", "p1"))
    assert card["indicator"] == "warning"

    item = overridden(card)
    response = post_feedback(client, [item])
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.get_json() == {"received": 1, "stored": 1, "duplicates": 0}
    validator("feedback-response.schema.json").validate(response.get_json())
    # The client may send the same feedback again: acknowledged, not stored twice.
    assert post_feedback(client, [item]).get_json() == {"received": 1, "stored": 0, "duplicates": 1}
    assert count_rows(backend_url, "rpl_feedback") == 1

    # Same patient, another ordering session: the overridden warning is not repeated, neither at
    # select nor at sign; the patient-view summary mentions the override instead.
    assert warnings(call_hook(client, "order-select", "p1", encounter="enc-2")) == []
    assert warnings(call_hook(client, "order-sign", "p1", encounter="enc-3")) == []
    summary = next(
        c for c in call_hook(client, "patient-view", "p1")
        if c["source"]["topic"]["code"] == "rpl-summary"
    )
    assert "overschreven op" in summary["detail"]  # "overridden on <date>" (Dutch default)

    # Another patient is warned as usual, and accepts the removal.
    (other,) = warnings(call_hook(client, "order-select", "p2"))
    other_summary = next(
        c for c in call_hook(client, "patient-view", "p2")
        if c["source"]["topic"]["code"] == "rpl-summary"
    )
    assert "overschreven op" not in other_summary["detail"]
    assert post_feedback(client, [accepted(other)]).get_json()["stored"] == 1

    # After the memory period (180 days) the warning comes back for the first patient.
    real_now = store.clock()
    store.clock = lambda: real_now + timedelta(days=181)
    (again,) = warnings(call_hook(client, "order-select", "p1", encounter="enc-4"))
    store.clock = lambda: real_now + timedelta(days=179)
    assert warnings(call_hook(client, "order-select", "p1", encounter="enc-5")) == []
    store.clock = lambda: real_now

    # The report: 3 warnings shown; 1 overridden (with its reason), 1 accepted and removed, 1
    # without feedback.
    monkeypatch.setenv("RPL_CDS_DATABASE_URL", backend_url)
    monkeypatch.setenv("RPL_CDS_AUTH", "disabled")
    monkeypatch.setenv("RPL_CDS_PSEUDONYM_SECRET", settings.pseudonym_secret)
    from service.cli import main

    # The report is another process: it sees what the hooks' card writer has committed.
    store.wait_for_recording()
    assert main(["report", "--format", "json"]) == 0
    report = json.loads(capsys.readouterr().out)
    (rule,) = [r for r in report["rules"] if r["ruleId"] == "not-recommended-test"]
    assert rule == {
        "ruleId": "not-recommended-test",
        "shown": 3,
        "accepted": 1,
        "overridden": 1,
        "ignored": 1,
        "lowValueOrdersRemoved": 1,
        "overriddenByReason": [{"reason": f"{REASON_SYSTEM}|test-indicated", "count": 1}],
    }
    assert again["uuid"] not in (card["uuid"], other["uuid"])
    assert main(["report", "--format", "csv"]) == 0
    csv_lines = capsys.readouterr().out.splitlines()
    assert f"not-recommended-test,3,1,1,1,1,{REASON_SYSTEM}|test-indicated=1" in csv_lines
    since = (real_now + timedelta(days=2)).date().isoformat()
    assert main(["report", "--since", since, "--format", "json"]) == 0
    later = json.loads(capsys.readouterr().out)
    assert later["since"] == since
    assert [(r["ruleId"], r["shown"], r["ignored"]) for r in later["rules"]] == [
        ("not-recommended-test", 1, 1)
    ]
    assert main(["report"]) == 0
    assert "not-recommended-test" in capsys.readouterr().out


def test_select_then_sign_shows_the_warning_once(settings, backend_url):
    client = store_app(settings, backend_url).test_client()
    assert len(warnings(call_hook(client, "order-select", "p1", encounter="enc-1"))) == 1
    assert warnings(call_hook(client, "order-sign", "p1", encounter="enc-1")) == []
    # The order changed between select and sign (a reason was added): shown again.
    changed = thrombophilia_order("p1", reasonCode=[{"text": "herhaalde miskraam, work-up"}])
    assert len(warnings(call_hook(client, "order-sign", "p1", encounter="enc-1", order=changed))) == 1
    # Another encounter, or another patient: shown.
    assert len(warnings(call_hook(client, "order-sign", "p1", encounter="enc-9"))) == 1
    assert len(warnings(call_hook(client, "order-sign", "p3", encounter="enc-1"))) == 1


@pytest.mark.parametrize("select_card", ["still queued", "written"])
def test_sign_right_after_select_is_deduplicated_whether_or_not_the_card_is_written(
    settings, backend_url, select_card
):
    app = store_app(settings, backend_url)
    store = app.extensions["rpl_store"]
    client = app.test_client()
    if select_card == "still queued":
        store.card_writer.max_delay_s = 60  # the batch stays open for the whole test
    assert len(warnings(call_hook(client, "order-select", "p1", encounter="enc-1"))) == 1
    if select_card == "written":
        store.wait_for_recording()
        assert count_rows(backend_url, "rpl_card") >= 1
    else:
        assert store.card_writer.pending >= 1 and count_rows(backend_url, "rpl_card") == 0
    assert warnings(call_hook(client, "order-sign", "p1", encounter="enc-1")) == []
    assert len(warnings(call_hook(client, "order-sign", "p1", encounter="enc-2"))) == 1
    store.card_writer.max_delay_s = 0.05
    store.wait_for_recording()


def test_without_an_encounter_select_and_sign_still_match_and_stay_apart_from_encounters(
    settings, backend_url
):
    app = store_app(settings, backend_url)
    client = app.test_client()
    assert len(warnings(call_hook(client, "order-select", "p1", encounter=None))) == 1
    app.extensions["rpl_store"].wait_for_recording()  # from the database, not the queue
    assert warnings(call_hook(client, "order-sign", "p1", encounter=None)) == []
    assert len(warnings(call_hook(client, "order-sign", "p1", encounter="enc-1"))) == 1


def test_select_sign_deduplication_can_be_switched_off(settings, tmp_path):
    url = f"sqlite:///{tmp_path / 'dedup-off.sqlite'}"
    client = store_app(settings, url, RPL_SELECT_SIGN_DEDUP=False).test_client()
    assert len(warnings(call_hook(client, "order-select", "p1"))) == 1
    assert len(warnings(call_hook(client, "order-sign", "p1"))) == 1


def test_batches_are_all_or_nothing(client):
    cards = [warnings(call_hook(client, "order-select", f"b{i}"))[0] for i in range(3)]
    bad = {"card": cards[2]["uuid"], "outcome": "accepted",
           "acceptedSuggestions": [{"id": str(uuid.uuid4())}], "outcomeTimestamp": stamp()}
    response = post_feedback(client, [overridden(cards[0]), accepted(cards[1]), bad])
    assert_outcome(response, 400, "feedback[2].acceptedSuggestions[0].id")
    store = client.application.extensions["rpl_store"]
    assert list(store.card_outcomes()) and all(o.outcome is None for o in store.card_outcomes())
    # A batch of three plus a duplicate of the first (CDS Hooks T-F4): three rows.
    batch = [overridden(cards[0], reason=None), accepted(cards[1]), accepted(cards[2])]
    response = post_feedback(client, batch + [batch[0]])
    assert response.get_json() == {"received": 4, "stored": 3, "duplicates": 1}


@pytest.mark.parametrize(
    ("mutate", "fragment"),
    [
        (lambda i: i.pop("acceptedSuggestions"), "feedback[0].acceptedSuggestions"),
        (lambda i: i.update(acceptedSuggestions=[]), "feedback[0].acceptedSuggestions"),
        (lambda i: i.update(outcome="ignored"), "feedback[0].outcome"),
        (lambda i: i.pop("outcomeTimestamp"), "feedback[0].outcomeTimestamp"),
        (lambda i: i.update(outcomeTimestamp="2021-12-11 10:05"), "feedback[0].outcomeTimestamp"),
        (lambda i: i.update(outcomeTimestamp="2021-02-30T10:05:31Z"), "feedback[0].outcomeTimestamp"),
        (lambda i: i.update(outcomeTimestamp="2021-12-11T10:05:31"), "feedback[0].outcomeTimestamp"),
        (lambda i: i.update(card=str(uuid.uuid4())), "feedback[0].card"),
        (lambda i: i.pop("card"), "feedback[0].card"),
        (lambda i: i.update(acceptedSuggestions=[{"id": "nope"}]), "feedback[0].acceptedSuggestions[0].id"),
        (lambda i: i.update(acceptedSuggestions=[{}]), "feedback[0].acceptedSuggestions[0].id"),
    ],
)
def test_invalid_feedback_is_400_naming_item_and_field(client, mutate, fragment):
    (card,) = warnings(call_hook(client, "order-select", "p1"))
    item = accepted(card)
    mutate(item)
    assert_outcome(post_feedback(client, [item]), 400, fragment)
    assert all(o.outcome is None for o in client.application.extensions["rpl_store"].card_outcomes())


def test_feedback_envelope_errors(client):
    assert_outcome(client.post("/cds-services/nope/feedback", json={"feedback": []}), 404, "nope")
    url = "/cds-services/rpl-order-select/feedback"
    assert_outcome(client.post(url, data="x", content_type="text/plain"), 415)
    assert_outcome(client.post(url, data="{", content_type="application/json"), 400, "not valid JSON")
    assert_outcome(client.post(url, json=[{"card": "x"}]), 400)
    assert_outcome(client.post(url, json={"cards": []}), 400, "feedback")
    limit = client.application.config["RPL_SETTINGS"].max_body_bytes
    big = json.dumps({"feedback": [], "pad": "a" * limit})
    assert_outcome(client.post(url, data=big, content_type="application/json"), 413)
    assert client.post(url, json={"feedback": []}).get_json()["received"] == 0


def test_feedback_must_come_to_the_service_that_issued_the_card(client):
    (card,) = warnings(call_hook(client, "order-select", "p1"))
    response = post_feedback(client, [overridden(card)], service="rpl-order-sign")
    assert_outcome(response, 400, "feedback[0].card", "rpl-order-select")


def test_timestamps_in_other_notations_are_the_same_feedback(client):
    (card,) = warnings(call_hook(client, "order-select", "p1"))
    first = overridden(card, when="2025-01-02T10:00:00Z")
    same = overridden(card, when="2025-01-02T11:00:00.000+01:00")
    assert post_feedback(client, [first]).get_json()["stored"] == 1
    assert post_feedback(client, [same]).get_json()["stored"] == 0
    leap = overridden(card, when="2016-12-31T23:59:60Z")
    assert post_feedback(client, [leap]).get_json()["stored"] == 1


def test_override_comment_is_not_stored(client, settings):
    (card,) = warnings(call_hook(client, "order-select", "p1"))
    item = overridden(card)
    item["overrideReason"]["userComment"] = "Mevrouw Jansen wil het toch"
    assert post_feedback(client, [item]).status_code == 200
    database = settings.database_url.removeprefix("sqlite:///")
    with open(database, "rb") as handle:
        contents = handle.read()
    for suffix in ("-wal",):
        try:
            with open(database + suffix, "rb") as handle:
                contents += handle.read()
        except FileNotFoundError:
            pass
    assert b"Jansen" not in contents and card["uuid"].encode() in contents


# ---------------------------------------------------------------------------------------------
# The database goes away and comes back


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database_that_comes_back(request, tmp_path):
    """(url, bring_back): a database that is unavailable until bring_back() is called."""
    if request.param == "sqlite":
        directory = tmp_path / "not-yet"
        yield f"sqlite:///{directory / 'db.sqlite'}", directory.mkdir
        return
    with absent_postgres_database() as (url, create):
        yield url, create


def test_database_outage_hooks_answer_feedback_503_then_recovery(settings, database_that_comes_back):
    url, bring_back = database_that_comes_back
    app = store_app(settings, url)
    client = app.test_client()

    (card,) = warnings(call_hook(client, "order-select", "p1"))  # 200 with its warning
    response = post_feedback(client, [overridden(card)])
    assert_outcome(response, 503)
    assert int(response.headers["Retry-After"]) > 0
    assert_outcome(client.get("/analytics"), 503)

    bring_back()  # no restart: the next requests migrate and use the database
    (card,) = warnings(call_hook(client, "order-select", "p1"))
    assert post_feedback(client, [overridden(card)]).get_json()["stored"] == 1
    assert warnings(call_hook(client, "order-select", "p1", encounter="enc-2")) == []
    assert count_rows(url, "rpl_card") == 1
