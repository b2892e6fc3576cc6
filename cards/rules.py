"""The guideline rules: pure functions `PatientFacts -> list[Finding]`, one per rule id.

Source: the Dutch summary card "Herhaalde Miskraam" (NVOG adaptation of ESHRE 2022 Recurrent
Pregnancy Loss) and, for `anti-d-indicated` / `miscarriage-aftercare`, the midwifery leaflet on
miscarriage (with the corrections of guideline.md section 6.2). Each rule quotes the card sentence
it implements next to its logic. Ambiguities are resolved as in guideline.md section 4 (A1-A21);
precedence rules 1-5 of guideline.md section 3 live in `ALLOWED_WHEN` (order warnings).

Which rules run for which hook is data (`cards/data/rules.json`, key `hooks`); `evaluate` reads it:
- patient-view: the patient-level rules. It does NOT warn against already signed orders with a
  separate card: a signed order cannot be withdrawn with a CDS `delete` of a draft, the signer may
  have had an indication we cannot see, and a warning on every chart opening is the alert fatigue
  Epic advises against. Instead `rpl-summary` lists such orders under "not advised" (informational).
- order-select: only the not-recommended warnings, for the orders in focus (the `selections`).
- order-sign: the same rules; at order-sign every draft order is in focus.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import date, timedelta

from fhir_mappings.facts import (
    APL_TESTS,
    COUNTED_LOSS_KINDS,
    Category,
    Intervention,
    InterventionState,
    LabResult,
    LossKind,
    PatientFacts,
    weeks_days,
)

from .findings import RULE_IDS, Finding
from .knowledge import load_knowledge

log = logging.getLogger(__name__)

Rule = Callable[[PatientFacts], list[Finding]]

# --- thresholds (each quoted with its source next to the logic that uses it) -------------------
APL_REPEAT_INTERVAL = timedelta(days=84)  # A4: "herhalen na 12 weken" = at least 84 days later
PREGNANCY_TSH_UPPER_OFFSET = 0.5  # A3: pregnancy = usual reference values minus 0.5 mIU/L
SCH_CONSIDER_ABOVE = 4.0  # A3: subclinical hypothyroidism, TSH 4-10: consider (shared decision)
SCH_TREAT_ABOVE = 10.0  # A3: subclinical hypothyroidism, TSH > 10: treatment recommended
KARYOTYPE_AGE_BELOW = 35  # footnote *: "jonger dan 35 jaar"
KARYOTYPE_MIN_LOSSES = 3  # footnote *: "≥ 3 miskramen"
PROGESTERONE_MIN_LOSSES = 3  # "Bij ≥3 miskramen + bloedverlies ≤ AD 12 weken"
PROGESTERONE_BLEEDING_UNTIL = weeks_days(12)  # bleeding onset at or before 12+0 weeks
PROGESTERONE_UNTIL = weeks_days(16)  # "tot AD 16wk": indicated while GA < 16+0
ANTI_D_FROM = weeks_days(10)  # leaflet: "bij een miskraam na 10 weken" = from 10+0 (NHG: >= 10 wk)
MISCARRIAGE_WINDOW_END = weeks_days(24)  # A1: a loss is a loss before 24+0 weeks
# rpl-cds choices where the card and guideline.md give no number (for clinical sign-off; each is
# named in the rule's "verification" in cards/data/rules.json or in the card itself):
THYROID_PAIRING = timedelta(days=30)  # FT4 and TSH sampled within 30 days belong together
LONGEST_PREGNANCY = weeks_days(42)  # pregnancy of unknown age: a TSH of the past 42 weeks falls in it (A3 limit)
EUTHYROID_EVIDENCE_MAX_AGE = timedelta(days=365)  # R14 warnings rest on a TSH of the past year
FIRST_TRIMESTER_END = weeks_days(12)  # early-pregnancy support until 12+0 (said so in the card)


# =============================================================================================
# Shared predicates (also used by the order warnings' exceptions and by rpl-summary)
# =============================================================================================


def _newest_first(results: Iterable[LabResult]) -> list[LabResult]:
    dated = sorted((r for r in results if r.when is not None), key=lambda r: r.when, reverse=True)
    return dated + [r for r in results if r.when is None]


def pregnant_at(facts: PatientFacts, when: date | None) -> bool:
    """Was the sample taken in the current pregnancy? Unknown dates count as "yes" when pregnant
    now, so that the stricter pregnancy limit (A3) applies: the cost is an extra FT4, never a
    missed hypothyroidism."""
    if not facts.pregnant:
        return False
    if when is None:
        return True
    ga = facts.gestational_age_days
    start = facts.today - timedelta(days=ga if ga is not None else LONGEST_PREGNANCY)
    return when >= start


@dataclass(frozen=True)
class ThyroidAssessment:
    tsh: LabResult | None
    tsh_state: str  # high | low | normal | abnormal | unknown | absent
    tsh_upper_limit: float | None  # the limit used (pregnancy-adjusted when applicable)
    pregnancy_limits: bool
    ft4: LabResult | None  # the FT4 paired with this TSH
    ft4_state: str  # high | low | normal | abnormal | unknown | absent
    classification: str  # overt | subclinical | tsh-high | tsh-low | tsh-abnormal | euthyroid | unknown
    # The pregnancy limit rests on an assumption: the TSH is undated, or the pregnancy's age is
    # unknown and LONGEST_PREGNANCY was used (the card says so).
    pregnancy_assumed: bool = False


def _lab_state(result: LabResult, upper: float | None, *, trust_normal_flag: bool = True) -> str:
    if result.value is not None and upper is not None:
        if result.value > upper:
            return "high"
        if result.low is not None and result.value < result.low:
            return "low"
        return "normal"
    if result.value is not None and result.low is not None and result.value < result.low:
        return "low"
    flag = result.interpretation
    if flag in ("H", "HH"):
        return "high"
    if flag in ("L", "LL"):
        return "low"
    if flag in ("A", "AA"):
        return "abnormal"
    if flag == "N" and trust_normal_flag:
        return "normal"
    return "unknown"


def assess_thyroid(facts: PatientFacts) -> ThyroidAssessment:
    """A2/A3: classify the newest TSH (and the FT4 sampled with it).

    In pregnancy the lab's upper TSH limit is lowered by 0.5 mIU/L ("the usual reference values
    minus 0.5 mIU/L", Dutch adaptation). A lab "N" flag without a value cannot be re-judged
    against the pregnancy limit, so it counts as unknown in pregnancy.
    """
    tsh_list = _newest_first(facts.tsh_results)
    if not tsh_list:
        return ThyroidAssessment(None, "absent", None, False, None, "absent", "unknown")
    tsh = tsh_list[0]
    in_pregnancy = pregnant_at(facts, tsh.when)
    upper = tsh.high
    if upper is not None and in_pregnancy:
        upper = upper - PREGNANCY_TSH_UPPER_OFFSET
    tsh_state = _lab_state(tsh, upper, trust_normal_flag=not in_pregnancy)

    ft4 = None
    for candidate in _newest_first(facts.ft4_results):
        if candidate.when is None or tsh.when is None or abs(candidate.when - tsh.when) <= THYROID_PAIRING:
            ft4 = candidate
            break
    ft4_state = "absent" if ft4 is None else _lab_state(ft4, ft4.high)

    if tsh_state == "high":
        classification = {"low": "overt", "normal": "subclinical"}.get(ft4_state, "tsh-high")
    elif tsh_state == "normal" and ft4_state in ("normal", "absent"):
        classification = "euthyroid"
    elif tsh_state == "low":
        classification = "tsh-low"
    elif tsh_state == "abnormal":
        classification = "tsh-abnormal"
    else:
        classification = "unknown"
    assumed = in_pregnancy and (tsh.when is None or facts.gestational_age_days is None)
    return ThyroidAssessment(tsh, tsh_state, upper, in_pregnancy, ft4, ft4_state, classification, assumed)


def euthyroid_untreated(facts: PatientFacts) -> bool:
    """R14 applies only when euthyroidism is established by a recent TSH (within a year, so an old
    normal value cannot contradict a new diagnosis) and nothing suggests the normal TSH is the
    effect of treatment (hypothyroidism diagnosed, or levothyroxine already ordered / given)."""
    if facts.hypothyroidism_diagnosed:
        return False
    if any(i.state != InterventionState.DRAFT for i in facts.interventions_in(Category.LEVOTHYROXINE)):
        return False
    thyroid = assess_thyroid(facts)
    tsh = thyroid.tsh
    if tsh is None or tsh.when is None or facts.today - tsh.when > EUTHYROID_EVIDENCE_MAX_AGE:
        return False
    return thyroid.classification == "euthyroid"


@dataclass(frozen=True)
class AplSeries:
    category: Category
    episode_start: LabResult | None  # first positive of the current positive episode
    latest: LabResult | None  # newest dated result of this test
    persistent: bool  # positive again >= 84 days after the episode start
    repeat_due: bool  # positive, not yet confirmed or refuted by a result >= 84 days later

    @property
    def due_date(self) -> date | None:
        if self.episode_start is None or self.episode_start.when is None:
            return None
        return self.episode_start.when + APL_REPEAT_INTERVAL


def apl_series(facts: PatientFacts, category: Category) -> AplSeries:
    """A4: "verhoogd" per `LabResult.positive`; a repeat counts only when taken >= 84 days after the
    first positive sample of the episode (a repeat after 83 days does not count).

    Several rules and the summary ask for the same series (about 20 times per patient-view): it is
    worked out once per facts object and kept in the object's own dict. The facts are never changed
    after extraction (PatientFacts is frozen; the lab results inside it are plain slotted
    dataclasses that nothing mutates), so the kept value cannot go stale. At 10,000 resources this took evaluation from 29 to 7 ms (a
    grouping of the results per test alone: 29 to 23 ms). It needs PatientFacts to keep a
    `__dict__` (no slots): tests/test_rules.py calls this directly, so such a change fails there
    loudly rather than inside evaluate(), which would drop the rule."""
    memo = facts.__dict__.setdefault("_apl_series_memo", {})
    series = memo.get(category)
    if series is None:
        series = memo[category] = _apl_series(facts, category)
    return series


def _apl_series(facts: PatientFacts, category: Category) -> AplSeries:
    results = [r for r in facts.apl_results if r.category == category and r.positive is not None]
    dated = sorted((r for r in results if r.when is not None), key=lambda r: r.when)
    undated_positive = [r for r in results if r.when is None and r.positive]
    if not dated:
        start = undated_positive[0] if undated_positive else None
        return AplSeries(category, start, None, False, start is not None)
    latest = dated[-1]
    # Episode: the positives after the last negative that precedes the newest positive.
    positives = [r for r in dated if r.positive]
    if not positives:
        return AplSeries(category, None, latest, False, False)
    newest_positive = positives[-1]
    start = newest_positive
    for result in reversed(dated):
        if result.when > newest_positive.when:
            continue
        if not result.positive:
            break
        start = result
    confirmed_at = start.when + APL_REPEAT_INTERVAL
    persistent = newest_positive.when >= confirmed_at
    refuted = not latest.positive and latest.when >= confirmed_at
    return AplSeries(category, start, latest, persistent, not persistent and not refuted)


def persistent_apl_tests(facts: PatientFacts) -> list[AplSeries]:
    return [s for s in (apl_series(facts, c) for c in APL_TESTS) if s.persistent]


def aps_established(facts: PatientFacts) -> bool:
    """R17: persistent aPL (same test positive twice >= 12 weeks apart) or a recorded APS diagnosis."""
    return facts.aps_diagnosed or bool(persistent_apl_tests(facts))


def karyotype_criteria(facts: PatientFacts) -> dict[str, bool]:
    """Footnote *: "jonger dan 35 jaar, ≥ 3 miskramen heeft gehad én een belaste familieanamnese".
    A6: age at assessment (age at the 2nd miscarriage is not in the facts)."""
    return {
        "age-under-35": facts.age_years is not None and facts.age_years < KARYOTYPE_AGE_BELOW,
        "three-or-more-losses": facts.loss_count >= KARYOTYPE_MIN_LOSSES,
        "family-history": facts.family_history.recurrent_miscarriage_in_siblings_or_parents,
    }


def karyotype_criteria_met(facts: PatientFacts) -> bool:
    return all(karyotype_criteria(facts).values())


def genetics_referral_triggers(facts: PatientFacts) -> list[str]:
    """R19 + R20 (footnote *, second sentence); independent of R18 (precedence rule 5)."""
    triggers = []
    if facts.parental_karyotype_abnormal is True:
        triggers.append("abnormal-parental-karyotype")
    if facts.translocation_in_pregnancy_tissue:
        triggers.append("translocation-in-pregnancy-tissue")
    if facts.family_history.child_with_structural_anomalies:
        triggers.append("child-with-structural-anomalies")
    if facts.family_history.relative_with_chromosome_abnormality:
        triggers.append("relative-with-chromosome-abnormality")
    return triggers


def progesterone_indication(facts: PatientFacts) -> str | None:
    """R32 / A7: "Bij ≥3 miskramen + bloedverlies ≤ AD 12 weken" -> "2dd 400mg progesteron vaginaal
    tot AD 16wk".

    Returns 'confirmed' (intrauterine pregnancy seen on ultrasound), 'iup-unknown' (not recorded:
    the card asks to confirm it first and offers no one-click prescription), or None.
    An unknown bleeding onset counts only when today's gestational age is itself <= 12+0.
    """
    if not facts.pregnant or facts.active_miscarriage:
        return None
    if facts.loss_count < PROGESTERONE_MIN_LOSSES or not facts.vaginal_bleeding:
        return None
    ga = facts.gestational_age_days
    if ga is None or ga >= PROGESTERONE_UNTIL:
        return None
    onset = facts.bleeding_onset_gestational_age_days
    if onset is None:
        onset = ga
    if onset > PROGESTERONE_BLEEDING_UNTIL:
        return None
    if facts.intrauterine_pregnancy_confirmed is False:
        return None
    return "confirmed" if facts.intrauterine_pregnancy_confirmed else "iup-unknown"


def _iso(value: date | None) -> str | None:
    return value.isoformat() if value is not None else None


# =============================================================================================
# Patient-level rules (patient-view)
# =============================================================================================


def rpl_summary(facts: PatientFacts) -> list[Finding]:
    """R01 "-2 of meer miskramen = herhaalde miskramen." / R08 "(Obstetrische) anamnese afnemen" ->
    "Schets prognose o.b.v. anamnese en leeftijd" / R07 "-Wijs op informatie van
    patiëntenvereniging Freya." / R37 "± 50% is onverklaard (groot deel wel verklaard door
    aneuploidie)".

    Count with breakdown (A1), work-up checklist (done / ordered / missing / not advised), and the
    Brigham 1999 prognosis for VERIFIED cells only (guideline.md 5b).
    """
    if not facts.has_rpl:
        return []
    checklist = workup_checklist(facts)
    open_items = sum(1 for item in checklist if item["status"] in OPEN_STATUSES)
    return [
        Finding(
            "rpl-summary",
            {
                "variant": "default" if open_items else "workup-complete",
                "open_items": open_items,
                "loss_count": facts.loss_count,
                "loss_count_basis": facts.loss_count_basis,
                "breakdown": loss_breakdown(facts),
                "checklist": checklist,
                "not_advised_present": not_advised_present(facts),
                "prognosis": prognosis(facts),
                "age_years": facts.age_years,
            },
        )
    ]


def loss_breakdown(facts: PatientFacts) -> dict[str, int]:
    counts = {kind.value: 0 for kind in LossKind}
    for loss in facts.losses:
        counts[loss.kind.value] += 1
    counts["second-trimester"] = sum(
        1 for loss in facts.losses if loss.kind in COUNTED_LOSS_KINDS and loss.second_trimester
    )
    return {k: v for k, v in counts.items() if v}


def _status(facts: PatientFacts, category: Category) -> str:
    found = facts.interventions_in(category)
    if any(i.state == InterventionState.DONE for i in found):
        return "done"
    return "ordered" if found else "missing"


OPEN_STATUSES = frozenset({"missing", "repeat-due"})


def workup_checklist(facts: PatientFacts) -> list[dict]:
    """The recommended work-up (AANBEVOLEN, diagnostics) with each item's status."""
    items = []
    thyroid = assess_thyroid(facts)
    tsh_status = "done" if facts.tsh_results else _status(facts, Category.TSH)
    items.append({"item": Category.TSH.value, "status": tsh_status})
    if thyroid.tsh_state in ("high", "low", "abnormal"):
        ft4_status = "done" if thyroid.ft4 is not None else _status(facts, Category.FT4)
        items.append({"item": Category.FT4.value, "status": ft4_status})
    else:
        items.append({"item": Category.FT4.value, "status": "not-needed"})
    for category in APL_TESTS:
        series = apl_series(facts, category)
        if series.persistent:
            status = "persistent-positive"
        elif series.repeat_due:
            status = "repeat-due"
        elif series.latest is not None or any(r.category == category for r in facts.apl_results):
            status = "done"
        elif facts.aps_diagnosed:
            status = "aps-diagnosed"
        else:
            status = _status(facts, category)
        items.append({"item": category.value, "status": status})
    if facts.congenital_uterine_anomaly or facts.adenomyosis:
        uterine = "done"
    else:
        uterine = _status(facts, Category.UTERINE_IMAGING)
    items.append({"item": Category.UTERINE_IMAGING.value, "status": uterine})
    if facts.congenital_uterine_anomaly:
        items.append(
            {"item": Category.UROGENITAL_IMAGING.value, "status": _status(facts, Category.UROGENITAL_IMAGING)}
        )
    if facts.parental_karyotype_abnormal is not None:
        karyotype = "done"
    elif karyotype_criteria_met(facts):
        karyotype = _status(facts, Category.PARENTAL_KARYOTYPE)
    else:
        karyotype = "not-advised"
    criteria = karyotype_criteria(facts)
    items.append(
        {
            "item": Category.PARENTAL_KARYOTYPE.value,
            "status": karyotype,
            "criteria_met": sum(criteria.values()),
        }
    )
    return items


