"""Guideline rules (cards.rules): for every rule id a case where it fires and a close case where it
must not, with the boundaries of the card and of the ambiguity resolutions (guideline.md A1-A21,
precedence rules 1-5). PatientFacts are built directly; FHIR extraction is tested elsewhere.

`CASES` is the registry keyed by rule id; `test_every_rule_has_a_firing_and_a_silent_case` fails
when a rule lacks such a pair. tests/test_card_building.py builds cards from the firing cases.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from datetime import date, timedelta

import pytest

from cards import rules as rules_module
from cards.findings import RULE_IDS, Finding
from cards.rules import evaluate
from fhir_mappings.facts import (
    Category,
    FamilyHistory,
    Intervention,
    InterventionState,
    LabResult,
    LossKind,
    PatientFacts,
    PregnancyLoss,
    weeks_days,
)

TODAY = date(2025, 3, 14)
PATIENT = "Patient/p1"


# ---------------------------------------------------------------------------------------------
# Builders
# ---------------------------------------------------------------------------------------------


def days_ago(n: int) -> date:
    return TODAY - timedelta(days=n)


def losses(n: int, *, second_trimester: int = 0) -> tuple[PregnancyLoss, ...]:
    out = []
    for i in range(n):
        ga = weeks_days(16) if i < second_trimester else weeks_days(8)
        out.append(PregnancyLoss(LossKind.MISCARRIAGE, days_ago(400 + 120 * i), ga, f"Condition/loss{i}"))
    return tuple(out)


def patient(**kw) -> PatientFacts:
    """No RPL unless given: a female patient of 30 without losses."""
    base = {"today": TODAY, "patient_ref": PATIENT, "age_years": 30, "sex": "female"}
    base.update(kw)
    return PatientFacts(**base)


def rpl(n: int = 2, **kw) -> PatientFacts:
    base = {"losses": losses(n), "loss_count": n, "loss_count_basis": "conditions"}
    base.update(kw)
    return patient(**base)


def lab(category: Category, when: date | None, value: float | None = None, *, high: float | None = None,
        low: float | None = None, interpretation: str | None = None, unit: str | None = None) -> LabResult:
    return LabResult(category, when, value, unit, low, high, interpretation, f"Observation/{category.value}-{when}")


def tsh(value: float, *, when: date | None = None, high: float = 4.0, low: float = 0.4) -> LabResult:
    return lab(Category.TSH, when or days_ago(10), value, high=high, low=low, unit="mIU/L")


def ft4(value: float, *, when: date | None = None, low: float = 12.0, high: float = 22.0) -> LabResult:
    return lab(Category.FT4, when or days_ago(10), value, high=high, low=low, unit="pmol/L")


def apl_pos(category: Category, when: date) -> LabResult:
    return lab(category, when, interpretation="POS")


def apl_neg(category: Category, when: date) -> LabResult:
    return lab(category, when, interpretation="NEG")


def all_apl_negative(when: date | None = None) -> tuple[LabResult, ...]:
    return tuple(apl_neg(c, when or days_ago(30)) for c in (
        Category.LUPUS_ANTICOAGULANT, Category.ACL_IGG, Category.ACL_IGM, Category.B2GPI_IGG, Category.B2GPI_IGM))


def order(category: Category, ref: str = "ServiceRequest/d1", *, state: InterventionState = InterventionState.DRAFT,
          focus: bool = True, when: date | None = TODAY, **kw) -> Intervention:
    return Intervention(category, state, ref, f"{category.value} order", None, when,
                        in_focus=focus and state == InterventionState.DRAFT, **kw)


def done(category: Category, when: date | None = None) -> Intervention:
    return order(category, f"Procedure/{category.value}", state=InterventionState.DONE, when=when or days_ago(60))


def signed(category: Category, when: date | None = None) -> Intervention:
    return order(category, f"ServiceRequest/signed-{category.value}", state=InterventionState.ORDERED, when=when or days_ago(5))


def pregnant(ga: int, **kw) -> dict:
    return {"pregnant": True, "gestational_age_days": ga, **kw}


def progesterone_case(*, n: int = 3, ga: int = weeks_days(13), onset: int | None = weeks_days(12),
                      iup: bool | None = True, bleeding: bool = True, **kw) -> PatientFacts:
    return rpl(n, **pregnant(ga), vaginal_bleeding=bleeding, bleeding_onset_gestational_age_days=onset,
               intrauterine_pregnancy_confirmed=iup, **kw)


def karyotype_case(*, age: int | None = 34, n: int = 3, fh: bool = True, **kw) -> PatientFacts:
    kw.setdefault("family_history", FamilyHistory(recurrent_miscarriage_in_siblings_or_parents=fh))
    return rpl(n, age_years=age, **kw)


def miscarriage(ga: int | None, *, rhd_negative: bool | None = True, **kw) -> PatientFacts:
    return patient(active_miscarriage=True, active_miscarriage_gestational_age_days=ga, rhd_negative=rhd_negative, **kw)


FIRST_POSITIVE = days_ago(200)


def apl_series_case(repeat_after_days: int | None, *, repeat_positive: bool = True, n: int = 3, **kw) -> PatientFacts:
    results = [apl_pos(Category.ACL_IGG, FIRST_POSITIVE)]
    if repeat_after_days is not None:
        second = FIRST_POSITIVE + timedelta(days=repeat_after_days)
        results.append(apl_pos(Category.ACL_IGG, second) if repeat_positive else apl_neg(Category.ACL_IGG, second))
    return rpl(n, apl_results=tuple(results), **kw)


# ---------------------------------------------------------------------------------------------
# The registry
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    name: str
    facts: PatientFacts
    fires: bool
    hook: str = "patient-view"
    variant: str | None = None  # expected Finding.variant when it fires

    @property
    def id(self) -> str:
        return self.name


def fire(name, facts, hook="patient-view", variant=None):
    return Case(name, facts, True, hook, variant)


def silent(name, facts, hook="patient-view"):
    return Case(name, facts, False, hook)


SIGN = "order-sign"
SELECT = "order-select"

CASES: dict[str, list[Case]] = {
    "rpl-summary": [
        fire("2 losses = recurrent miscarriage (R01)", rpl(2)),
        silent("1 loss is not recurrent miscarriage", rpl(1)),
        silent("patient-level rule does not run at order-sign", rpl(2), SIGN),
        fire("with an active order the card advises against", rpl(2, interventions=(signed(Category.THROMBOPHILIA_TEST),))),
        fire("work-up complete: summary variant", rpl(2, tsh_results=(tsh(2.0),), apl_results=all_apl_negative(),
                                                      interventions=(done(Category.UTERINE_IMAGING),)),
             variant="workup-complete"),
    ],
    "preconception-advice": [
        fire("RPL, not pregnant", rpl(2)),
        silent("RPL, pregnant: no preconception consult", rpl(2, **pregnant(weeks_days(7)))),
        silent("no RPL", rpl(1)),
    ],
    "tsh-missing": [
        fire("RPL without TSH (R10)", rpl(2)),
        silent("TSH result on file", rpl(2, tsh_results=(tsh(2.0),))),
        silent("TSH ordered already", rpl(2, interventions=(signed(Category.TSH),))),
        silent("one loss", rpl(1)),
    ],
    "ft4-missing": [
        fire("TSH above the lab limit (R11)", rpl(2, tsh_results=(tsh(4.5),))),
        fire("TSH below the lab limit", rpl(2, tsh_results=(tsh(0.1),))),
        silent("TSH within the range", rpl(2, tsh_results=(tsh(3.9),))),
        fire("A3: pregnancy limit is upper - 0.5 (3.7 > 3.5)",
             rpl(2, **pregnant(weeks_days(9)), tsh_results=(tsh(3.7, when=days_ago(7)),))),
        silent("A3: same TSH outside pregnancy is normal", rpl(2, tsh_results=(tsh(3.7),))),
        silent("A3: TSH taken before this pregnancy uses the non-pregnant limit",
               rpl(2, **pregnant(weeks_days(6)), tsh_results=(tsh(3.7, when=days_ago(100)),))),
        silent("FT4 measured with the TSH", rpl(2, tsh_results=(tsh(4.5),), ft4_results=(ft4(15),))),
        silent("FT4 ordered", rpl(2, tsh_results=(tsh(4.5),), interventions=(signed(Category.FT4),))),
        fire("high flag without a value", rpl(2, tsh_results=(lab(Category.TSH, days_ago(3), interpretation="H"),))),
    ],
    "hypothyroidism-treatment": [
        fire("overt: TSH high, FT4 low (R12)", rpl(2, tsh_results=(tsh(6.0),), ft4_results=(ft4(9),)), variant="overt"),
        fire("SCH TSH 10.1 > 10: recommended (A3)", rpl(2, tsh_results=(tsh(10.1),), ft4_results=(ft4(15),)),
             variant="sch-treat"),
        fire("SCH TSH 10.0: consider (A3)", rpl(2, tsh_results=(tsh(10.0),), ft4_results=(ft4(15),)),
             variant="sch-consider"),
        fire("SCH TSH 4.1: consider", rpl(2, tsh_results=(tsh(4.1, high=3.5),), ft4_results=(ft4(15),)),
             variant="sch-consider"),
        silent("SCH TSH 4.0: no advice (never for TSH 2.5-4)",
               rpl(2, tsh_results=(tsh(4.0, high=3.5),), ft4_results=(ft4(15),))),
        silent("pregnancy SCH TSH 3.8 (> 3.5 limit) but <= 4: no advice",
               rpl(2, **pregnant(weeks_days(9)), tsh_results=(tsh(3.8, when=days_ago(3)),),
                   ft4_results=(ft4(15, when=days_ago(3)),))),
        silent("euthyroid", rpl(2, tsh_results=(tsh(2.0),), ft4_results=(ft4(15),))),
        silent("levothyroxine already prescribed", rpl(2, tsh_results=(tsh(6.0),), ft4_results=(ft4(9),),
                                                       interventions=(signed(Category.LEVOTHYROXINE),))),
        silent("FT4 sampled 60 days from the TSH does not pair",
               rpl(2, tsh_results=(tsh(6.0),), ft4_results=(ft4(9, when=days_ago(70)),))),
    ],
    "apl-missing": [
        fire("no aPL at all (R15)", rpl(2)),
        fire("only LA done", rpl(2, apl_results=(apl_neg(Category.LUPUS_ANTICOAGULANT, days_ago(9)),))),
        silent("all five done", rpl(2, apl_results=all_apl_negative())),
        silent("all five ordered", rpl(2, interventions=tuple(signed(c) for c in (
            Category.LUPUS_ANTICOAGULANT, Category.ACL_IGG, Category.ACL_IGM, Category.B2GPI_IGG, Category.B2GPI_IGM)))),
        silent("APS already diagnosed", rpl(2, aps_diagnosed=True)),
    ],
    "apl-repeat": [
        fire("positive, never repeated (R16)", apl_series_case(None)),
        fire("A4: a repeat after 83 days does not count", apl_series_case(83)),
        silent("A4: repeat after 84 days: persistent", apl_series_case(84)),
        silent("negative repeat after 84 days: transient", apl_series_case(90, repeat_positive=False)),
        fire("A4: negative repeat after 60 days does not settle it", apl_series_case(60, repeat_positive=False)),
        silent("repeat already ordered", apl_series_case(None, interventions=(signed(Category.ACL_IGG, days_ago(10)),))),
        silent("no RPL", apl_series_case(None, n=1)),
    ],
    "aps-treatment": [
        fire("same test positive 84 days apart (R17)", apl_series_case(84)),
        silent("83 days apart is not persistent", apl_series_case(83)),
        fire("APS diagnosis recorded", rpl(3, aps_diagnosed=True)),
        silent("aspirin and LMWH already prescribed",
               apl_series_case(84, interventions=(signed(Category.LOW_DOSE_ASPIRIN), signed(Category.LMWH)))),
        fire("only aspirin prescribed: still advise LMWH", apl_series_case(84, interventions=(signed(Category.LOW_DOSE_ASPIRIN),))),
        silent("no RPL", apl_series_case(84, n=1)),
    ],
    "uterine-imaging-missing": [
        fire("RPL without uterine imaging (R22)", rpl(2)),
        silent("uterine ultrasound done", rpl(2, interventions=(done(Category.UTERINE_IMAGING),))),
        silent("congenital anomaly recorded (imaging was done)", rpl(2, congenital_uterine_anomaly=True)),
    ],
    "urogenital-tract-check": [
        fire("congenital uterine anomaly (R23)", rpl(2, congenital_uterine_anomaly=True)),
        silent("no anomaly", rpl(2, adenomyosis=True)),
        silent("urogenital investigation ordered",
               rpl(2, congenital_uterine_anomaly=True, interventions=(signed(Category.UROGENITAL_IMAGING),))),
    ],
    "karyotype-indicated": [
        fire("age 34, 3 losses, family history (R18)", karyotype_case()),
        silent("age 35", karyotype_case(age=35)),
        silent("2 losses", karyotype_case(n=2)),
        silent("no family history", karyotype_case(fh=False)),
        silent("age unknown", karyotype_case(age=None)),
        silent("already karyotyped", karyotype_case(parental_karyotype_abnormal=False)),
    ],
    "clinical-genetics-referral": [
        fire("translocation in pregnancy tissue (R20), even without RPL", patient(translocation_in_pregnancy_tissue=True)),
        fire("abnormal parental karyotype (R19)", rpl(2, parental_karyotype_abnormal=True)),
        fire("precedence 5: child with anomalies, karyotyping not indicated (age 40)",
             rpl(2, age_years=40, family_history=FamilyHistory(child_with_structural_anomalies=True))),
        fire("relative with chromosome abnormality",
             rpl(2, family_history=FamilyHistory(relative_with_chromosome_abnormality=True))),
        silent("family history trigger without RPL", patient(family_history=FamilyHistory(child_with_structural_anomalies=True))),
        silent("referral already made", rpl(2, parental_karyotype_abnormal=True,
                                            interventions=(signed(Category.GENETIC_COUNSELLING),))),
        silent("normal parental karyotype", rpl(2, parental_karyotype_abnormal=False)),
    ],
    "progesterone-indicated": [
        fire("3 losses, bleeding from 12+0, now 13+0, IUP (R32)", progesterone_case(), variant="confirmed"),
        silent("A7: bleeding from 12+1", progesterone_case(onset=weeks_days(12, 1))),
        fire("now 15+6", progesterone_case(ga=weeks_days(15, 6)), variant="confirmed"),
        silent("now 16+0", progesterone_case(ga=weeks_days(16))),
        silent("2 losses (card threshold >= 3)", progesterone_case(n=2)),
        silent("no bleeding", progesterone_case(bleeding=False)),
        fire("A7: IUP not recorded -> confirm first", progesterone_case(iup=None), variant="iup-unknown"),
        silent("A7: pregnancy not intrauterine", progesterone_case(iup=False)),
        fire("bleeding onset unknown, now 12+0", progesterone_case(ga=weeks_days(12), onset=None), variant="confirmed"),
        silent("bleeding onset unknown, now 12+1", progesterone_case(ga=weeks_days(12, 1), onset=None)),
        silent("progesterone already prescribed", progesterone_case(interventions=(signed(Category.PROGESTERONE),))),
        silent("ongoing miscarriage", progesterone_case(active_miscarriage=True)),
    ],
    "cervical-surveillance": [
        fire("second-trimester loss + suspected insufficiency (R34)",
             rpl(2, second_trimester_loss=True, cervical_insufficiency_suspected=True)),
        fire("idem, pregnant now", rpl(2, second_trimester_loss=True, cervical_insufficiency_suspected=True,
                                       **pregnant(weeks_days(10))), variant="pregnant"),
        silent("no suspicion of insufficiency", rpl(2, second_trimester_loss=True)),
        silent("suspicion without second-trimester loss", rpl(2, cervical_insufficiency_suspected=True)),
    ],
    "early-pregnancy-support": [
        fire("RPL and pregnant at 8 weeks (R06)", rpl(2, **pregnant(weeks_days(8)))),
        fire("gestational age unknown", rpl(2, pregnant=True)),
        silent("A8: 12+0 is second trimester", rpl(2, **pregnant(weeks_days(12)))),
        silent("not pregnant", rpl(2)),
        silent("ongoing miscarriage", rpl(2, **pregnant(weeks_days(8)), active_miscarriage=True)),
    ],
    "anti-d-indicated": [
        fire("RhD negative, miscarriage at 10+0 (leaflet/NHG)", miscarriage(weeks_days(10))),
        silent("at 9+6", miscarriage(weeks_days(9, 6))),
        silent("RhD unknown", miscarriage(weeks_days(11), rhd_negative=None)),
        silent("RhD positive", miscarriage(weeks_days(11), rhd_negative=False)),
        silent("anti-D given", miscarriage(weeks_days(11), anti_d_given_during_current_loss=True)),
        silent("anti-D ordered", miscarriage(weeks_days(11), interventions=(signed(Category.ANTI_D),))),
        silent("gestational age unknown", miscarriage(None)),
    ],
    "miscarriage-aftercare": [
        fire("ongoing miscarriage (leaflet)", miscarriage(weeks_days(8), rhd_negative=False)),
        silent("no ongoing miscarriage", rpl(2)),
    ],
    "not-recommended-test": [
        fire("thrombophilia draft at order-sign (R25)", rpl(2, interventions=(order(Category.THROMBOPHILIA_TEST),)), SIGN),
        silent("same draft at patient-view", rpl(2, interventions=(order(Category.THROMBOPHILIA_TEST),))),
        silent("order reason: another indication (A13)",
               rpl(2, interventions=(order(Category.THROMBOPHILIA_TEST, reason_is_other_indication=True),)), SIGN),
        silent("no RPL and no RPL reason", rpl(1, interventions=(order(Category.THROMBOPHILIA_TEST),)), SIGN),
        fire("partner's chart: order reason recurrent miscarriage",
             patient(sex="male", interventions=(order(Category.SPERM_DNA_FRAGMENTATION, reason_is_rpl=True),)), SIGN),
        silent("partner's chart: conditional item (karyotype) cannot be judged",
               patient(sex="male", interventions=(order(Category.PARENTAL_KARYOTYPE, reason_is_rpl=True),)), SIGN),
        fire("order-select: the selected draft", rpl(2, interventions=(order(Category.NK_CELLS),)), SELECT),
        silent("order-select: a draft that is not selected",
               rpl(2, interventions=(order(Category.NK_CELLS, focus=False),)), SELECT),
        silent("signed order at order-sign (not in focus)", rpl(2, interventions=(signed(Category.NK_CELLS),)), SIGN),
        fire("ANA without autoimmune signs (R28)", rpl(2, interventions=(order(Category.ANA),)), SIGN),
        silent("A9: ANA with autoimmune signs", rpl(2, autoimmune_disease_signs=True, interventions=(order(Category.ANA),)), SIGN),
        fire("prolactin without oligo/amenorrhoea (R30)", rpl(2, interventions=(order(Category.PROLACTIN),)), SIGN),
        fire("prolactin with a cycle disorder that is not oligo/amenorrhoea",
             rpl(2, cycle_disorder=True, interventions=(order(Category.PROLACTIN),)), SIGN),
        silent("A10: prolactin with oligo/amenorrhoea",
               rpl(2, oligo_or_amenorrhoea=True, interventions=(order(Category.PROLACTIN),)), SIGN),
        silent("prolactin follow-up of a diagnosed hyperprolactinaemia",
               rpl(2, hyperprolactinaemia=True, interventions=(order(Category.PROLACTIN),)), SIGN),
        fire("hormone profile without cycle disorder (R29)", rpl(2, interventions=(order(Category.HORMONE_PROFILE),)), SIGN),
        silent("hormone profile with cycle disorder", rpl(2, cycle_disorder=True, interventions=(order(Category.HORMONE_PROFILE),)), SIGN),
        silent("A11: LH with cycle disorder", rpl(2, cycle_disorder=True, interventions=(order(Category.LH_SERUM),)), SIGN),
        fire("vitamin D test (R31, A14)", rpl(2, interventions=(order(Category.VITAMIN_D_TEST),)), SIGN),
        fire("pregnancy tissue genetics without anomaly (R21)",
             rpl(2, interventions=(order(Category.PREGNANCY_TISSUE_GENETICS),)), SIGN),
        silent("A12: pregnancy tissue genetics with structural anomaly",
               rpl(2, fetal_structural_anomaly=True, interventions=(order(Category.PREGNANCY_TISSUE_GENETICS),)), SIGN),
        fire("A6: parental karyotype with 2 of 3 criteria",
             karyotype_case(n=2, interventions=(order(Category.PARENTAL_KARYOTYPE),)), SIGN),
        silent("parental karyotype with all 3 criteria", karyotype_case(interventions=(order(Category.PARENTAL_KARYOTYPE),)), SIGN),
        silent("precedence 5: karyotype with a clinical-genetics trigger",
               karyotype_case(age=40, family_history=FamilyHistory(recurrent_miscarriage_in_siblings_or_parents=True,
                                                                   relative_with_chromosome_abnormality=True),
                              interventions=(order(Category.PARENTAL_KARYOTYPE),)), SIGN),
        silent("TPO antibodies are not on the NIET AANBEVOLEN list", rpl(2, interventions=(order(Category.TPO_ANTIBODIES),)), SIGN),
        fire("pregnant 23+6: still in the miscarriage window",
             rpl(2, **pregnant(weeks_days(23, 6)), interventions=(order(Category.THROMBOPHILIA_TEST),)), SIGN),
        silent("pregnant 24+0: outside the card's scope (A1)",
               rpl(2, **pregnant(weeks_days(24)), interventions=(order(Category.THROMBOPHILIA_TEST),)), SIGN),
        fire("pregnant 24+0 but the order names recurrent miscarriage",
             rpl(2, **pregnant(weeks_days(24)), interventions=(order(Category.THROMBOPHILIA_TEST, reason_is_rpl=True),)), SIGN),
    ],
    "not-recommended-treatment": [
        fire("LMWH without APS (R26/R35)", rpl(2, interventions=(order(Category.LMWH, "MedicationRequest/m1"),)), SIGN),
        silent("precedence 2: LMWH with persistent aPL",
               apl_series_case(84, interventions=(order(Category.LMWH, "MedicationRequest/m1"),)), SIGN),
        silent("precedence 2: LMWH with APS diagnosis",
               rpl(2, aps_diagnosed=True, interventions=(order(Category.LMWH, "MedicationRequest/m1"),)), SIGN),
        fire("LMWH with aPL positive only 83 days apart",
             apl_series_case(83, interventions=(order(Category.LMWH, "MedicationRequest/m1"),)), SIGN),
        silent("LMWH for another indication (A13)",
               rpl(2, interventions=(order(Category.LMWH, "MedicationRequest/m1", reason_is_other_indication=True),)), SIGN),
        fire("progesterone without indication (R33)",
             rpl(3, interventions=(order(Category.PROGESTERONE, "MedicationRequest/p1"),)), SIGN),
        silent("precedence 1: progesterone with >=3 losses + early bleeding",
               progesterone_case(interventions=(order(Category.PROGESTERONE, "MedicationRequest/p1"),)), SIGN),
        silent("precedence 1: progesterone, IUP not yet recorded",
               progesterone_case(iup=None, interventions=(order(Category.PROGESTERONE, "MedicationRequest/p1"),)), SIGN),
        fire("progesterone, bleeding from 12+1",
             progesterone_case(onset=weeks_days(12, 1), interventions=(order(Category.PROGESTERONE, "MedicationRequest/p1"),)), SIGN),
        fire("levothyroxine when euthyroid (R14)",
             rpl(2, tsh_results=(tsh(2.0),), interventions=(order(Category.LEVOTHYROXINE, "MedicationRequest/l1"),)), SIGN),
        silent("precedence 3: levothyroxine in overt hypothyroidism",
               rpl(2, tsh_results=(tsh(6.0),), ft4_results=(ft4(9),),
                   interventions=(order(Category.LEVOTHYROXINE, "MedicationRequest/l1"),)), SIGN),
        silent("levothyroxine with a normal TSH older than a year",
               rpl(2, tsh_results=(tsh(2.0, when=days_ago(366)),),
                   interventions=(order(Category.LEVOTHYROXINE, "MedicationRequest/l1"),)), SIGN),
        fire("levothyroxine with a normal TSH of exactly a year ago",
             rpl(2, tsh_results=(tsh(2.0, when=days_ago(365)),),
                 interventions=(order(Category.LEVOTHYROXINE, "MedicationRequest/l1"),)), SIGN),
        silent("levothyroxine without any TSH (euthyroidism not established)",
               rpl(2, interventions=(order(Category.LEVOTHYROXINE, "MedicationRequest/l1"),)), SIGN),
        silent("levothyroxine renewal: normal TSH on treatment",
               rpl(2, tsh_results=(tsh(2.0),), interventions=(signed(Category.LEVOTHYROXINE),
                                                               order(Category.LEVOTHYROXINE, "MedicationRequest/l1"))), SIGN),
        silent("levothyroxine with hypothyroidism diagnosed",
               rpl(2, tsh_results=(tsh(2.0),), hypothyroidism_diagnosed=True,
                   interventions=(order(Category.LEVOTHYROXINE, "MedicationRequest/l1"),)), SIGN),
        fire("prednisone outside a study (R36)", rpl(2, interventions=(order(Category.PREDNISONE, "MedicationRequest/s1"),)), SIGN),
        silent("precedence 4: prednisone within a study",
               rpl(2, interventions=(order(Category.PREDNISONE, "MedicationRequest/s1", in_study=True),)), SIGN),
        fire("precedence 4 is for prednisone only: other steroids in a study still warned",
             rpl(2, interventions=(order(Category.STEROIDS, "MedicationRequest/s2", in_study=True),)), SIGN),
        fire("bromocriptine (R35)", rpl(2, interventions=(order(Category.BROMOCRIPTINE, "MedicationRequest/b1"),)), SIGN),
        silent("bromocriptine with diagnosed hyperprolactinaemia (another indication)",
               rpl(2, hyperprolactinaemia=True, interventions=(order(Category.BROMOCRIPTINE, "MedicationRequest/b1"),)), SIGN),
        silent("low-dose aspirin is not on the list", rpl(2, interventions=(order(Category.LOW_DOSE_ASPIRIN, "MedicationRequest/a1"),)), SIGN),
        silent("cerclage is not on the list (specialist decision, A8)", rpl(2, interventions=(order(Category.CERCLAGE),)), SIGN),
        fire("uterine surgery (R24)", rpl(2, interventions=(order(Category.UTERINE_SURGERY),)), SIGN),
        fire("order-select: the selected draft", rpl(2, interventions=(order(Category.IVIG, "MedicationRequest/i1"),)), SELECT),
        silent("order-select: an unselected draft", rpl(2, interventions=(order(Category.IVIG, "MedicationRequest/i1", focus=False),)), SELECT),
        silent("pregnant 30 weeks: corticosteroids for lung maturation are not this card's subject",
               rpl(2, **pregnant(weeks_days(30)), interventions=(order(Category.STEROIDS, "MedicationRequest/s3"),)), SIGN),
    ],
}

ALL_CASES = [(rule_id, case) for rule_id, cases in CASES.items() for case in cases]


def firing(rule_id: str) -> list[Case]:
    return [case for case in CASES[rule_id] if case.fires]


def findings_of(rule_id: str, case: Case) -> list[Finding]:
    return [f for f in evaluate(case.facts, case.hook) if f.rule_id == rule_id]


# ---------------------------------------------------------------------------------------------
# Registry-driven tests
# ---------------------------------------------------------------------------------------------


def test_every_rule_has_a_firing_and_a_silent_case():
    assert set(CASES) == set(RULE_IDS)
    for rule_id in RULE_IDS:
        assert any(c.fires for c in CASES[rule_id]), f"{rule_id}: no case where it fires"
        assert any(not c.fires for c in CASES[rule_id]), f"{rule_id}: no case where it must stay silent"


@pytest.mark.parametrize(("rule_id", "case"), ALL_CASES, ids=[f"{r}: {c.name}" for r, c in ALL_CASES])
def test_rule_case(rule_id: str, case: Case):
    found = findings_of(rule_id, case)
    if not case.fires:
        assert found == []
        return
    assert found, f"{rule_id} should fire"
    if case.variant is not None:
        assert {f.variant for f in found} == {case.variant}


# ---------------------------------------------------------------------------------------------
# Details the registry does not show
# ---------------------------------------------------------------------------------------------


def only(rule_id: str, facts: PatientFacts, hook: str = "patient-view") -> Finding:
    found = [f for f in evaluate(facts, hook) if f.rule_id == rule_id]
    assert len(found) == 1
    return found[0]


def test_apl_missing_names_the_missing_tests_in_card_order():
    facts = rpl(2, apl_results=(apl_neg(Category.ACL_IGM, days_ago(9)),), interventions=(signed(Category.B2GPI_IGG),))
    assert only("apl-missing", facts).params["missing"] == ["lupus-anticoagulant", "anticardiolipin-igg", "anti-b2gpi-igm"]


def test_apl_repeat_due_date_is_first_positive_plus_84_days():
    finding = only("apl-repeat", apl_series_case(83))
    due = (FIRST_POSITIVE + timedelta(days=84)).isoformat()
    assert finding.params["tests"] == [
        {"test": "anticardiolipin-igg", "first_positive": FIRST_POSITIVE.isoformat(), "due_date": due}
    ]
    assert finding.params["earliest_due"] == due


def test_apl_repeat_positive_without_date_has_no_due_date():
    facts = rpl(2, apl_results=(lab(Category.LUPUS_ANTICOAGULANT, None, interpretation="POS"),))
    finding = only("apl-repeat", facts)
    assert finding.params["tests"][0]["due_date"] is None
    assert finding.variant == "no-date"


def test_aps_treatment_caveat_only_with_exactly_two_losses():
    assert only("aps-treatment", apl_series_case(84, n=2)).params["two_losses_caveat"] is True
    assert only("aps-treatment", apl_series_case(84, n=3)).params["two_losses_caveat"] is False


def test_progesterone_until_date_is_16_weeks_0_days():
    finding = only("progesterone-indicated", progesterone_case(ga=weeks_days(13)))
    assert finding.params["until_date"] == (TODAY + timedelta(days=weeks_days(3))).isoformat()


def test_hypothyroidism_uses_pregnancy_limit_for_overt_disease():
    # TSH 3.8 is above 4.0 - 0.5 in pregnancy; with a low FT4 that is overt hypothyroidism.
    facts = rpl(2, **pregnant(weeks_days(9)), tsh_results=(tsh(3.8, when=days_ago(2)),), ft4_results=(ft4(9, when=days_ago(2)),))
    finding = only("hypothyroidism-treatment", facts)
    assert finding.variant == "overt"
    assert finding.params["pregnancy_limits"] is True
    assert finding.params["upper_limit"] == pytest.approx(3.5)


def test_newest_tsh_decides():
    facts = rpl(2, tsh_results=(tsh(2.0, when=days_ago(400)), tsh(5.0, when=days_ago(3))))
    assert only("ft4-missing", facts).params["tsh_value"] == 5.0


def test_order_scope_select_versus_sign():
    drafts = (order(Category.NK_CELLS, "ServiceRequest/a", focus=True),
              order(Category.HLA_TYPING, "ServiceRequest/b", focus=False))
    at_select = [f for f in evaluate(rpl(2, interventions=drafts), SELECT) if f.rule_id == "not-recommended-test"]
    assert [f.order.resource_ref for f in at_select] == ["ServiceRequest/a"]
    all_focus = tuple(dataclasses.replace(d, in_focus=True) for d in drafts)
    at_sign = [f for f in evaluate(rpl(2, interventions=all_focus), SIGN) if f.rule_id == "not-recommended-test"]
    assert sorted(f.order.resource_ref for f in at_sign) == ["ServiceRequest/a", "ServiceRequest/b"]


def test_one_finding_per_order_with_its_category():
    drafts = (order(Category.THROMBOPHILIA_TEST, "ServiceRequest/t1"), order(Category.THROMBOPHILIA_TEST, "ServiceRequest/t2"),
              order(Category.METFORMIN, "MedicationRequest/m1"))
    found = evaluate(rpl(2, interventions=drafts), SIGN)
    assert [(f.rule_id, f.order.resource_ref, f.category) for f in found] == [
        ("not-recommended-test", "ServiceRequest/t1", Category.THROMBOPHILIA_TEST),
        ("not-recommended-test", "ServiceRequest/t2", Category.THROMBOPHILIA_TEST),
        ("not-recommended-treatment", "MedicationRequest/m1", Category.METFORMIN),
    ]


def test_order_hooks_run_only_order_rules_and_patient_view_no_order_rules():
    facts = karyotype_case(**pregnant(weeks_days(8)), interventions=(order(Category.HLA_TYPING),))
    assert {f.rule_id for f in evaluate(facts, SIGN)} == {"not-recommended-test"}
    assert {f.rule_id for f in evaluate(facts, SELECT)} == {"not-recommended-test"}
    assert "not-recommended-test" not in {f.rule_id for f in evaluate(facts, "patient-view")}


def test_patient_view_lists_active_not_recommended_orders_in_the_summary_only():
    facts = rpl(2, autoimmune_disease_signs=True, interventions=(
        signed(Category.THROMBOPHILIA_TEST), signed(Category.ANA), done(Category.HLA_TYPING),
        dataclasses.replace(signed(Category.METFORMIN), reason_is_other_indication=True)))
    summary = only("rpl-summary", facts)
    # ANA is allowed with autoimmune signs (A9); a done test cannot be undone; metformin has another reason.
    assert summary.params["not_advised_present"] == ["thrombophilia-test"]
    assert not [f for f in evaluate(facts, "patient-view") if f.rule_id.startswith("not-recommended")]


def test_karyotype_not_advised_with_partial_criteria_in_summary():
    summary = only("rpl-summary", karyotype_case(n=2))
    item = next(i for i in summary.params["checklist"] if i["item"] == "parental-karyotype")
    assert item == {"item": "parental-karyotype", "status": "not-advised", "criteria_met": 2}


# --- prognosis (guideline.md 5b: only the 13 VERIFIED Brigham cells) --------------------------

VERIFIED_CELLS = {
    (20, 2): 92, (20, 3): 90, (25, 2): 89, (25, 3): 86, (30, 2): 84, (30, 3): 80, (30, 5): 71,
    (35, 2): 77, (35, 3): 73, (40, 2): 69, (40, 3): 64, (40, 5): 52, (45, 3): 54,
}
UNVERIFIED_CELLS = [(20, 4), (20, 5), (25, 4), (25, 5), (30, 4), (35, 4), (35, 5), (40, 4), (45, 2), (45, 4), (45, 5)]


@pytest.mark.parametrize(("age", "n"), sorted(VERIFIED_CELLS))
def test_prognosis_shows_verified_cells(age: int, n: int):
    prognosis = only("rpl-summary", rpl(n, age_years=age)).params["prognosis"]
    assert prognosis == {"status": "verified", "age_band": age, "losses": n, "value": VERIFIED_CELLS[(age, n)]}


@pytest.mark.parametrize(("age", "n"), UNVERIFIED_CELLS)
def test_prognosis_never_gives_a_number_for_unverified_cells(age: int, n: int):
    prognosis = only("rpl-summary", rpl(n, age_years=age)).params["prognosis"]
    assert prognosis == {"status": "unverified", "age_band": age, "losses": n}


@pytest.mark.parametrize(("age", "band"), [(17, None), (18, 20), (22, 20), (23, 25), (32, 30), (33, 35), (42, 40), (43, 45), (50, 45)])
def test_prognosis_age_bands(age: int, band: int | None):
    prognosis = only("rpl-summary", rpl(3, age_years=age)).params["prognosis"]
    if band is None:
        assert prognosis == {"status": "age-out-of-range"}
    else:
        assert prognosis["age_band"] == band


def test_prognosis_unavailable_cases():
    assert only("rpl-summary", rpl(6)).params["prognosis"]["status"] == "losses-out-of-range"
    assert only("rpl-summary", rpl(2, age_years=None)).params["prognosis"] == {"status": "age-unknown"}
    by_diagnosis = patient(loss_count=2, loss_count_basis="rpl-diagnosis", rpl_diagnosis_recorded=True)
    assert only("rpl-summary", by_diagnosis).params["prognosis"] == {"status": "count-unknown"}


# --- engine -----------------------------------------------------------------------------------


def test_unknown_hook_is_an_error():
    with pytest.raises(ValueError):
        evaluate(rpl(2), "encounter-start")


def test_a_failing_rule_is_isolated_and_logged(monkeypatch, caplog):
    def broken(facts):
        raise RuntimeError("defect")

    monkeypatch.setitem(rules_module.RULES, "tsh-missing", broken)
    with caplog.at_level(logging.ERROR, logger="cards.rules"):
        found = {f.rule_id for f in evaluate(rpl(2), "patient-view")}
    assert "tsh-missing" not in found and "rpl-summary" in found and "apl-missing" in found
    assert "tsh-missing" in caplog.text


def test_a_levothyroxine_warning_without_tsh_leaves_other_treatment_warnings(monkeypatch, caplog):
    """If the euthyroid check and the TSH lookup ever disagree, only the levothyroxine warning
    (which must cite a TSH) is left out; the hCG warning of the same call still shows."""
    facts = rpl(2, tsh_results=(tsh(2.0),),
                interventions=(order(Category.LEVOTHYROXINE, "MedicationRequest/l1"),
                               order(Category.HCG, "MedicationRequest/h1")))
    before = {f.params["category"] for f in evaluate(facts, SIGN) if f.rule_id == "not-recommended-treatment"}
    assert before == {"levothyroxine", "hcg"}
    no_tsh = dataclasses.replace(rules_module.assess_thyroid(facts), tsh=None)
    monkeypatch.setattr(rules_module, "assess_thyroid", lambda _facts: no_tsh)
    monkeypatch.setattr(rules_module, "euthyroid_untreated", lambda _facts: True)
    after = {f.params["category"] for f in evaluate(facts, SIGN) if f.rule_id == "not-recommended-treatment"}
    assert after == {"hcg"}
    assert "levothyroxine warning without a TSH" in caplog.text  # left out, not silently


def test_findings_params_are_plain_json_values():
    import json

    for rule_id, case in ALL_CASES:
        for finding in findings_of(rule_id, case):
            json.dumps(dict(finding.params))  # raises on dates, enums, objects


def test_the_apl_series_kept_on_a_facts_object_is_its_own():
    """apl_series is worked out once per facts object: a changed copy (dataclasses.replace) must
    get its own series, and the kept one must not leak into it."""
    transient = apl_series_case(None)
    assert rules_module.apl_series(transient, Category.ACL_IGG).persistent is False
    confirmed = dataclasses.replace(transient, apl_results=apl_series_case(84).apl_results)
    assert rules_module.apl_series(confirmed, Category.ACL_IGG).persistent is True
    assert rules_module.apl_series(transient, Category.ACL_IGG).persistent is False
    assert transient == apl_series_case(None)  # the kept series takes no part in equality


def test_an_order_warning_finding_can_be_hashed():
    """Findings are frozen values; one about a draft order (a mutable Intervention) stays hashable."""
    finding = only("not-recommended-test", rpl(2, interventions=(order(Category.THROMBOPHILIA_TEST),)),
                   hook="order-sign")
    assert finding.order is not None
    assert hash(finding) == hash(dataclasses.replace(finding))
