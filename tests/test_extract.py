"""FHIR -> PatientFacts: for each fact, a record that sets it and a close one that does not."""

from __future__ import annotations

import copy
import time
from datetime import date, timedelta

import pytest

from fhir_mappings.extract import extract_patient_facts, flatten_bundle
from fhir_mappings.facts import Category, InterventionState, LossKind, weeks_days
from tests.fhir_fixtures import (
    ATC,
    ICD10,
    ICD10CM,
    LOINC,
    ORDER_CONTEXT,
    ROLE,
    RXNORM,
    SNOMED,
    bundle,
    cc,
    condition,
    family_history,
    medication_administration,
    medication_request,
    medication_statement,
    observation,
    patient,
    procedure,
    service_request,
)

TODAY = date(2025, 3, 1)

MISCARRIAGE = (SNOMED, "17369002")
ECTOPIC = (SNOMED, "34801009")
MOLAR = (SNOMED, "44782008")
BIOCHEMICAL = (SNOMED, "237243004")
TSH = (LOINC, "3016-3")
DVT = (SNOMED, "128053003")  # a non-RPL reason: any coded reason we do not know is "other"


def facts(*resources, **kwargs):
    return extract_patient_facts(list(resources), today=TODAY, **kwargs)


def miscarriage(onset, **kw):
    return condition(*MISCARRIAGE, onset, clinical=kw.pop("clinical", "resolved"), **kw)


# --- pregnancy losses (A1) ---------------------------------------------------------------------------


def test_two_losses_on_distinct_dates_are_recurrent_miscarriage_one_is_not():
    two = facts(miscarriage("2022-03-01"), miscarriage("2023-06-10"))
    assert (two.loss_count, two.loss_count_basis, two.has_rpl) == (2, "conditions", True)
    one = facts(miscarriage("2022-03-01"))
    assert (one.loss_count, one.has_rpl) == (1, False)


def test_three_losses_count_three_and_two_count_two():
    three = facts(miscarriage("2021-01-05"), miscarriage("2022-03-01"), miscarriage("2023-06-10"))
    assert three.loss_count == 3
    assert facts(miscarriage("2022-03-01"), miscarriage("2023-06-10")).loss_count == 2


def test_records_of_the_same_loss_count_once():
    same_day = facts(miscarriage("2023-06-10"), condition(ICD10, "O03.9", "2023-06-10"))
    assert same_day.loss_count == 1
    incomplete_then_complete = facts(
        condition(SNOMED, "156072005", "2023-06-10"), condition(SNOMED, "156073000", "2023-06-24")
    )
    assert incomplete_then_complete.loss_count == 1
    months_apart = facts(condition(SNOMED, "156072005", "2023-06-10"), condition(SNOMED, "156073000", "2023-10-24"))
    assert months_apart.loss_count == 2


def test_undated_loss_records_each_count():
    assert facts(miscarriage(None), miscarriage(None)).loss_count == 2


def test_ectopic_and_molar_pregnancies_are_listed_but_not_counted():
    f = facts(miscarriage("2021-01-05"), condition(*ECTOPIC, "2022-02-02"), condition(*MOLAR, "2023-03-03"),
              condition(ICD10, "O00.1", "2024-04-04"))
    assert f.loss_count == 1 and not f.has_rpl
    assert sorted(loss.kind.value for loss in f.losses) == ["ectopic", "ectopic", "miscarriage", "molar"]


def test_biochemical_losses_count_per_eshre():
    f = facts(miscarriage("2022-03-01"), condition(*BIOCHEMICAL, "2023-01-15"))
    assert f.loss_count == 2 and f.has_rpl
    assert LossKind.BIOCHEMICAL in {loss.kind for loss in f.losses}


def test_obstetric_history_count_is_used_when_larger_and_the_newest_count_wins():
    f = facts(miscarriage("2022-03-01"), observation(LOINC, "11614-5", "2024-05-01", valueInteger=3))
    assert (f.loss_count, f.loss_count_basis) == (3, "obstetric-history")
    corrected = facts(
        observation(LOINC, "11614-5", "2023-05-01", valueInteger=4),
        observation(LOINC, "11614-5", "2024-05-01", valueQuantity={"value": 2}),
    )
    assert corrected.loss_count == 2
    more_conditions = facts(miscarriage("2021-01-01"), miscarriage("2022-01-01"), miscarriage("2023-01-01"),
                            observation(LOINC, "11614-5", "2024-05-01", valueInteger=2))
    assert (more_conditions.loss_count, more_conditions.loss_count_basis) == (3, "conditions")