def not_advised_present(facts: PatientFacts) -> list[str]:
    """Active (signed, not yet done) orders the card advises against, where no exception applies
    and the order is in the RPL context: listed in the summary for information only (see the
    module docstring). Done items are left out: nothing can be changed about them any more."""
    table = load_knowledge().not_recommended
    present = []
    for intervention in facts.interventions:
        entry = table.get(intervention.category)
        if entry is None or intervention.state != InterventionState.ORDERED:
            continue
        if not in_rpl_order_context(facts, intervention) or exception_applies(
            entry.allowed_when, facts, intervention
        ):
            continue
        if intervention.category.value not in present:
            present.append(intervention.category.value)
    return present


def _age_band(age: int) -> int | None:
    # guideline.md 5.2: 18-22 -> 20, 23-27 -> 25, 28-32 -> 30, 33-37 -> 35, 38-42 -> 40, >= 43 -> 45.
    if age < 18:
        return None
    if age >= 43:
        return 45
    return 20 + 5 * ((age - 18) // 5)


def prognosis(facts: PatientFacts) -> dict:
    """Brigham 1999 (Hum Reprod 14:2868): chance of a successful next pregnancy by age and number
    of previous miscarriages. Only cells VERIFIED (second-hand) in guideline.md 5b are shown."""
    if facts.loss_count_basis == "rpl-diagnosis":
        return {"status": "count-unknown"}
    if facts.age_years is None:
        return {"status": "age-unknown"}
    band = _age_band(facts.age_years)
    if band is None:
        return {"status": "age-out-of-range"}
    losses = facts.loss_count
    if losses > 5:
        return {"status": "losses-out-of-range", "age_band": band}
    cell = load_knowledge().prognosis_cell(band, losses)
    if cell is None or not cell["verified"]:
        return {"status": "unverified", "age_band": band, "losses": losses}
    return {"status": "verified", "age_band": band, "losses": losses, "value": cell["value"]}


def preconception_advice(facts: PatientFacts) -> list[Finding]:
    """R03 "-Verricht een preconceptioneel advies consult o.b.v. aanbevelingen, aandacht voor zowel
    mannelijke als vrouwelijke factoren." / R04 "-Adviseer standaard vitamine D en foliumzuur." /
    R05 "-Overweeg verwijzing naar centrum met expertise in herhaalde miskramen." / R09 "Leefstijl
    anamnese man en vrouw" -> "Counseling/ verwijzing bij leefstijlaanpassingen".

    Preconception: RPL and not pregnant now (in a pregnancy `early-pregnancy-support` carries R04).
    """
    if not facts.has_rpl or facts.pregnant:
        return []
    return [
        Finding(
            "preconception-advice",
            {
                "folic_acid_recorded": facts.has_any(Category.FOLIC_ACID),
                "vitamin_d_recorded": facts.has_any(Category.VITAMIN_D_SUPPLEMENT),
            },
        )
    ]


def tsh_missing(facts: PatientFacts) -> list[Finding]:
    """R10 "TSH waarde" (A2: TSH only, A21: preconception)."""
    if not facts.has_rpl or facts.tsh_results or facts.has_any(Category.TSH):
        return []
    return [Finding("tsh-missing", {}, category=Category.TSH)]


def ft4_missing(facts: PatientFacts) -> list[Finding]:
    """R11 "Bij abnormale waarden: vrijT4 bepalen" (A3: in pregnancy upper TSH limit - 0.5)."""
    if not facts.has_rpl:
        return []
    thyroid = assess_thyroid(facts)
    if thyroid.tsh_state not in ("high", "low", "abnormal") or thyroid.ft4 is not None:
        return []
    tsh = thyroid.tsh
    assert tsh is not None
    for order in facts.interventions_in(Category.FT4):
        if order.state != InterventionState.DONE or order.when is None or tsh.when is None:
            return []
        if order.when >= tsh.when - THYROID_PAIRING:
            return []
    return [
        Finding(
            "ft4-missing",
            {
                "tsh_value": tsh.value,
                "tsh_unit": tsh.unit,
                "tsh_date": _iso(tsh.when),
                "tsh_state": thyroid.tsh_state,
                "upper_limit": thyroid.tsh_upper_limit,
                "pregnancy_limits": thyroid.pregnancy_limits,
                "pregnancy_limits_assumed": thyroid.pregnancy_assumed,
            },
            category=Category.FT4,
        )
    ]


def hypothyroidism_treatment(facts: PatientFacts) -> list[Finding]:
    """R12/R13 "Indien sprake is van hypothyreoïdie: behandel met levothyroxine".

    A3 (Dutch adaptation): overt -> treat; subclinical with TSH > 10 -> recommended; TSH > 4 to 10
    -> consider, shared decision; never for TSH <= 4 (incl. 2.5-4) or TPO antibodies alone. Silent
    when levothyroxine is already ordered or given (precedence rule 3 keeps R14 apart).
    """
    if not facts.has_rpl or facts.has_any(Category.LEVOTHYROXINE):
        return []
    thyroid = assess_thyroid(facts)
    tsh = thyroid.tsh
    if thyroid.classification == "overt":
        variant = "overt"
    elif thyroid.classification == "subclinical" and tsh is not None and tsh.value is not None:
        if tsh.value > SCH_TREAT_ABOVE:
            variant = "sch-treat"
        elif tsh.value > SCH_CONSIDER_ABOVE:
            variant = "sch-consider"
        else:
            return []
    else:
        return []
    assert tsh is not None
    ft4 = thyroid.ft4
    return [
        Finding(
            "hypothyroidism-treatment",
            {
                "variant": variant,
                "tsh_value": tsh.value,
                "tsh_unit": tsh.unit,
                "tsh_date": _iso(tsh.when),
                "ft4_value": ft4.value if ft4 else None,
                "ft4_unit": ft4.unit if ft4 else None,
                "upper_limit": thyroid.tsh_upper_limit,
                "pregnancy_limits": thyroid.pregnancy_limits,
                "pregnancy_limits_assumed": thyroid.pregnancy_assumed,
            },
            category=Category.LEVOTHYROXINE,
        )
    ]


def apl_missing(facts: PatientFacts) -> list[Finding]:
    """R15 "Antifosfolipidenantistoffen (Lupus Anticoagulans, anticardiolipine IgG en IgM, β2
    glycoproteïne IgG en IgM)": list every one of the five tests that is neither done nor ordered."""
    if not facts.has_rpl or facts.aps_diagnosed:
        return []
    tested = {r.category for r in facts.apl_results}
    missing = [c.value for c in APL_TESTS if c not in tested and not facts.has_any(c)]
    if not missing:
        return []
    return [Finding("apl-missing", {"missing": missing})]


def apl_repeat(facts: PatientFacts) -> list[Finding]:
    """R16 "Indien verhoogd: herhalen na 12 weken" (A4: repeat >= 84 days after the first positive
    sample; due date = first positive + 84 days)."""
    if not facts.has_rpl or facts.aps_diagnosed:
        return []
    due = []
    for category in APL_TESTS:
        series = apl_series(facts, category)
        if not series.repeat_due:
            continue
        start = series.episode_start
        assert start is not None
        pending = [
            i
            for i in facts.interventions_in(category)
            if i.state != InterventionState.DONE
            and (i.when is None or start.when is None or i.when >= start.when)
        ]
        if pending:
            continue  # the repeat is already ordered
        due.append(
            {"test": category.value, "first_positive": _iso(start.when), "due_date": _iso(series.due_date)}
        )
    if not due:
        return []
    dates = [d["due_date"] for d in due if d["due_date"] is not None]
    params = {"tests": due, "earliest_due": min(dates) if dates else None}
    if not dates:
        params["variant"] = "no-date"
    return [Finding("apl-repeat", params)]


def aps_treatment(facts: PatientFacts) -> list[Finding]:
    """R17 "Indien persisterend verhoogd: lage dosis aspirine i.c.m. LMWH".

    A5: low-dose aspirin + prophylactic-dose LMWH in a (next) pregnancy; dose and start moment are
    the clinician's; with exactly 2 losses show the >=3-loss caveat (NIV: "tenminste drie vroege
    miskramen"). Silent when both are already ordered or given.
    """
    if not facts.has_rpl:
        return []
    persistent = persistent_apl_tests(facts)
    if not persistent and not facts.aps_diagnosed:
        return []
    if facts.has_any(Category.LOW_DOSE_ASPIRIN) and facts.has_any(Category.LMWH):
        return []
    return [
        Finding(
            "aps-treatment",
            {
                "basis": "persistent-apl" if persistent else "aps-diagnosis",
                "tests": [s.category.value for s in persistent],
                "two_losses_caveat": facts.loss_count == 2,
                "pregnant": facts.pregnant,
                "aspirin_present": facts.has_any(Category.LOW_DOSE_ASPIRIN),
                "lmwh_present": facts.has_any(Category.LMWH),
            },
        )
    ]


def uterine_imaging_missing(facts: PatientFacts) -> list[Finding]:
    """R22 "Onderzoek anatomie van de uterus, bij voorkeur TVE: -3D-echo (congenitale uterine
    afwijkingen) en; -2D-echo (adenomyosis)". A recorded congenital anomaly or adenomyosis shows
    the examination was done."""
    if not facts.has_rpl or facts.has_any(Category.UTERINE_IMAGING):
        return []
    if facts.congenital_uterine_anomaly or facts.adenomyosis:
        return []
    return [Finding("uterine-imaging-missing", {}, category=Category.UTERINE_IMAGING)]


def urogenital_tract_check(facts: PatientFacts) -> list[Finding]:
    """R23 "Bij uterine vormafwijking: diagnostiek naar afwijkingen in de tractus urogenitalis"."""
    if not facts.has_rpl or not facts.congenital_uterine_anomaly:
        return []
    if facts.has_any(Category.UROGENITAL_IMAGING):
        return []
    return [Finding("urogenital-tract-check", {}, category=Category.UROGENITAL_IMAGING)]


def karyotype_indicated(facts: PatientFacts) -> list[Finding]:
    """R18 "Karyotypering ouders alléén bij risicofactoren*" with footnote *: "Aangeraden wordt
    alleen genetische analyse te verrichten indien patiënte jonger is dan 35 jaar, ≥ 3 miskramen
    heeft gehad én een belaste familieanamnese (...) heeft."

    A6: all three criteria (conjunctive, literal footnote). With 1-2 criteria nothing is advised
    here; rpl-summary shows "not advised" with the A6 note (individual risk assessment possible).
    """
    if not facts.has_rpl or not karyotype_criteria_met(facts):
        return []
    if facts.parental_karyotype_abnormal is not None or facts.has_any(Category.PARENTAL_KARYOTYPE):
        return []
    return [
        Finding(
            "karyotype-indicated",
            {"age_years": facts.age_years, "loss_count": facts.loss_count},
            category=Category.PARENTAL_KARYOTYPE,
        )
    ]


def clinical_genetics_referral(facts: PatientFacts) -> list[Finding]:
    """R19 "Indien afwijkend: genetische counseling" and R20 "In het geval van een eerdere geboorte
    van een kind met structurele afwijkingen (in de familie), een familielid met een
    (on)gebalanceerde chromosoomafwijking, of de detectie van een (ongebalanceerde) translocatie in
    zwangerschapsweefsel is een verwijzing naar een afdeling klinische genetica geïndiceerd."

    Precedence rule 5: independent of R18. Result-based triggers (abnormal parental karyotype,
    translocation in pregnancy tissue) fire without the RPL count; family-history triggers only
    in the RPL context the card is written for.
    """
    triggers = genetics_referral_triggers(facts)
    result_based = {"abnormal-parental-karyotype", "translocation-in-pregnancy-tissue"}
    if not facts.has_rpl:
        triggers = [t for t in triggers if t in result_based]
    if not triggers or facts.has_any(Category.GENETIC_COUNSELLING):
        return []
    return [
        Finding("clinical-genetics-referral", {"triggers": triggers}, category=Category.GENETIC_COUNSELLING)
    ]


def progesterone_indicated(facts: PatientFacts) -> list[Finding]:
    """R32 "Bij ≥3 miskramen + bloedverlies ≤ AD 12 weken" -> "2dd 400mg progesteron vaginaal tot
    AD 16wk" (A7: bleeding onset <= 12+0, now < 16+0, intrauterine pregnancy on ultrasound).

    Unknown intrauterine status: the card fires with variant 'iup-unknown' ("confirm the
    intrauterine pregnancy by ultrasound first") and without a prescription suggestion.
    """
    indication = progesterone_indication(facts)
    if indication is None or facts.has_any(Category.PROGESTERONE):
        return []
    ga = facts.gestational_age_days
    assert ga is not None
    until = facts.today + timedelta(days=PROGESTERONE_UNTIL - ga)
    return [
        Finding(
            "progesterone-indicated",
            {
                "variant": indication,
                "loss_count": facts.loss_count,
                "gestational_age_days": ga,
                "bleeding_onset_days": facts.bleeding_onset_gestational_age_days,
                "until_date": until.isoformat(),
                "start_date": facts.today.isoformat(),
            },
            category=Category.PROGESTERONE,
        )
    ]


def cervical_surveillance(facts: PatientFacts) -> list[Finding]:
    """R34 "Bij tweede trimester miskramen en verdenking op een cervixinsufficiëntie" ->
    "Herhaalde echoscopische follow-up van de cervix" / "Cerclage alleen in selecte casus".
    A8: second trimester = 12+0 to < 24+0; no automated cerclage advice (specialist decision)."""
    if not facts.has_rpl or not (facts.second_trimester_loss and facts.cervical_insufficiency_suspected):
        return []
    return [Finding("cervical-surveillance", {"variant": "pregnant" if facts.pregnant else "default"})]


def early_pregnancy_support(facts: PatientFacts) -> list[Finding]:
    """R06 "-Bied bij nieuwe zwangerschap ondersteunende zorg aan, met vroege vitaliteitecho’s." and
    R04 "-Adviseer standaard vitamine D en foliumzuur." Early = first trimester (< 12+0) or
    gestational age unknown; not during an ongoing miscarriage. The card names no limit: the
    first-trimester bound is rpl-cds's own choice, said so in the card, pending clinical review."""
    if not facts.has_rpl or not facts.pregnant or facts.active_miscarriage:
        return []
    ga = facts.gestational_age_days
    if ga is not None and ga >= FIRST_TRIMESTER_END:
        return []
    return [Finding("early-pregnancy-support", {"gestational_age_days": ga})]


def anti_d_indicated(facts: PatientFacts) -> list[Finding]:
    """Leaflet: "in het geval van een negatieve bloedgroep krijg je bij een miskraam na 10 weken
    zwangerschap een injectie met anti-D" (NHG-Standaard Miskraam: RhD-negative, miscarriage at
    >= 10 weeks). From 10+0; unknown RhD status or gestational age: silent (cannot be decided)."""
    if not facts.active_miscarriage or facts.rhd_negative is not True:
        return []
    ga = facts.active_miscarriage_gestational_age_days
    if ga is None or ga < ANTI_D_FROM or facts.anti_d_given_during_current_loss:
        return []
    if any(i.state != InterventionState.DONE for i in facts.interventions_in(Category.ANTI_D)):
        return []  # already ordered for this loss
    return [Finding("anti-d-indicated", {"gestational_age_days": ga}, category=Category.ANTI_D)]


def miscarriage_aftercare(facts: PatientFacts) -> list[Finding]:
    """Leaflet (corrected, guideline.md 6.2): "Bij koorts, hevig bloedverlies met eventueel
    flauwvallen, lang aanhoudende pijn en bloedverlies heb je reden om ons te bellen."; options
    expectant / medication / curettage; folic acid; early scan at 7-8 weeks next time; Freya.
    No medication regimen is given (guideline.md 6.2: the leaflet's is wrong and the NVOG dose
    module is unverified; the prescribed regimen applies), only the NVOG's single misoprostol
    administration; the leaflet's "80% within a week" and "chromosome testing after 2
    miscarriages" are not reused."""
    if not facts.active_miscarriage:
        return []
    return [
        Finding(
            "miscarriage-aftercare",
            {"gestational_age_days": facts.active_miscarriage_gestational_age_days, "rpl": facts.has_rpl},
        )
    ]


# =============================================================================================
# Order-entry rules (order-select, order-sign): one finding per order in focus
# =============================================================================================

# Exceptions to the NIET AANBEVOLEN list, referenced by name from cards/data/rules.json
# (`not_recommended.<category>.allowed_when`). Each returns True when the order is NOT warned against.
ALLOWED_WHEN: dict[str, Callable[[PatientFacts, Intervention], bool]] = {
    # R21 / A12: "tenzij sprake van structurele afwijkingen/echoafwijkingen"
    "fetal-structural-anomaly": lambda f, o: f.fetal_structural_anomaly,
    # R18 / A6 footnote criteria, or a clinical-genetics trigger (precedence rule 5)
    "karyotype-criteria-or-genetics-trigger": lambda f, o: (
        karyotype_criteria_met(f) or bool(genetics_referral_triggers(f))
    ),
    # R28 / A9: "ANA (overweeg bij klinische symptomen)"
    "autoimmune-disease-signs": lambda f, o: f.autoimmune_disease_signs,
    # R29 / A11: "Hormoonprofiel (wel bij symptomen van cyclusstoornis)"; A11 also hands LH,
    # androgens and ovarian reserve over to the cycle-disorder work-up
    "cycle-disorder": lambda f, o: f.cycle_disorder,
    # R30 / A10: "Prolactine (wel bij symptomen van prolactineafwijkingen (oligo/amenorroe))"; a
    # diagnosed hyperprolactinaemia is followed up with prolactin (another indication)
    "oligo-amenorrhoea-or-hyperprolactinaemia": lambda f, o: f.oligo_or_amenorrhoea or f.hyperprolactinaemia,
    # R14 / precedence rule 3: levothyroxine is advised against only in established euthyroidism
    "not-euthyroid-untreated": lambda f, o: not euthyroid_untreated(f),
    # R17 / precedence rule 2: LMWH with persistent aPL / APS
    "aps-established": lambda f, o: aps_established(f),
    # R32 / precedence rule 1: progesterone with >= 3 losses + early bleeding (incl. IUP unknown)
    "progesterone-indication": lambda f, o: progesterone_indication(f) is not None,
    # Bromocriptine treats a diagnosed hyperprolactinaemia: that is another indication than the
    # card's question (improving pregnancy outcome in RPL), so no warning (silence, not advice).
    "hyperprolactinaemia": lambda f, o: f.hyperprolactinaemia,
    # R36 / precedence rule 4: "Prednison (wel in studieverband)"
    "in-study": lambda f, o: o.in_study,
}


def exception_applies(name: str | None, facts: PatientFacts, order: Intervention) -> bool:
    return name is not None and ALLOWED_WHEN[name](facts, order)


def in_rpl_order_context(facts: PatientFacts, order: Intervention) -> bool:
    """Warnings concern the RPL work-up: the patient has RPL or the order's reason is recurrent
    miscarriage; never when the order names another indication. Scope (A1): in an ongoing
    pregnancy of 24+0 weeks or more the miscarriage window is closed, so only orders whose own
    reason is recurrent miscarriage are judged (e.g. corticosteroids for fetal lung maturation or
    LMWH for VTE prophylaxis late in pregnancy are not this card's subject)."""
    if order.reason_is_other_indication:
        return False
    if order.reason_is_rpl:
        return True
    if not facts.has_rpl:
        return False
    ga = facts.gestational_age_days
    return not (facts.pregnant and ga is not None and ga >= MISCARRIAGE_WINDOW_END)


def _not_recommended(facts: PatientFacts, kind: str, rule_id: str) -> list[Finding]:
    table = load_knowledge().not_recommended
    findings = []
    for order in facts.focus_orders:
        entry = table.get(order.category)
        if entry is None or entry.kind != kind:
            continue
        if not in_rpl_order_context(facts, order) or exception_applies(entry.allowed_when, facts, order):
            continue
        if entry.allowed_when is not None and not facts.has_rpl:
            # Only the order's reason names recurrent miscarriage (e.g. an order in the partner's
            # chart): the card's exception depends on the woman's history, which these facts may
            # not hold, so the warning cannot be judged and is left out.
            continue
        params: dict = {
            "category": order.category.value,
            "order_ref": order.resource_ref,
            "order_display": order.code_display,
        }
        if order.category == Category.PARENTAL_KARYOTYPE:
            params["criteria"] = karyotype_criteria(facts)
        if order.category == Category.LEVOTHYROXINE:
            tsh = assess_thyroid(facts).tsh
            if tsh is None:
                # Unreachable while euthyroid_untreated() requires a TSH; if that ever changes,
                # only this warning (which must cite the TSH) is left out, not every other
                # treatment warning of the call, as a failing assert would do via evaluate().
                log.error("levothyroxine warning without a TSH to cite: left out (a rules bug)")
                continue
            params.update(tsh_value=tsh.value, tsh_unit=tsh.unit, tsh_date=_iso(tsh.when))
        findings.append(Finding(rule_id, params, order=order, category=order.category))
    return findings


def not_recommended_test(facts: PatientFacts) -> list[Finding]:
    """Diagnostics NIET AANBEVOLEN (R21, R25, R27-R31, R18 footnote): one warning per order in focus."""
    return _not_recommended(facts, "test", "not-recommended-test")


def not_recommended_treatment(facts: PatientFacts) -> list[Finding]:
    """Treatment NIET AANBEVOLEN (R14, R24, R26, R33, R35, R36): one warning per order in focus."""
    return _not_recommended(facts, "treatment", "not-recommended-treatment")


# =============================================================================================

RULES: dict[str, Rule] = {
    "rpl-summary": rpl_summary,
    "preconception-advice": preconception_advice,
    "tsh-missing": tsh_missing,
    "ft4-missing": ft4_missing,
    "hypothyroidism-treatment": hypothyroidism_treatment,
    "apl-missing": apl_missing,
    "apl-repeat": apl_repeat,
    "aps-treatment": aps_treatment,
    "uterine-imaging-missing": uterine_imaging_missing,
    "urogenital-tract-check": urogenital_tract_check,
    "karyotype-indicated": karyotype_indicated,
    "clinical-genetics-referral": clinical_genetics_referral,
    "progesterone-indicated": progesterone_indicated,
    "cervical-surveillance": cervical_surveillance,
    "early-pregnancy-support": early_pregnancy_support,
    "anti-d-indicated": anti_d_indicated,
    "miscarriage-aftercare": miscarriage_aftercare,
    "not-recommended-test": not_recommended_test,
    "not-recommended-treatment": not_recommended_treatment,
}
assert tuple(RULES) == RULE_IDS, "RULES must list every rule id, in RULE_IDS order"

HOOKS = ("patient-view", "order-select", "order-sign")


def rules_for_hook(hook: str) -> tuple[str, ...]:
    if hook not in HOOKS:
        raise ValueError(f"unknown hook {hook!r}")
    meta = load_knowledge().rules
    return tuple(rule_id for rule_id in RULE_IDS if hook in meta[rule_id]["hooks"])


def evaluate(facts: PatientFacts, hook: str) -> list[Finding]:
    """Run the rules that apply to `hook` (cards/data/rules.json) in rule-id order.

    A rule that fails with an unexpected error is logged (rule id only, no patient data) and
    skipped, so one defect cannot silence every other card.
    """
    findings: list[Finding] = []
    for rule_id in rules_for_hook(hook):
        try:
            findings.extend(RULES[rule_id](facts))
        except Exception:  # noqa: BLE001 - isolate one rule's defect, see docstring
            log.exception("rule %s failed; its cards are left out", rule_id)
    return findings