@pytest.mark.parametrize("code", [(ICD10, "N96"), (ICD10, "O26.2"), (SNOMED, "102878001"), (SNOMED, "237036002")])
def test_a_recurrent_miscarriage_diagnosis_means_at_least_two(code):
    f = facts(condition(*code, "2024-01-01"))
    assert (f.loss_count, f.loss_count_basis, f.rpl_diagnosis_recorded) == (2, "rpl-diagnosis", True)
    with_three = facts(condition(*code), miscarriage("2021-01-01"), miscarriage("2022-01-01"), miscarriage("2023-01-01"))
    assert (with_three.loss_count, with_three.loss_count_basis) == (3, "conditions")


@pytest.mark.parametrize("verification", ["refuted", "entered-in-error"])
def test_refuted_and_entered_in_error_conditions_are_ignored(verification):
    f = facts(miscarriage("2022-03-01"), miscarriage("2023-06-10", verification=verification),
              condition(ICD10, "N96", verification=verification))
    assert f.loss_count == 1 and not f.rpl_diagnosis_recorded


def test_second_trimester_loss_by_code_or_by_gestational_age():
    assert facts(condition(SNOMED, "85116003", "2023-01-01")).second_trimester_loss
    assert not facts(condition(SNOMED, "19169002", "2023-01-01")).second_trimester_loss
    dated_15_weeks = facts(miscarriage("2023-05-01"),
                           observation(LOINC, "11884-4", "2023-05-01", value=15, unit="wk"))
    assert dated_15_weeks.losses[0].gestational_age_days == weeks_days(15)
    assert dated_15_weeks.second_trimester_loss
    dated_10_weeks = facts(miscarriage("2023-05-01"),
                           observation(LOINC, "11884-4", "2023-04-24", value=9, unit="wk"))
    assert dated_10_weeks.losses[0].gestational_age_days == weeks_days(10)
    assert not dated_10_weeks.second_trimester_loss


# --- patient -------------------------------------------------------------------------------------------


def test_age_and_sex_from_the_patient():
    f = facts(patient("1992-06-15", "female", id="p9"))
    assert (f.age_years, f.sex, f.patient_ref) == (32, "female", "Patient/p9")
    assert facts(patient("1992-03-01")).age_years == 33  # birthday today
    assert facts(patient("1990")).age_years == 35  # partial date: 1 January
    bad = facts(patient("15-06-1992"))
    assert (bad.age_years, bad.skipped_resources) == (None, 1)


# --- current pregnancy ----------------------------------------------------------------------------------


def pregnancy_status(value_code, effective):
    return observation(LOINC, "82810-3", effective, valueCodeableConcept=cc(SNOMED, value_code))


def test_pregnancy_status_observation():
    assert facts(pregnancy_status("77386006", "2025-02-01")).pregnant
    assert not facts(pregnancy_status("60001007", "2025-02-01")).pregnant
    assert not facts(pregnancy_status("77386006", "2023-12-01")).pregnant  # older than any pregnancy
    newest_wins = facts(pregnancy_status("77386006", "2024-12-01"), pregnancy_status("60001007", "2025-02-01"))
    assert not newest_wins.pregnant
    loinc_answer = observation(LOINC, "82810-3", "2025-02-01", valueCodeableConcept=cc(LOINC, "LA15173-0"))
    assert facts(loinc_answer).pregnant


def test_an_active_pregnancy_condition_means_pregnant_a_resolved_one_does_not():
    assert facts(condition(SNOMED, "77386006", "2025-01-10")).pregnant
    resolved = condition(SNOMED, "77386006", "2024-03-10", clinical="resolved", abatementDateTime="2024-11-20")
    assert not facts(resolved).pregnant


@pytest.mark.parametrize(
    "ga_observation",
    [
        observation(LOINC, "11884-4", "2025-02-15", value=8, unit="wk"),
        observation(LOINC, "49051-6", "2025-02-15", value=56, unit="d"),
        observation(SNOMED, "57036006", "2025-02-15", valueString="8+0"),
    ],
)
def test_gestational_age_today_is_advanced_from_the_dating(ga_observation):
    f = facts(ga_observation)
    assert f.pregnant and f.gestational_age_days == weeks_days(8) + 14


def test_due_date_and_last_menstrual_period_date_the_pregnancy():
    due = observation(LOINC, "11778-8", "2025-02-01", valueDateTime="2025-10-01")
    assert facts(due).gestational_age_days == 280 - (date(2025, 10, 1) - TODAY).days
    lmp = observation(SNOMED, "21840007", "2025-02-01", valueDateTime="2025-01-01")
    assert facts(lmp).gestational_age_days == (TODAY - date(2025, 1, 1)).days


def test_a_loss_after_the_pregnancy_was_recorded_ends_it():
    f = facts(pregnancy_status("77386006", "2025-01-10"),
              observation(LOINC, "11884-4", "2025-01-10", value=7, unit="wk"),
              miscarriage("2025-02-20", clinical="active"))
    assert not f.pregnant and f.gestational_age_days is None
    assert f.active_miscarriage


def test_a_dating_noted_at_the_miscarriage_visit_does_not_restart_the_pregnancy():
    f = facts(miscarriage("2025-02-20", clinical="active"),
              observation(LOINC, "11884-4", "2025-02-21", value=9, unit="wk"))
    assert not f.pregnant and f.active_miscarriage
    assert f.active_miscarriage_gestational_age_days == weeks_days(9) - 1


def test_new_pregnancy_after_a_loss_is_dated_from_its_own_dating():
    f = facts(observation(LOINC, "11884-4", "2024-06-01", value=10, unit="wk"),
              miscarriage("2024-06-20"),
              observation(LOINC, "11884-4", "2025-02-22", value=6, unit="wk"))
    assert f.pregnant and f.gestational_age_days == weeks_days(7)


# --- bleeding, intrauterine pregnancy (A7) ------------------------------------------------------------

PREGNANT_8_WEEKS = observation(LOINC, "11884-4", "2025-02-15", value=8, unit="wk")  # day 0 = 2024-12-21


@pytest.mark.parametrize("code", [(SNOMED, "723665008"), (SNOMED, "54048003"), (ICD10, "O20.0"), (ICD10CM, "O20.9")])
def test_bleeding_in_the_current_pregnancy_with_its_gestational_age(code):
    f = facts(PREGNANT_8_WEEKS, condition(*code, "2025-02-20"))
    assert f.vaginal_bleeding
    assert f.bleeding_onset_gestational_age_days == (date(2025, 2, 20) - date(2024, 12, 21)).days


def test_bleeding_before_this_pregnancy_or_when_not_pregnant_does_not_count():
    assert not facts(PREGNANT_8_WEEKS, condition(SNOMED, "723665008", "2024-06-01")).vaginal_bleeding
    assert not facts(condition(SNOMED, "723665008", "2025-02-20")).vaginal_bleeding


def test_intrauterine_pregnancy_on_scan_is_true_only_in_this_pregnancy():
    scan = observation(SNOMED, "55052008", "2025-02-25", valueCodeableConcept=cc(SNOMED, "65727000"))
    assert facts(PREGNANT_8_WEEKS, scan).intrauterine_pregnancy_confirmed is True
    assert facts(PREGNANT_8_WEEKS, condition(SNOMED, "65727000", "2025-02-25")).intrauterine_pregnancy_confirmed
    assert facts(PREGNANT_8_WEEKS).intrauterine_pregnancy_confirmed is None
    old_scan = observation(SNOMED, "55052008", "2024-05-01", valueCodeableConcept=cc(SNOMED, "65727000"))
    assert facts(PREGNANT_8_WEEKS, old_scan).intrauterine_pregnancy_confirmed is None


# --- active miscarriage and anti-D (leaflet) ------------------------------------------------------------


def test_active_miscarriage_within_six_weeks_with_its_gestational_age():
    f = facts(observation(LOINC, "11884-4", "2025-01-20", value=9, unit="wk"), miscarriage("2025-02-20", clinical="active"))
    assert f.active_miscarriage
    assert f.active_miscarriage_gestational_age_days == weeks_days(9) + 31
    assert not facts(miscarriage("2025-01-05", clinical="active")).active_miscarriage  # 55 days ago
    assert not facts(miscarriage("2025-02-20", clinical="resolved")).active_miscarriage


def test_anti_d_given_during_the_current_loss():
    loss = miscarriage("2025-02-20", clinical="active")
    given = medication_administration(ATC, "J06BB01", "2025-02-21")
    assert facts(loss, given).anti_d_given_during_current_loss
    assert not facts(loss, medication_administration(ATC, "J06BB01", "2023-02-21")).anti_d_given_during_current_loss
    assert not facts(loss, medication_administration(ATC, "J06BB01", "2025-02-21", status="not-done")).anti_d_given_during_current_loss
    completed_request = medication_request(ATC, "J06BB01", status="completed", authored="2025-02-20")
    assert facts(loss, completed_request).anti_d_given_during_current_loss
    assert not facts(given).anti_d_given_during_current_loss  # no current loss


# --- RhD -------------------------------------------------------------------------------------------------


def test_rhd_status():
    negative = observation(LOINC, "10331-7", "2020-01-01", valueCodeableConcept=cc(SNOMED, "165746003"))
    positive = observation(LOINC, "10331-7", "2020-01-01", valueCodeableConcept=cc(SNOMED, "165747007"))
    assert facts(negative).rhd_negative is True
    assert facts(positive).rhd_negative is False
    assert facts().rhd_negative is None
    assert facts(observation(LOINC, "10331-7", "2020-01-01", valueString="Negatief")).rhd_negative is True
    panel = observation(LOINC, "882-1", "2020-01-01", component=[
        {"code": cc(LOINC, "10331-7"), "valueCodeableConcept": cc(SNOMED, "165746003")}])
    assert facts(panel).rhd_negative is True
    unverified_answer = observation(LOINC, "10331-7", "2020-01-01", valueCodeableConcept=cc(LOINC, "LA6577-6"))
    assert facts(unverified_answer).rhd_negative is None


# --- thyroid (A2/A3) --------------------------------------------------------------------------------------


def test_an_impossible_value_leaves_out_that_result_only():
    """A negative concentration is a data error: that result is left out, not the panel around
    it, and an integer value is held to the same rule."""
    panel = observation(LOINC, "24348-5", "2024-06-01", component=[
        {"code": cc(*TSH), "valueQuantity": {"value": 2.0, "unit": "mIU/L"}},
        {"code": cc(LOINC, "3024-7"), "valueQuantity": {"value": -1.0, "unit": "pmol/L"}},
    ])
    read = facts(panel)
    assert [r.value for r in read.tsh_results] == [2.0]
    assert read.ft4_results == () and read.skipped_resources == 1
    negative_integer = facts(observation(*TSH, "2024-06-01", valueInteger=-3))
    assert negative_integer.tsh_results == () and negative_integer.skipped_resources == 1


def test_tsh_interpretation_from_the_lab_first_then_from_the_reference_range():
    flagged = facts(observation(*TSH, "2024-06-01", value=3.9, unit="mIU/L", low=0.4, high=4.0, interpretation="H"))
    (tsh,) = flagged.tsh_results
    assert (tsh.value, tsh.unit, tsh.low, tsh.high, tsh.interpretation) == (3.9, "mIU/L", 0.4, 4.0, "H")
    assert tsh.category is Category.TSH and tsh.when == date(2024, 6, 1) and tsh.code == TSH
    by_range = facts(observation(*TSH, value=5.2, unit="mIU/L", low=0.4, high=4.0)).tsh_results[0]
    assert by_range.interpretation == "H"
    normal = facts(observation(*TSH, value=2.0, unit="mIU/L", low=0.4, high=4.0)).tsh_results[0]
    assert normal.interpretation == "N"
    unknown = facts(observation(*TSH, value=2.0, unit="mIU/L")).tsh_results[0]
    assert unknown.interpretation is None
    censored = facts(observation(*TSH, value=0.01, unit="mIU/L", low=0.4, high=4.0,
                                 valueQuantity={"value": 0.01, "comparator": "<", "unit": "mIU/L"})).tsh_results[0]
    assert censored.interpretation == "L"


def test_thyroid_results_newest_first_and_ft4_molar_code():
    f = facts(observation(*TSH, "2023-01-01", value=6.0), observation(*TSH, "2024-01-01", value=3.0),
              observation(LOINC, "14920-3", "2024-01-01", value=9.0, unit="pmol/L", low=12, high=22))
    assert [r.value for r in f.tsh_results] == [3.0, 6.0]
    assert f.ft4_results[0].interpretation == "L" and f.ft4_results[0].category is Category.FT4
    assert f.has_any(Category.TSH, Category.FT4)
    assert {i.state for i in f.interventions_in(Category.TSH)} == {InterventionState.DONE}


def test_a_tsh_value_sent_as_text_is_skipped_and_counted():
    f = facts(observation(*TSH, valueQuantity={"value": "4.5", "unit": "mIU/L"}))
    assert f.tsh_results == () and f.skipped_resources == 1


def test_hypothyroidism_diagnosis():
    assert facts(condition(SNOMED, "40930008")).hypothyroidism_diagnosed
    assert facts(condition(ICD10, "E03.9")).hypothyroidism_diagnosed
    assert not facts(condition(ICD10, "E06.3")).hypothyroidism_diagnosed


# --- antiphospholipid antibodies (A4) -----------------------------------------------------------------------


def test_the_five_antiphospholipid_tests_with_dates_and_positivity():
    f = facts(
        observation(LOINC, "3281-3", "2024-01-10", valueCodeableConcept=cc(SNOMED, "10828004")),
        observation(LOINC, "3181-5", "2024-01-10", value=45, unit="GPL"),
        observation(LOINC, "3182-3", "2024-01-10", value=10, unit="MPL", high=20),
        observation(LOINC, "44448-9", "2024-04-15", value=30, unit="U/mL", interpretation="H"),
        observation(LOINC, "44449-7", "2024-04-15", value=3, unit="U/mL", interpretation="N"),
    )
    by_category = {r.category: r for r in f.apl_results}
    assert set(by_category) == {Category.LUPUS_ANTICOAGULANT, Category.ACL_IGG, Category.ACL_IGM,
                                Category.B2GPI_IGG, Category.B2GPI_IGM}
    assert by_category[Category.LUPUS_ANTICOAGULANT].positive is True
    assert by_category[Category.ACL_IGG].positive is True  # > 40 GPL without a lab range (A4)
    assert by_category[Category.ACL_IGM].positive is False
    assert by_category[Category.B2GPI_IGG].positive is True and by_category[Category.B2GPI_IGG].when == date(2024, 4, 15)
    assert by_category[Category.B2GPI_IGM].positive is False
    assert [r.when for r in f.apl_results] == sorted((r.when for r in f.apl_results), reverse=True)


@pytest.mark.parametrize("code", ["6303-2", "57838-5", "50410-0", "34571-0", "75514-0"])
def test_any_lupus_anticoagulant_code_is_a_lupus_anticoagulant_result(code):
    (result,) = facts(observation(LOINC, code, valueString="Positief")).apl_results
    assert result.category is Category.LUPUS_ANTICOAGULANT and result.interpretation == "POS"
    (negative,) = facts(observation(LOINC, code, valueString="niet aangetoond")).apl_results
    assert negative.positive is False


def test_aps_diagnosis_needs_a_confirmed_record():
    assert facts(condition(SNOMED, "26843008")).aps_diagnosed
    assert not facts(condition(SNOMED, "26843008", verification="provisional")).aps_diagnosed
    assert facts(condition(SNOMED, "307116001")).hereditary_thrombophilia


# --- family history (footnote *) ----------------------------------------------------------------------------

RM = (SNOMED, "102878001")


@pytest.mark.parametrize(
    "relationship",
    [(ROLE, "MTH"), (ROLE, "FTH"), (ROLE, "SIS"), (ROLE, "HBRO"), (SNOMED, "73678001"), (SNOMED, "65656005"),
     (ROLE, "MTHINLAW")],
)
def test_recurrent_miscarriage_in_parents_or_siblings_in_both_code_systems(relationship):
    f = facts(family_history(relationship, RM, id="fh1"))
    assert f.family_history.recurrent_miscarriage_in_siblings_or_parents
    assert f.family_history.sources == ("FamilyMemberHistory/fh1",)


@pytest.mark.parametrize("relationship", [(ROLE, "AUNT"), (ROLE, "SISINLAW"), (ROLE, "DAUC")])
def test_recurrent_miscarriage_in_other_relatives_is_not_the_footnote(relationship):
    assert not facts(family_history(relationship, RM)).family_history.recurrent_miscarriage_in_siblings_or_parents


def test_child_with_malformation_and_relative_with_chromosome_abnormality():
    f = facts(family_history((ROLE, "DAUC"), (SNOMED, "276654001")), family_history((ROLE, "COUSN"), (SNOMED, "74345006")))
    assert f.family_history.child_with_structural_anomalies
    assert f.family_history.relative_with_chromosome_abnormality
    plain = facts(family_history((ROLE, "DAUC"), (SNOMED, "40930008")))
    assert plain.family_history == type(plain.family_history)()


def test_entered_in_error_family_history_is_ignored():
    f = facts(family_history((ROLE, "MTH"), RM, status="entered-in-error"))
    assert not f.family_history.recurrent_miscarriage_in_siblings_or_parents


# --- genetics ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [({"valueString": "46,XX"}, False), ({"valueString": "46,XY[20]"}, False),
     ({"valueString": "46,XX,t(11;22)(q23;q11.2)"}, True), ({"valueString": "45,XX,rob(13;14)(q10;q10)"}, True),
     ({"interpretation": "A"}, True), ({"valueString": "see report"}, None)],
)
def test_parental_karyotype_result(value, expected):
    assert facts(observation(LOINC, "62356-1", **value)).parental_karyotype_abnormal is expected


def test_balanced_translocation_diagnosis_means_abnormal_karyotype():
    assert facts(condition(ICD10, "Q95.0")).parental_karyotype_abnormal is True
    assert facts().parental_karyotype_abnormal is None


def test_fetal_anomaly_and_translocation_in_pregnancy_tissue():
    assert facts(condition(ICD10, "O35.8", "2023-01-01", clinical="resolved")).fetal_structural_anomaly
    assert not facts(miscarriage("2023-01-01")).fetal_structural_anomaly
    flag = condition("https://rpl-cds.example.org/fhir/CodeSystem/rpl-cds", "translocation-in-pregnancy-tissue")
    assert facts(flag).translocation_in_pregnancy_tissue
    assert not facts().translocation_in_pregnancy_tissue


# --- uterus, cycle, autoimmune ------------------------------------------------------------------------------------


def test_uterine_findings():
    f = facts(condition(SNOMED, "37849005"), condition(ICD10CM, "N80.03"), condition(ICD10, "N84.0"))
    assert f.congenital_uterine_anomaly and f.adenomyosis and f.uterine_polyp_myoma_or_adhesions
    resolved_polyp = facts(condition(ICD10, "N84.0", clinical="resolved"))
    assert not resolved_polyp.uterine_polyp_myoma_or_adhesions
    lifelong = facts(condition(ICD10, "Q51.3", clinical="inactive"))
    assert lifelong.congenital_uterine_anomaly


def test_cervical_insufficiency_suspected_counts():
    assert facts(condition(SNOMED, "17382005", verification="provisional")).cervical_insufficiency_suspected
    assert not facts(condition(SNOMED, "17382005", verification="refuted")).cervical_insufficiency_suspected


def test_cycle_disorders():
    oligo = facts(condition(ICD10, "N91.4"))
    assert oligo.oligo_or_amenorrhoea and oligo.cycle_disorder
    irregular = facts(condition(ICD10, "N92.6"))
    assert irregular.cycle_disorder and not irregular.oligo_or_amenorrhoea
    assert not facts(condition(ICD10, "N91.4", clinical="resolved")).cycle_disorder
    assert facts(condition(ICD10, "E22.1")).hyperprolactinaemia


def test_autoimmune_disease():
    assert facts(condition(SNOMED, "55464009")).autoimmune_disease_signs
    assert facts(condition(ICD10, "M32.1")).autoimmune_disease_signs
    assert not facts(condition(SNOMED, "40930008")).autoimmune_disease_signs


# --- interventions ------------------------------------------------------------------------------------------------

THROMBOPHILIA = (LOINC, "21668-9")


def test_orders_done_ordered_and_ignored_by_status():
    f = facts(service_request(*THROMBOPHILIA, id="a"), service_request(*THROMBOPHILIA, status="on-hold", id="b"),
              service_request(*THROMBOPHILIA, status="completed", id="c"))
    states = {i.resource_ref: i.state for i in f.interventions_in(Category.THROMBOPHILIA_TEST)}
    assert states == {"ServiceRequest/a": InterventionState.ORDERED, "ServiceRequest/b": InterventionState.ORDERED,
                      "ServiceRequest/c": InterventionState.DONE}
    for kwargs in ({"status": "cancelled"}, {"status": "revoked"}, {"status": "entered-in-error"},
                   {"status": "draft"}, {"intent": "proposal"}, {"doNotPerform": True}):
        assert not facts(service_request(*THROMBOPHILIA, **kwargs)).has_any(Category.THROMBOPHILIA_TEST), kwargs


def test_order_reasons():
    rpl = facts(service_request(*THROMBOPHILIA, reasons=[(ICD10, "N96")])).interventions[0]
    assert rpl.reason_is_rpl and not rpl.reason_is_other_indication and rpl.reason_codes == ((ICD10, "N96"),)
    other = facts(service_request(*THROMBOPHILIA, reasons=[DVT])).interventions[0]
    assert other.reason_is_other_indication and not other.reason_is_rpl
    none = facts(service_request(*THROMBOPHILIA)).interventions[0]
    assert not none.reason_is_rpl and not none.reason_is_other_indication
    by_reference = facts(condition(ICD10, "N96", id="c-rpl"),
                         service_request(*THROMBOPHILIA, reasonReference=[{"reference": "Condition/c-rpl"}]))
    assert by_reference.interventions_in(Category.THROMBOPHILIA_TEST)[0].reason_is_rpl


def test_prednisone_in_a_clinical_study():
    study = medication_request(ATC, "H02AB06", reasons=[(ORDER_CONTEXT, "clinical-study")])
    (i,) = facts(study).interventions
    assert i.category is Category.PREDNISONE and i.in_study and not i.reason_is_other_indication
    assert facts(medication_request(ATC, "H02AB07", reasons=[(SNOMED, "428024001")])).interventions[0].in_study
    assert not facts(medication_request(ATC, "H02AB07")).interventions[0].in_study
    assert facts(medication_request(ATC, "H02AB02")).interventions[0].category is Category.STEROIDS


def test_low_dose_aspirin_versus_analgesic_aspirin():
    lda = facts(medication_request(ATC, "B01AC06", dosage_text="1 dd 80 mg")).interventions
    assert [(i.category, i.dosage_text) for i in lda] == [(Category.LOW_DOSE_ASPIRIN, "1 dd 80 mg")]
    assert facts(medication_request(ATC, "N02BA01", dose_mg=80)).interventions == ()
    assert facts(medication_request(RXNORM, "1191", dose_mg=80)).has_any(Category.LOW_DOSE_ASPIRIN)
    assert facts(medication_request(RXNORM, "1191", dosage_text="75 mg once daily")).has_any(Category.LOW_DOSE_ASPIRIN)
    assert not facts(medication_request(RXNORM, "1191", dose_mg=500)).has_any(Category.LOW_DOSE_ASPIRIN)
    assert not facts(medication_request(RXNORM, "1191")).has_any(Category.LOW_DOSE_ASPIRIN)


def test_medication_by_reference_and_contained():
    med = {"resourceType": "Medication", "id": "m1", "code": cc(ATC, "H03AA01")}
    by_ref = medication_request(ATC, "x", medicationReference={"reference": "Medication/m1"})
    del by_ref["medicationCodeableConcept"]
    assert facts(med, by_ref).has_any(Category.LEVOTHYROXINE)
    contained = medication_request(ATC, "x", medicationReference={"reference": "#c"},
                                   contained=[{"resourceType": "Medication", "id": "c", "code": cc(ATC, "B01AB05")}])
    del contained["medicationCodeableConcept"]
    assert facts(contained).has_any(Category.LMWH)


def test_done_medications_and_procedures():
    assert facts(medication_statement(ATC, "G03DA04")).interventions[0].state is InterventionState.DONE
    assert not facts(medication_statement(ATC, "G03DA04", status="not-taken")).interventions
    septum = facts(procedure(SNOMED, "54130005"))
    assert septum.interventions[0].category is Category.UTERINE_SURGERY
    assert not facts(procedure(SNOMED, "54130005", status="not-done")).interventions
    assert facts(medication_request(ATC, "B01AB99")).has_any(Category.LMWH)  # ATC class B01AB


def test_results_are_done_interventions():
    (i,) = facts(observation(LOINC, "8061-4", "2024-03-03", valueString="1:80")).interventions
    assert (i.category, i.state, i.when, i.resource_ref.startswith("Observation/")) == (
        Category.ANA, InterventionState.DONE, date(2024, 3, 3), True)
    assert facts(observation(LOINC, "8061-4", status="entered-in-error")).interventions == ()


# --- draft orders ------------------------------------------------------------------------------------------------


def drafts():
    return [medication_request(ATC, "G03DA04", status="draft", id="d1"),
            service_request(LOINC, "13303-3", status="draft", id="d2"),
            medication_request(ATC, "H02AB07", status="cancelled", id="d3")]


def test_order_select_focuses_on_the_selections_only():
    f = facts(draft_orders=drafts(), focus_refs={"MedicationRequest/d1"})
    assert [(i.resource_ref, i.state, i.in_focus) for i in f.interventions] == [
        ("MedicationRequest/d1", InterventionState.DRAFT, True),
        ("ServiceRequest/d2", InterventionState.DRAFT, False),
    ]
    assert f.focus_orders[0].resource["id"] == "d1"


def test_order_sign_focuses_on_every_draft():
    f = facts(draft_orders=drafts(), focus_refs=None)
    assert [i.in_focus for i in f.interventions] == [True, True]
    assert {i.category for i in f.focus_orders} == {Category.PROGESTERONE, Category.HLA_TYPING}


def test_older_fhir_drafts_are_read():
    dstu2 = {"resourceType": "MedicationOrder", "id": "mo1", "status": "draft", "dateWritten": "2025-02-28",
             "medicationCodeableConcept": cc(ATC, "G03DA04"), "reasonCodeableConcept": cc(ICD10, "N96"),
             "dosageInstruction": [{"text": "2dd 400 mg vaginaal"}]}
    stu3 = {"resourceType": "ProcedureRequest", "id": "pr1", "status": "draft", "intent": "order",
            "code": cc(LOINC, "13303-3")}
    ignored = {"resourceType": "DeviceRequest", "id": "dr1", "status": "draft"}
    f = facts(draft_orders=[dstu2, stu3, ignored], focus_refs={"MedicationOrder/mo1"})
    progesterone, hla = f.interventions
    assert (progesterone.category, progesterone.in_focus, progesterone.reason_is_rpl) == (Category.PROGESTERONE, True, True)
    assert progesterone.dosage_text == "2dd 400 mg vaginaal" and progesterone.when == date(2025, 2, 28)
    assert (hla.category, hla.in_focus) == (Category.HLA_TYPING, False)
    assert f.skipped_resources == 0


def test_a_draft_with_an_unreadable_date_keeps_a_readable_one():
    draft = {"resourceType": "MedicationOrder", "id": "mo1", "status": "draft", "authoredOn": "gisteren",
             "dateWritten": "2024-02-01", "medicationCodeableConcept": cc(ATC, "G03DA04")}
    (order,) = facts(draft_orders=[draft], focus_refs=None).interventions
    assert order.category is Category.PROGESTERONE and order.when == date(2024, 2, 1)


# --- robustness ---------------------------------------------------------------------------------------------------


def test_garbage_is_counted_not_raised():
    garbage = [
        None, "Observation", 42, [],
        {"resourceType": "Condition", "code": cc(*MISCARRIAGE), "onsetDateTime": "yesterday"},
        {"resourceType": "Observation", "code": cc(*TSH), "valueQuantity": {"value": "4.5"}},
        {"resourceType": "Observation", "code": cc(*TSH), "referenceRange": "0.4-4.0", "valueQuantity": {"value": 1}},
        {"resourceType": "FamilyMemberHistory", "relationship": cc(ROLE, "MTH"), "condition": ["x"]},
        {"resourceType": "Observation", "code": "not a CodeableConcept"},
        {"resourceType": "Condition", "code": {"coding": [{"system": SNOMED, "code": 17369002}]}},
        {"resourceType": "SomethingElse", "id": "1"},
        {"no": "resourceType"},
        miscarriage("2022-01-01"), miscarriage("2023-01-01"),
    ]
    f = extract_patient_facts(garbage, today=TODAY, draft_orders=[None, {"resourceType": "MedicationRequest",
                              "medicationCodeableConcept": cc(ATC, "G03DA04"), "dosageInstruction": "x"}])
    assert f.loss_count == 2
    assert f.skipped_resources == 4 + 4 + 1  # junk items, bad date / value / range / condition shape, bad draft
    assert f.has_any(Category.PROGESTERONE)


def test_bundles_are_flattened():
    inner = bundle(miscarriage("2022-01-01"), with_type=False)
    outer = bundle(miscarriage("2023-01-01"), inner)
    outer["entry"].append({"fullUrl": "urn:uuid:no-resource"})
    assert len(flatten_bundle(outer)) == 2
    assert flatten_bundle(patient()) == [patient()]
    assert flatten_bundle({"entry": [{"resource": patient()}]}) == [patient()]
    assert facts(outer).loss_count == 2
    assert extract_patient_facts(outer, today=TODAY).loss_count == 2


def test_extraction_does_not_change_its_input():
    resources = [miscarriage("2022-01-01"), observation(*TSH, value=2.0)]
    before = copy.deepcopy(resources)
    facts(*resources, draft_orders=drafts())
    assert resources == before


# --- speed (a measurement, not a timed assertion; benchmarks hold the targets) --------------------------------------


def _chart(n: int, relevant_share: int = 10) -> list[dict]:
    """`relevant_share` of every 10 resources carry a guideline code; the rest are codes a chart is
    full of (glucose, hypertension) that the extraction must skip quickly."""
    base = date(2015, 1, 1)
    relevant = [
        lambda i: observation(*TSH, base + timedelta(days=i % 3000), value=1 + i % 5, unit="mIU/L", low=0.4, high=4.0),
        lambda i: observation(LOINC, "3181-5", base + timedelta(days=i % 3000), value=i % 60, interpretation="N"),
        lambda i: miscarriage(base + timedelta(days=40 * (i % 50))),
        lambda i: service_request(LOINC, "21668-9", reasons=[DVT]),
        lambda i: medication_request(ATC, "B01AC06", dose_mg=80),
        lambda i: medication_administration(ATC, "J06BB01", base + timedelta(days=i % 3000)),
        lambda i: family_history((ROLE, "MTH"), RM),
        lambda i: procedure(SNOMED, "42010004"),
        lambda i: observation(LOINC, "11884-4", base + timedelta(days=i % 3000), value=8, unit="wk"),
        lambda i: condition(ICD10, "N96", base + timedelta(days=i % 3000)),
    ]
    other = [
        lambda i: observation(LOINC, "2345-7", base + timedelta(days=i % 3000), value=5.5),  # glucose
        lambda i: condition(SNOMED, "38341003", base + timedelta(days=i % 3000)),  # hypertension
    ]
    return [relevant[i % 10](i) if i % 10 < relevant_share else other[i % 2](i) for i in range(n)]


def _best_of(runs: int, chart: list[dict]) -> tuple[float, float]:
    wall, cpu = [], []
    for _ in range(runs):
        w, c = time.perf_counter(), time.process_time()
        extract_patient_facts(chart, today=TODAY)
        wall.append(time.perf_counter() - w)
        cpu.append(time.process_time() - c)
    return min(wall) * 1000, min(cpu) * 1000


def test_speed_of_extracting_10000_resources(capsys):
    every_resource_relevant = _chart(10_000)
    typical = _chart(10_000, relevant_share=2)
    f = extract_patient_facts(every_resource_relevant, today=TODAY)  # also warms the code tables
    assert f.skipped_resources == 0 and f.loss_count >= 2 and len(f.interventions) > 5000
    with capsys.disabled():
        for name, chart in (("all guideline-relevant", every_resource_relevant), ("20% relevant", typical)):
            wall, cpu = _best_of(5, chart)
            print(f"\n[speed] extract_patient_facts, 10,000 resources ({name}): best of 5 {wall:.1f} ms wall, "
                  f"{cpu:.1f} ms CPU")
