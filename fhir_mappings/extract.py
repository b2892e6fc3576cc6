"""FHIR resources (plain dicts) -> PatientFacts.

Reads R4 first, and what it can of STU3 / DSTU2 (ProcedureRequest, MedicationOrder, string statuses,
`reasonCodeableConcept`, `dateWritten` ...). Never raises on data: a resource whose shape or dates
cannot be read is skipped and counted in `PatientFacts.skipped_resources`; unknown codes and
resource types are simply not used. Every interpretation choice is documented in
fhir_mappings/README.md; the constants below are the tunable ones.

Speed matters (10,000 resources per hook call): one pass over the resources with dict lookups, no
FHIR model classes, dates parsed only for resources that matched a concept.
"""

from __future__ import annotations

import re
from bisect import bisect_right
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import date, timedelta

from .codes import CodeTables, load_code_tables
from .facts import (
    APL_TESTS,
    COUNTED_LOSS_KINDS,
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

# --- interpretation constants (README "Interpretation choices") -----------------------------------
SAME_LOSS_WINDOW_DAYS = 28  # loss records this close together describe one loss (no new pregnancy fits)
ACTIVE_MISCARRIAGE_DAYS = 42  # a miscarriage is "current" for 6 weeks after its onset
MAX_PREGNANCY_DAYS = 300  # a dating older than 42+6 weeks of GA belongs to an earlier pregnancy
DATING_GRACE_DAYS = 14  # a dating recorded up to 2 weeks after a loss may still describe it
LOW_DOSE_ASPIRIN_MAX_MG = 100.0  # ESHRE low-dose aspirin is 75-100 mg/day
ANTI_D_BEFORE_LOSS_DAYS = 7  # anti-D given up to a week before the miscarriage onset counts
DAYS_PER_TERM = 280  # estimated due date = start of gestation + 280 days

# --- status vocabularies (R4, STU3 and DSTU2 spellings) ------------------------------------------
SKIP_VERIFICATION = frozenset({"refuted", "entered-in-error"})
UNCONFIRMED_VERIFICATION = frozenset({"provisional", "differential", "unconfirmed"})
CURRENT_CLINICAL = frozenset({"active", "recurrence", "relapse"})
OBSERVATION_RESULT_STATUSES = frozenset({"final", "amended", "corrected", "preliminary", "appended"})
REQUEST_ORDERED = frozenset(
    {"active", "on-hold", "suspended", "requested", "received", "accepted", "in-progress"}
)
REQUEST_DONE = frozenset({"completed"})
REQUEST_INTENTS = frozenset(
    {"order", "original-order", "reflex-order", "filler-order", "instance-order", "plan"}
)
DRAFT_SKIP_STATUSES = frozenset(
    {"cancelled", "revoked", "entered-in-error", "stopped", "aborted", "rejected"}
)
ADMINISTRATION_DONE = frozenset({"completed", "in-progress"})
STATEMENT_DONE = frozenset({"active", "completed"})
PROCEDURE_DONE = frozenset({"completed", "in-progress"})

INTERPRETATION = {
    "H": "H", "HH": "H", "HU": "H", ">": "H",
    "L": "L", "LL": "L", "LU": "L", "<": "L",
    "N": "N",
    "A": "A", "AA": "A",
    "POS": "POS", "DET": "POS",
    "NEG": "NEG", "ND": "NEG",
}  # fmt: skip
ABNORMAL_INTERPRETATIONS = frozenset({"H", "L", "A", "POS"})
WEEK_UNITS = frozenset({"wk", "w", "week", "weeks", "wk(s)", "weken", "week(s)"})
DAY_UNITS = frozenset({"d", "day", "days", "dagen", "dag"})

# Concepts in a reason that make an order part of the pregnancy-loss work-up.
RPL_REASONS = frozenset(
    {"recurrent-miscarriage", "miscarriage", "second-trimester-miscarriage", "biochemical-loss"}
)
LOSS_KIND_BY_CONCEPT = (  # first match wins: an excluded kind outranks a counted one (A1)
    ("ectopic-pregnancy", LossKind.ECTOPIC),
    ("molar-pregnancy", LossKind.MOLAR),
    ("miscarriage", LossKind.MISCARRIAGE),
    ("second-trimester-miscarriage", LossKind.MISCARRIAGE),
    ("biochemical-loss", LossKind.BIOCHEMICAL),
)
LOSS_KIND_RANK = {
    LossKind.ECTOPIC: 0, LossKind.MOLAR: 1, LossKind.MISCARRIAGE: 2,
    LossKind.BIOCHEMICAL: 3, LossKind.UNSPECIFIED: 4,
}  # fmt: skip
# Condition concept -> PatientFacts flag; `True` in the tuple: a suspected (provisional) record counts.
CONDITION_FLAGS: dict[str, tuple[tuple[str, ...], bool]] = {
    "hypothyroidism": (("hypothyroidism_diagnosed",), False),
    "antiphospholipid-syndrome": (("aps_diagnosed",), False),
    "hereditary-thrombophilia": (("hereditary_thrombophilia",), False),
    "congenital-uterine-anomaly": (("congenital_uterine_anomaly",), False),
    "adenomyosis": (("adenomyosis",), False),
    "uterine-polyp-myoma-adhesions": (("uterine_polyp_myoma_or_adhesions",), False),
    "hyperprolactinaemia": (("hyperprolactinaemia",), False),
    "cervical-insufficiency": (("cervical_insufficiency_suspected",), True),
    "cycle-disorder": (("cycle_disorder",), True),
    "oligo-amenorrhoea": (("oligo_or_amenorrhoea", "cycle_disorder"), True),
    "autoimmune-disease": (("autoimmune_disease_signs",), True),
    "fetal-structural-anomaly": (("fetal_structural_anomaly",), True),
    "translocation-in-pregnancy-tissue": (("translocation_in_pregnancy_tissue",), True),
}
# Flags an Observation can also set (a coded finding as Observation.code or value).
OBSERVATION_FLAGS = ("fetal-structural-anomaly", "translocation-in-pregnancy-tissue", "autoimmune-disease")
RHD_CONCEPTS = frozenset({"rhd-type", "abo-rh-panel"})
KARYOTYPE_ABNORMAL_CONCEPTS = frozenset({"chromosomal-abnormality", "balanced-translocation"})
# Category id -> the PatientFacts result list it feeds.
LAB_BUCKET = {Category.TSH.value: "tsh", Category.FT4.value: "ft4"} | {c.value: "apl" for c in APL_TESTS}

ISCN_NORMAL = re.compile(r"46,X[XY]")
ISCN_KARYOTYPE = re.compile(r"(?:mos)?\d{2}(?:~\d{2})?,")
ISCN_TRANSLOCATION = re.compile(r"(?:^|[,;])(?:t|der|rob)\(")
DOSE_MG_TEXT = re.compile(r"(\d+(?:[.,]\d+)?)\s*mg\b", re.IGNORECASE)
GA_TEXT = re.compile(r"^\s*(\d{1,2})\s*(?:\+\s*(\d))?\s*(?:w|wk|weken|weeks)?\s*$", re.IGNORECASE)


NUMBER_TYPES = (int, float)
# Enum member access is slow in CPython 3.11; the hot paths use these module constants.
DONE, ORDERED, DRAFT = InterventionState.DONE, InterventionState.ORDERED, InterventionState.DRAFT
LOW_DOSE_ASPIRIN_ID, ANTI_D_ID = Category.LOW_DOSE_ASPIRIN.value, Category.ANTI_D.value
PARENTAL_KARYOTYPE_ID = Category.PARENTAL_KARYOTYPE.value
KARYOTYPE_CATEGORY_IDS = frozenset({PARENTAL_KARYOTYPE_ID, Category.PREGNANCY_TISSUE_GENETICS.value})
MISCARRIAGE_KIND = LossKind.MISCARRIAGE
CATEGORY_BY_ID = {c.value: c for c in Category}
NO_CONTEXT: tuple = ((), False, False, False)


READ_ERRORS = (ValueError, TypeError, AttributeError, KeyError, IndexError, OverflowError)


class Malformed(ValueError):
    """Raised inside a handler when a resource cannot be read; the resource is skipped and counted."""


# ---------------------------------------------------------------------------------------------------
# Public API


def flatten_bundle(bundle_or_resource: object) -> list[dict]:
    """The resources inside a Bundle (nested Bundles too), or [resource] for a single resource.

    Tolerates a Bundle without `type`, entries without `resource`, and non-dict junk (skipped)."""
    out: list[dict] = []
    _flatten_into(bundle_or_resource, out, depth=0)
    return out


def extract_patient_facts(
    resources: Iterable[dict],
    *,
    today: date,
    draft_orders: Iterable[dict] = (),
    focus_refs: set[str] | None = None,
    codes: CodeTables | None = None,
) -> PatientFacts:
    """Derive the guideline's patient facts from FHIR resources (see fhir_mappings/README.md).

    `draft_orders`: context.draftOrders resources (state DRAFT). `focus_refs`: "Type/id" of the
    orders the hook focuses on (order-select `selections`); None means every draft (order-sign)."""
    state = _State(codes or load_code_tables(), today)
    items: list[dict] = []
    if isinstance(resources, dict):  # a single Bundle or resource
        resources = [resources]
    for item in resources if resources is not None else ():
        if isinstance(item, dict):
            if item.get("resourceType") == "Bundle":
                items.extend(flatten_bundle(item))
            else:
                items.append(item)
        else:
            state.skipped += 1
    state.items = items
    for resource in items:
        resource_type = resource.get("resourceType")
        handler = HANDLERS.get(resource_type) if isinstance(resource_type, str) else None
        if handler is not None:
            try:
                handler(state, resource)
            except READ_ERRORS:
                state.skipped += 1
    focus = None if focus_refs is None else {_short_ref(r) for r in focus_refs if isinstance(r, str)}
    drafts = [draft_orders] if isinstance(draft_orders, dict) else list(draft_orders or ())
    for draft in drafts:
        if isinstance(draft, dict) and draft.get("resourceType") == "Bundle":
            for inner in flatten_bundle(draft):
                _guarded(_draft_order, state, inner, focus)
        else:
            _guarded(_draft_order, state, draft, focus)
    return state.build()


# ---------------------------------------------------------------------------------------------------
# Reading helpers


def _flatten_into(value: object, out: list[dict], depth: int) -> None:
    if depth > 4:
        return
    if isinstance(value, list):
        for item in value:
            _flatten_into(item, out, depth)
        return
    if not isinstance(value, dict):
        return
    if value.get("resourceType") == "Bundle" or ("resourceType" not in value and "entry" in value):
        entries = value.get("entry")
        if isinstance(entries, list):
            for entry in entries:
                if isinstance(entry, dict) and isinstance(entry.get("resource"), dict):
                    _flatten_into(entry["resource"], out, depth + 1)
        return
    out.append(value)


def _guarded(handler, state: _State, resource: dict, *args) -> None:
    try:
        handler(state, resource, *args)
    except READ_ERRORS:
        state.skipped += 1


def _parse_date(value: object) -> date | None:
    """FHIR date / dateTime / instant -> the calendar date as recorded; partial dates take the
    first day ("2019" -> 2019-01-01). Raises Malformed for anything else."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise Malformed("date is not a string")
    n = len(value)
    if n >= 10:
        return date.fromisoformat(value[:10])
    if n == 7:
        return date(int(value[:4]), int(value[5:7]), 1)
    if n == 4 and value.isdigit():
        return date(int(value), 1, 1)
    raise Malformed(f"unreadable date {value!r}")


def _period_start(period: object) -> date | None:
    if period is None:
        return None
    if not isinstance(period, dict):
        raise Malformed("period is not an object")
    return _parse_date(period.get("start")) or _parse_date(period.get("end"))


def _first_date(resource: dict, *names: str) -> date | None:
    for name in names:
        value = resource.get(name)
        if value is None:
            continue
        found = _period_start(value) if name.endswith("Period") else _parse_date(value)
        if found is not None:
            return found
    return None


def _first_readable_date(resource: dict, *names: str) -> date | None:
    """As _first_date, passing over fields that cannot be read."""
    for name in names:
        try:
            found = _first_date(resource, name)
        except READ_ERRORS:
            continue
        if found is not None:
            return found
    return None


def _status(value: object) -> str | None:
    """A status as a lower-case code: R4 CodeableConcept or STU3/DSTU2 string."""
    if value is None:
        return None
    if isinstance(value, str):
        return value.lower()
    if isinstance(value, dict):
        for coding in value.get("coding") or ():
            if isinstance(coding, dict) and isinstance(coding.get("code"), str):
                return coding["code"].lower()
        return None
    raise Malformed("status of unknown shape")


def _number(value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, NUMBER_TYPES):
        raise Malformed("number expected")
    return float(value)


def _as_list(value: object) -> list:
    if value is None:
        return []
    if isinstance(value, list):
        return value
    return [value]


def _ref(resource: dict) -> str:
    rid = resource.get("id")
    return f"{resource.get('resourceType')}/{rid if isinstance(rid, str) else '?'}"


def _short_ref(reference: str) -> str:
    """'https://x/fhir/MedicationRequest/1/_history/2' -> 'MedicationRequest/1'."""
    parts = [p for p in reference.split("/") if p]
    if "_history" in parts:
        parts = parts[: parts.index("_history")]
    return "/".join(parts[-2:])


def _interpretation(value: object) -> str | None:
    for cc in _as_list(value):
        if isinstance(cc, dict):
            for coding in cc.get("coding") or ():
                if isinstance(coding, dict):
                    mapped = INTERPRETATION.get(str(coding.get("code")).upper())
                    if mapped:
                        return mapped
    return None


def _range_interpretation(value: float | None, comparator: object, low: float | None, high: float | None) -> str | None:
    """Fallback when the lab sent no interpretation: compare with the reference range. A value
    with a comparator ("<0.01") is only judged where the comparator cannot change the answer."""
    if value is None or (low is None and high is None):
        return None
    below = low is not None and value < low
    above = high is not None and value > high
    if comparator in ("<", "<="):
        if low is not None and value <= low:
            return "L"
        return "N" if low is None and not above else None
    if comparator in (">", ">="):
        if high is not None and value >= high:
            return "H"
        return "N" if high is None and not below else None
    return "H" if above else "L" if below else "N"


def _gestational_days(obs: dict) -> int | None:
    """GA in days from valueQuantity (weeks or days, UCUM or words; a GA without a unit is
    malformed) or valueString "12+3" (weeks+days, the Dutch notation)."""
    quantity = obs.get("valueQuantity")
    if isinstance(quantity, dict):
        value = _number(quantity.get("value"))
        unit = str(quantity.get("code") or quantity.get("unit") or "").strip().strip("{}").lower()
        if value is None:
            return None
        if unit in WEEK_UNITS:
            return round(value * 7)
        if unit in DAY_UNITS:
            return round(value)
        raise Malformed(f"gestational age unit {unit!r}")
    text = obs.get("valueString")
    if isinstance(text, str):
        m = GA_TEXT.match(text)
        if m:
            return weeks_days(int(m.group(1)), int(m.group(2) or 0))
    return None


def _iscn(text: object) -> tuple[bool | None, bool]:
    """(abnormal?, translocation?) of an ISCN karyotype string; (None, False) if not ISCN."""
    if not isinstance(text, str):
        return None, False
    s = re.sub(r"\s+", "", text).rstrip(".")
    s = re.sub(r"\[\d+\]$", "", s)
    if not ISCN_KARYOTYPE.match(s):
        return None, False
    if ISCN_NORMAL.fullmatch(s):
        return False, False
    return True, bool(ISCN_TRANSLOCATION.search(s))


def _dose_text_and_mg(dosages: list) -> tuple[str | None, float | None]:
    """Dosage text for the card, and the single dose in mg if it can be read."""
    text: str | None = None
    mg: float | None = None
    for dosage in dosages:
        if not isinstance(dosage, dict):
            continue
        quantities = [dosage.get("doseQuantity"), dosage.get("dose")]
        for dr in _as_list(dosage.get("doseAndRate")):
            if isinstance(dr, dict):
                quantities.append(dr.get("doseQuantity"))
        for q in quantities:
            if isinstance(q, dict) and isinstance(q.get("value"), NUMBER_TYPES):
                unit = str(q.get("code") or q.get("unit") or "").strip().lower()
                factor = {"mg": 1.0, "g": 1000.0, "ug": 0.001, "mcg": 0.001, "µg": 0.001}.get(unit)
                if factor is not None and mg is None:
                    mg = float(q["value"]) * factor
                if text is None:
                    text = f"{q['value']:g} {q.get('unit') or q.get('code') or ''}".strip()
        if isinstance(dosage.get("text"), str) and dosage["text"].strip():
            text = dosage["text"].strip()
            if mg is None:
                m = DOSE_MG_TEXT.search(text)
                if m:
                    mg = float(m.group(1).replace(",", "."))
        if text is not None:
            break
    return text, mg


# ---------------------------------------------------------------------------------------------------
# Collected state


@dataclass
class _LossRecord:
    kind: LossKind
    onset: date | None
    seen: date | None  # onset, else recordedDate: for "recent" windows only
    current: bool
    source: str

    @property
    def ended_pregnancy_on(self) -> date | None:
        """The day this loss ended a pregnancy: its onset; for a current (active) record without
        onset its recorded date. A historic record without onset dates nothing."""
        return self.onset or (self.seen if self.current else None)


@dataclass
class _Dating:
    recorded: date  # when the estimate was made
    start: date  # day 0 of gestational age (amenorrhoea)


@dataclass
class _State:
    codes: CodeTables
    today: date
    skipped: int = 0
    flags: dict[str, bool] = field(default_factory=dict)
    patient_ref: str | None = None
    age: int | None = None
    sex: str | None = None
    losses: list[_LossRecord] = field(default_factory=list)
    history_min: int = 0
    rpl_dx: bool = False
    second_trimester_coded: bool = False
    obstetric_counts: list[tuple[date, int]] = field(default_factory=list)
    pregnancy_evidence: list[tuple[date, bool]] = field(default_factory=list)
    datings: list[_Dating] = field(default_factory=list)
    bleedings: list[tuple[date | None, bool]] = field(default_factory=list)
    iup_dates: list[date | None] = field(default_factory=list)
    rhd: list[tuple[date, bool]] = field(default_factory=list)
    anti_d_dates: list[date] = field(default_factory=list)
    labs: dict[str, list[LabResult]] = field(default_factory=lambda: {"tsh": [], "ft4": [], "apl": []})
    karyotype: list[bool] = field(default_factory=list)
    interventions: list[Intervention] = field(default_factory=list)
    family: dict[str, bool] = field(default_factory=dict)
    family_sources: list[str] = field(default_factory=list)
    items: list[dict] = field(default_factory=list)
    _datings_by_recorded: list[_Dating] | None = None
    _recorded_days: list[date] = field(default_factory=list)
    _codes_by_ref: dict[str, object] | None = None

    def code_of(self, reference: str) -> object:
        """The code of a Medication or Condition named by a reference (medicationReference,
        reasonReference); the index is built on first use only."""
        if self._codes_by_ref is None:
            self._codes_by_ref = {
                f"{r['resourceType']}/{r['id']}": r.get("code")
                for r in self.items
                if r.get("resourceType") in ("Medication", "Condition") and isinstance(r.get("id"), str)
            }
        return self._codes_by_ref.get(_short_ref(reference))

    def set_flag(self, name: str) -> None:
        self.flags[name] = True

    # -- building the facts ---------------------------------------------------------------------

    def build(self) -> PatientFacts:
        losses = self._merge_losses()
        counted = sum(1 for loss in losses if loss.kind in COUNTED_LOSS_KINDS)
        condition_count = max(counted, self.history_min)
        obstetric = max(self.obstetric_counts, default=None)  # newest date, then highest count
        obstetric_count = obstetric[1] if obstetric else 0
        bases = (
            (condition_count, "conditions"),
            (obstetric_count, "obstetric-history"),
            (2 if self.rpl_dx else 0, "rpl-diagnosis"),
        )
        loss_count, basis = max(bases, key=lambda b: b[0])  # ties: first basis in this order
        if loss_count == 0:
            basis = "none"

        last_loss = max((d for r in self.losses if (d := r.ended_pregnancy_on)), default=None)
        pregnant = self._pregnant(last_loss)
        start = self._current_pregnancy_start(last_loss) if pregnant else None
        ga_today = (self.today - start).days if start else None
        bleeding, bleeding_ga = self._bleeding(pregnant, start, last_loss)
        active = self._active_miscarriage()

        return PatientFacts(
            today=self.today,
            patient_ref=self.patient_ref,
            age_years=self.age,
            sex=self.sex,
            losses=tuple(losses),
            loss_count=loss_count,
            loss_count_basis=basis,
            rpl_diagnosis_recorded=self.rpl_dx,
            second_trimester_loss=self.second_trimester_coded or any(x.second_trimester for x in losses),
            pregnant=pregnant,
            gestational_age_days=ga_today,
            intrauterine_pregnancy_confirmed=self._iup(pregnant, start, last_loss),
            vaginal_bleeding=bleeding,
            bleeding_onset_gestational_age_days=bleeding_ga,
            active_miscarriage=active is not None,
            active_miscarriage_gestational_age_days=self._ga_on(active.seen) if active and active.seen else None,
            tsh_results=_newest_first(self.labs["tsh"]),
            ft4_results=_newest_first(self.labs["ft4"]),
            hypothyroidism_diagnosed=self.flags.get("hypothyroidism_diagnosed", False),
            apl_results=_newest_first(self.labs["apl"]),
            aps_diagnosed=self.flags.get("aps_diagnosed", False),
            hereditary_thrombophilia=self.flags.get("hereditary_thrombophilia", False),
            family_history=FamilyHistory(
                recurrent_miscarriage_in_siblings_or_parents=self.family.get("rm", False),
                child_with_structural_anomalies=self.family.get("child", False),
                relative_with_chromosome_abnormality=self.family.get("chromosome", False),
                sources=tuple(dict.fromkeys(self.family_sources)),
            ),
            parental_karyotype_abnormal=(any(self.karyotype) if self.karyotype else None),
            translocation_in_pregnancy_tissue=self.flags.get("translocation_in_pregnancy_tissue", False),
            fetal_structural_anomaly=self.flags.get("fetal_structural_anomaly", False),
            congenital_uterine_anomaly=self.flags.get("congenital_uterine_anomaly", False),
            adenomyosis=self.flags.get("adenomyosis", False),
            uterine_polyp_myoma_or_adhesions=self.flags.get("uterine_polyp_myoma_or_adhesions", False),
            cervical_insufficiency_suspected=self.flags.get("cervical_insufficiency_suspected", False),
            cycle_disorder=self.flags.get("cycle_disorder", False),
            oligo_or_amenorrhoea=self.flags.get("oligo_or_amenorrhoea", False),
            autoimmune_disease_signs=self.flags.get("autoimmune_disease_signs", False),
            hyperprolactinaemia=self.flags.get("hyperprolactinaemia", False),
            rhd_negative=max(self.rhd)[1] if self.rhd else None,
            anti_d_given_during_current_loss=self._anti_d(active),
            interventions=tuple(self.interventions),
            skipped_resources=self.skipped,
        )

    def _merge_losses(self) -> list[PregnancyLoss]:
        """Loss records within SAME_LOSS_WINDOW_DAYS of each other are one loss (a miscarriage coded
        twice, 'incomplete' then 'complete'); undated records each count once."""
        dated = sorted((r for r in self.losses if r.onset), key=lambda r: r.onset)
        groups: list[list[_LossRecord]] = []
        for record in dated:
            if groups and (record.onset - groups[-1][-1].onset).days <= SAME_LOSS_WINDOW_DAYS:
                groups[-1].append(record)
            else:
                groups.append([record])
        groups.extend([r] for r in self.losses if r.onset is None)
        merged = []
        for group in groups:
            kind = min((r.kind for r in group), key=LOSS_KIND_RANK.__getitem__)
            onset = group[0].onset
            merged.append(
                PregnancyLoss(
                    kind=kind,
                    onset=onset,
                    gestational_age_days=self._ga_on(onset) if onset else None,
                    source=group[0].source,
                )
            )
        return merged

    def _ga_on(self, day: date) -> int | None:
        """Gestational age on `day` from the latest dating (GA / due date / LMP) that fits it: its
        pregnancy ran on `day` and it was recorded at most DATING_GRACE_DAYS later."""
        if self._datings_by_recorded is None:
            self._datings_by_recorded = sorted(self.datings, key=lambda d: d.recorded)
            self._recorded_days = [d.recorded for d in self._datings_by_recorded]
        datings = self._datings_by_recorded
        last = bisect_right(self._recorded_days, day + timedelta(days=DATING_GRACE_DAYS))
        for i in range(last - 1, -1, -1):  # newest first; usually the first one fits
            d = datings[i]
            if d.start <= day and (day - d.start).days <= MAX_PREGNANCY_DAYS:
                return (day - d.start).days
        return None

    def _current_pregnancy_start(self, last_loss: date | None) -> date | None:
        best: _Dating | None = None
        for d in self.datings:
            if last_loss is not None and d.start <= last_loss:
                continue
            if not 0 <= (self.today - d.start).days <= MAX_PREGNANCY_DAYS:
                continue
            if best is None or (d.recorded, d.start) > (best.recorded, best.start):
                best = d
        return best.start if best else None

    def _pregnant(self, last_loss: date | None) -> bool:
        """Latest evidence wins: pregnancy status, active pregnancy Condition, a current dating (yes);
        'not pregnant', a pregnancy loss (no). On the same day, 'no' wins."""
        evidence = list(self.pregnancy_evidence)
        oldest = self.today - timedelta(days=MAX_PREGNANCY_DAYS)
        evidence = [(d, yes) for d, yes in evidence if not yes or d >= oldest]
        for d in self.datings:
            # A dating whose day 0 lies before the last loss describes the pregnancy that was lost
            # (e.g. the GA noted at the miscarriage visit), not a new one.
            if (last_loss is None or d.start > last_loss) and 0 <= (self.today - d.start).days <= MAX_PREGNANCY_DAYS:
                evidence.append((d.recorded, True))
        for loss in self.losses:
            if loss.ended_pregnancy_on:
                evidence.append((loss.ended_pregnancy_on, False))
        evidence = [(d, yes) for d, yes in evidence if d <= self.today]
        if not evidence:
            return False
        latest = max(evidence, key=lambda e: (e[0], not e[1]))
        return latest[1]

    def _in_current_pregnancy(self, day: date, start: date | None, last_loss: date | None) -> bool:
        if day > self.today:
            return False
        if start is not None:
            return day >= start
        return (last_loss is None or day > last_loss) and (self.today - day).days <= MAX_PREGNANCY_DAYS

    def _bleeding(self, pregnant: bool, start: date | None, last_loss: date | None) -> tuple[bool, int | None]:
        if not pregnant:
            return False, None
        days = []
        undated_current = False
        for day, current in self.bleedings:
            if day is None:
                undated_current = undated_current or current
            elif self._in_current_pregnancy(day, start, last_loss):
                days.append(day)
        if days:
            first = min(days)
            return True, (first - start).days if start else None
        return undated_current, None

    def _iup(self, pregnant: bool, start: date | None, last_loss: date | None) -> bool | None:
        if not pregnant:
            return None
        for day in self.iup_dates:
            if day is not None and self._in_current_pregnancy(day, start, last_loss):
                return True
        return None

    def _active_miscarriage(self) -> _LossRecord | None:
        recent = [
            r
            for r in self.losses
            if r.kind is MISCARRIAGE_KIND
            and r.current
            and r.seen is not None
            and 0 <= (self.today - r.seen).days <= ACTIVE_MISCARRIAGE_DAYS
        ]
        return max(recent, key=lambda r: r.seen) if recent else None

    def _anti_d(self, active: _LossRecord | None) -> bool:
        if active is None or active.seen is None:
            return False
        since = active.seen - timedelta(days=ANTI_D_BEFORE_LOSS_DAYS)
        return any(since <= d <= self.today for d in self.anti_d_dates)


def _newest_first(results: list[LabResult]) -> tuple[LabResult, ...]:
    return tuple(sorted(results, key=lambda r: r.when or date.min, reverse=True))


# ---------------------------------------------------------------------------------------------------
# Resource handlers


def _patient(st: _State, r: dict) -> None:
    if st.patient_ref is not None:
        return
    birth = _parse_date(r.get("birthDate"))
    gender = r.get("gender")
    st.patient_ref = _ref(r) if isinstance(r.get("id"), str) else None
    st.sex = gender if isinstance(gender, str) else None
    if birth is not None:
        age = st.today.year - birth.year - ((st.today.month, st.today.day) < (birth.month, birth.day))
        st.age = age if age >= 0 else None


def _condition(st: _State, r: dict) -> None:
    verification = _status(r.get("verificationStatus"))
    if verification in SKIP_VERIFICATION:
        return
    ids = st.codes.concepts_for(r.get("code"))
    if not ids:
        return
    clinical = _status(r.get("clinicalStatus"))
    current = clinical is None or clinical in CURRENT_CLINICAL
    confirmed = verification not in UNCONFIRMED_VERIFICATION
    onset = _first_date(r, "onsetDateTime", "onsetPeriod")
    recorded = _first_date(r, "recordedDate", "assertedDate", "dateRecorded")
    seen = onset or recorded
    ref = _ref(r)

    for concept_id, kind in LOSS_KIND_BY_CONCEPT:
        if concept_id in ids:
            st.losses.append(_LossRecord(kind, onset, seen, current, ref))
            break
    if "second-trimester-miscarriage" in ids:
        st.second_trimester_coded = True
    if "history-of-miscarriage" in ids:
        st.history_min = max(st.history_min, 1)
    if "recurrent-miscarriage" in ids:
        st.rpl_dx = True
    if "pregnant" in ids:
        abatement = _first_date(r, "abatementDateTime", "abatementPeriod")
        if current and abatement is None and seen is not None:
            st.pregnancy_evidence.append((seen, True))
        elif abatement is not None:
            st.pregnancy_evidence.append((abatement, False))
    if "vaginal-bleeding-early-pregnancy" in ids:
        st.bleedings.append((seen, current))
    if "intrauterine-pregnancy" in ids:
        st.iup_dates.append(seen)
    if confirmed and ids & KARYOTYPE_ABNORMAL_CONCEPTS:
        st.karyotype.append(True)
    for concept_id in ids:
        flag = CONDITION_FLAGS.get(concept_id)
        if flag is None:
            continue
        names, suspicion_counts = flag
        concept = st.codes.concepts[concept_id]
        if (concept.lifelong or current) and (confirmed or suspicion_counts):
            for name in names:
                st.set_flag(name)


def _observation(st: _State, r: dict) -> None:
    status = r.get("status")
    if status is not None and status not in OBSERVATION_RESULT_STATUSES:
        return
    ids = st.codes.concepts_for(r.get("code"))
    value_cc = r.get("valueCodeableConcept")
    value_ids = st.codes.concepts_for(value_cc) if value_cc is not None else frozenset()
    components = r.get("component")
    if not ids and not value_ids and not components:
        return
    when = _first_date(r, "effectiveDateTime", "effectivePeriod", "effectiveInstant", "issued")
    ref = _ref(r)

    for cid in st.codes.category_ids_in(ids):
        match = st.codes.first_match(r.get("code"), cid)
        _lab_result(st, r, cid, when, ref, match)
        st.interventions.append(_intervention(st, r, None, cid, DONE, when, match=match, ref=ref))
    if components:
        _components(st, r, components, when, ref)
    if ids or value_ids:
        _observation_facts(st, r, ids, value_ids, when)


def _observation_facts(st: _State, r: dict, ids: frozenset[str], value_ids: frozenset[str], when: date | None) -> None:
    if "pregnancy-status" in ids and when is not None:
        if "pregnant" in value_ids:
            st.pregnancy_evidence.append((when, True))
        elif "not-pregnant" in value_ids:
            st.pregnancy_evidence.append((when, False))
    if "gestational-age" in ids and when is not None:
        ga = _gestational_days(r)
        if ga is not None:
            st.datings.append(_Dating(recorded=when, start=when - timedelta(days=ga)))
    if "estimated-due-date" in ids:
        due = _parse_date(r.get("valueDateTime") or r.get("valueDate"))
        if due is not None:
            st.datings.append(_Dating(recorded=when or st.today, start=due - timedelta(days=DAYS_PER_TERM)))
    if "last-menstrual-period" in ids:
        lmp = _parse_date(r.get("valueDateTime") or r.get("valueDate"))
        if lmp is not None:
            st.datings.append(_Dating(recorded=when or lmp, start=lmp))
    if "obstetric-count-miscarriages" in ids:
        count = r.get("valueInteger")
        if count is None and isinstance(r.get("valueQuantity"), dict):
            count = _number(r["valueQuantity"].get("value"))
        if count is not None:
            if isinstance(count, bool) or not isinstance(count, NUMBER_TYPES) or count < 0:
                raise Malformed("obstetric count is not a count")
            st.obstetric_counts.append((when or date.min, int(count)))
    if ids & RHD_CONCEPTS and when is not None:
        _rhd(st, r, ids, value_ids, when)
    if ("intrauterine-pregnancy" in ids or "intrauterine-pregnancy" in value_ids) and r.get("valueBoolean") is not False:
        st.iup_dates.append(when)
    if r.get("valueBoolean") is not False:
        for concept_id in OBSERVATION_FLAGS:
            if concept_id in ids or concept_id in value_ids:
                for name in CONDITION_FLAGS[concept_id][0]:
                    st.set_flag(name)


def _rhd(st: _State, r: dict, ids: frozenset[str], value_ids: frozenset[str], when: date) -> None:
    """RhD from a coded value (165746003 negative), a panel's Rh component, or, for a plain Rh type
    result only, a qualitative text ("Negatief"). A panel's text ("A Rh neg") is not parsed."""
    if "rhd-negative" in value_ids:
        st.rhd.append((when, True))
        return
    if "rhd-positive" in value_ids:
        st.rhd.append((when, False))
        return
    for comp in _as_list(r.get("component")):
        if isinstance(comp, dict) and st.codes.concepts_for(comp.get("code")) & RHD_CONCEPTS:
            comp_ids = st.codes.concepts_for(comp.get("valueCodeableConcept"))
            if "rhd-negative" in comp_ids or "rhd-positive" in comp_ids:
                st.rhd.append((when, "rhd-negative" in comp_ids))
                return
    if "rhd-type" in ids:
        text = r.get("valueString")
        if text is None and isinstance(r.get("valueCodeableConcept"), dict):
            text = r["valueCodeableConcept"].get("text")
        verdict = st.codes.qualitative_result(text)
        if verdict is not None:
            st.rhd.append((when, verdict == "NEG"))


def _components(st: _State, r: dict, components: object, when: date | None, ref: str) -> None:
    for comp in _as_list(components):
        if not isinstance(comp, dict):
            raise Malformed("component is not an object")
        for cid in st.codes.category_ids_in(st.codes.concepts_for(comp.get("code"))):
            if cid in LAB_BUCKET:
                # An unreadable component (a negative TSH) is left out alone, not the panel.
                _guarded(_lab_result, st, comp, cid, when, ref)


def _lab_result(
    st: _State, r: dict, cid: str, when: date | None, ref: str, match: tuple | None = None
) -> None:
    if cid in KARYOTYPE_CATEGORY_IDS:
        _karyotype(st, r, cid)
        return
    bucket = LAB_BUCKET.get(cid)
    if bucket is None:
        return
    value = unit = comparator = None
    quantity = r.get("valueQuantity")
    if quantity is not None:
        if not isinstance(quantity, dict):
            raise Malformed("valueQuantity is not an object")
        value = _number(quantity.get("value"))
        unit = quantity.get("unit") or quantity.get("code")
        comparator = quantity.get("comparator")
    elif r.get("valueInteger") is not None:
        value = _number(r.get("valueInteger"))
    if value is not None and value < 0:
        raise Malformed("a concentration or titre cannot be negative")
    low, high = _reference_range(r.get("referenceRange"))
    interpretation = (
        _interpretation(r.get("interpretation"))
        or _qualitative(st, r)
        or _range_interpretation(value, comparator, low, high)
    )
    if match is None:
        match = st.codes.first_match(r.get("code"), cid)
    st.labs[bucket].append(
        LabResult(
            category=CATEGORY_BY_ID[cid],
            when=when,
            value=value,
            unit=unit if isinstance(unit, str) else None,
            low=low,
            high=high,
            interpretation=interpretation,
            source=ref,
            code=(match[0], match[1]) if match else None,
        )
    )


def _qualitative(st: _State, r: dict) -> str | None:
    cc = r.get("valueCodeableConcept")
    if isinstance(cc, dict):
        ids = st.codes.concepts_for(cc)
        if "result-positive" in ids:
            return "POS"
        if "result-negative" in ids:
            return "NEG"
        return st.codes.qualitative_result(cc.get("text"))
    return st.codes.qualitative_result(r.get("valueString"))


def _reference_range(ranges: object) -> tuple[float | None, float | None]:
    for rng in _as_list(ranges):
        if not isinstance(rng, dict):
            raise Malformed("referenceRange is not an object")
        low = _number(rng["low"].get("value")) if isinstance(rng.get("low"), dict) else None
        high = _number(rng["high"].get("value")) if isinstance(rng.get("high"), dict) else None
        if low is not None or high is not None:
            return low, high
    return None, None


def _karyotype(st: _State, r: dict, cid: str) -> None:
    """Abnormal: an abnormal interpretation, a coded chromosomal abnormality, or an ISCN string other
    than 46,XX / 46,XY. Normal: interpretation N/NEG or ISCN 46,XX / 46,XY."""
    interpretation = _interpretation(r.get("interpretation"))
    value_ids = st.codes.concepts_for(r.get("valueCodeableConcept"))
    iscn_abnormal, translocation = _iscn(r.get("valueString"))
    abnormal: bool | None = None
    if interpretation in ABNORMAL_INTERPRETATIONS or value_ids & KARYOTYPE_ABNORMAL_CONCEPTS:
        abnormal = True
    elif interpretation in ("N", "NEG"):
        abnormal = False
    elif iscn_abnormal is not None:
        abnormal = iscn_abnormal
    if cid == PARENTAL_KARYOTYPE_ID:
        if abnormal is not None:
            st.karyotype.append(abnormal)
    elif translocation or "balanced-translocation" in value_ids or "translocation-in-pregnancy-tissue" in value_ids:
        st.set_flag("translocation_in_pregnancy_tissue")


# --- orders, medications, procedures ----------------------------------------------------------------


def _reasons(st: _State, r: dict) -> list[object]:
    """Reason CodeableConcepts: reasonCode (R4/STU3), reasonCodeableConcept (DSTU2), R5 `reason`,
    and the code of a Condition named in reasonReference."""
    reasons: list[object] = list(_as_list(r.get("reasonCode"))) + _as_list(r.get("reasonCodeableConcept"))
    for ref in _as_list(r.get("reasonReference")):
        if isinstance(ref, dict) and isinstance(ref.get("reference"), str):
            code = st.code_of(ref["reference"])
            if code is not None:
                reasons.append(code)
    for reason in _as_list(r.get("reason")):
        if isinstance(reason, dict):
            if reason.get("concept") is not None:
                reasons.append(reason["concept"])
            ref = reason.get("reference")
            if isinstance(ref, dict) and isinstance(ref.get("reference"), str):
                code = st.code_of(ref["reference"])
                if code is not None:
                    reasons.append(code)
    return reasons


def _order_context(st: _State, r: dict) -> tuple[tuple[tuple[str, str], ...], bool, bool, bool]:
    """(reason codes, reason is RPL, reason is another indication, ordered within a study) of a
    request; computed once per resource, shared by all its categories."""
    if not (
        "reasonCode" in r or "reasonReference" in r or "reasonCodeableConcept" in r or "reason" in r or "category" in r
    ):
        return NO_CONTEXT
    reasons = _reasons(st, r)
    reason_codes: list[tuple[str, str]] = []
    is_rpl = is_other = in_study = False
    for reason in reasons:
        if not isinstance(reason, dict):
            continue
        coded = [
            (c["system"], c["code"])
            for c in _as_list(reason.get("coding"))
            if isinstance(c, dict) and isinstance(c.get("system"), str) and isinstance(c.get("code"), str)
        ]
        reason_codes.extend(coded)
        ids = st.codes.concepts_for(reason)
        in_study = in_study or "clinical-study" in ids
        if ids & RPL_REASONS:
            is_rpl = True
        elif coded and "clinical-study" not in ids:
            is_other = True
    in_study = in_study or (
        "category" in r and "clinical-study" in st.codes.concepts_for(_as_list(r["category"]))
    )
    return tuple(dict.fromkeys(reason_codes)), is_rpl, is_other, in_study


def _intervention(
    st: _State,
    r: dict,
    codeable: object,
    cid: str,
    state: InterventionState,
    when: date | None,
    context: tuple = None,  # type: ignore[assignment]
    *,
    dosage_text: str | None = None,
    in_focus: bool = False,
    concept_hint: str | None = None,
    match: tuple[str, str, str | None] | None = None,
    ref: str | None = None,
) -> Intervention:
    if match is None:
        match = st.codes.first_match(codeable, concept_hint or cid)
    reason_codes, is_rpl, is_other, in_study = context or NO_CONTEXT
    return Intervention(
        category=CATEGORY_BY_ID[cid],
        state=state,
        resource_ref=ref or _ref(r),
        code_display=(match[2] if match and match[2] else st.codes.label_of(cid)),
        code=(match[0], match[1]) if match else None,
        when=when,
        in_focus=in_focus,
        reason_codes=reason_codes,
        reason_is_rpl=is_rpl,
        reason_is_other_indication=is_other,
        in_study=in_study,
        dosage_text=dosage_text,
        resource=r if state is DRAFT else None,
    )


def _medication_code(st: _State, r: dict) -> object:
    code = r.get("medicationCodeableConcept")
    if code is not None:
        return code
    ref = r.get("medicationReference")
    medication = r.get("medication")  # R5 CodeableReference
    if isinstance(medication, dict):
        if medication.get("concept") is not None:
            return medication["concept"]
        ref = medication.get("reference")
    if isinstance(ref, dict) and isinstance(ref.get("reference"), str):
        target = ref["reference"]
        if target.startswith("#"):
            for contained in _as_list(r.get("contained")):
                if isinstance(contained, dict) and contained.get("id") == target[1:]:
                    return contained.get("code")
            return None
        return st.code_of(target)
    return None


def _add_medication(
    st: _State, r: dict, state: InterventionState, when: date | None, dosages: list, in_focus: bool = False
) -> None:
    codeable = _medication_code(st, r)
    ids = st.codes.concepts_for(codeable)
    if not ids:
        return
    dosage_text, mg = _dose_text_and_mg(dosages)
    categories = st.codes.category_ids_in(ids)
    hint = None
    if (
        "aspirin-ingredient" in ids
        and LOW_DOSE_ASPIRIN_ID not in categories
        and mg is not None
        and mg <= LOW_DOSE_ASPIRIN_MAX_MG
    ):
        categories = (*categories, LOW_DOSE_ASPIRIN_ID)
        hint = "aspirin-ingredient"
    context = _order_context(st, r)
    for cid in categories:
        st.interventions.append(
            _intervention(
                st, r, codeable, cid, state, when, context,
                dosage_text=dosage_text, in_focus=in_focus,
                concept_hint=hint if cid == LOW_DOSE_ASPIRIN_ID else None,
            )
        )  # fmt: skip
        if cid == ANTI_D_ID and state is DONE and when is not None:
            st.anti_d_dates.append(when)


def _add_service(st: _State, r: dict, state: InterventionState, when: date | None, in_focus: bool = False) -> None:
    codeable = r.get("code")
    categories = st.codes.category_ids_in(st.codes.concepts_for(codeable))
    if categories:
        context = _order_context(st, r)
        for cid in categories:
            st.interventions.append(_intervention(st, r, codeable, cid, state, when, context, in_focus=in_focus))


def _request_state(r: dict, done: frozenset[str]) -> InterventionState | None:
    if r.get("doNotPerform") is True:
        return None
    intent = r.get("intent")
    if intent is not None and intent not in REQUEST_INTENTS:
        return None
    status = _status(r.get("status"))
    if status in done:
        return DONE
    if status in REQUEST_ORDERED:
        return ORDERED
    return None


def _service_request(st: _State, r: dict) -> None:
    state = _request_state(r, REQUEST_DONE)
    if state is not None:
        _add_service(st, r, state, _first_date(r, "authoredOn", "orderedOn", "occurrenceDateTime"))


def _medication_request(st: _State, r: dict) -> None:
    state = _request_state(r, REQUEST_DONE)
    if state is not None:
        when = _first_date(r, "authoredOn", "dateWritten")
        _add_medication(st, r, state, when, _as_list(r.get("dosageInstruction")))


def _medication_administration(st: _State, r: dict) -> None:
    if _status(r.get("status")) in ADMINISTRATION_DONE and r.get("wasNotGiven") is not True:
        when = _first_date(r, "effectiveDateTime", "effectivePeriod", "effectiveTimeDateTime", "effectiveTimePeriod")
        _add_medication(st, r, DONE, when, _as_list(r.get("dosage")))


def _medication_statement(st: _State, r: dict) -> None:
    if r.get("wasNotTaken") is True or r.get("taken") in ("n", "unk"):
        return
    if _status(r.get("status")) in STATEMENT_DONE:
        when = _first_date(r, "effectiveDateTime", "effectivePeriod", "dateAsserted")
        _add_medication(st, r, DONE, when, _as_list(r.get("dosage")))


def _procedure(st: _State, r: dict) -> None:
    if r.get("notPerformed") is True or _status(r.get("status")) not in PROCEDURE_DONE:
        return
    _add_service(st, r, DONE, _first_date(r, "performedDateTime", "performedPeriod"))


def _draft_order(st: _State, r: dict, focus: set[str] | None) -> None:
    if not isinstance(r, dict):
        raise Malformed("draft order is not an object")
    if _status(r.get("status")) in DRAFT_SKIP_STATUSES:
        return
    rtype = r.get("resourceType")
    rid = r.get("id")
    in_focus = focus is None or (isinstance(rid, str) and f"{rtype}/{rid}" in focus)
    # An unreadable date is passed over: the order is judged without it rather than dropped with
    # its warning, and a readable date in the next field still counts.
    when = _first_readable_date(r, "authoredOn", "dateWritten", "orderedOn")
    if rtype in ("MedicationRequest", "MedicationOrder"):
        _add_medication(st, r, DRAFT, when, _as_list(r.get("dosageInstruction")), in_focus)
    elif rtype in ("ServiceRequest", "ProcedureRequest"):
        _add_service(st, r, DRAFT, when, in_focus)


def _family_member_history(st: _State, r: dict) -> None:
    if _status(r.get("status")) == "entered-in-error":
        return
    relation = st.codes.concepts_for(r.get("relationship"))
    ref = _ref(r)
    for condition in _as_list(r.get("condition")):
        if not isinstance(condition, dict):
            raise Malformed("FamilyMemberHistory.condition is not an object")
        ids = st.codes.concepts_for(condition.get("code"))
        if "recurrent-miscarriage" in ids and relation & {"relative-parent", "relative-sibling", "relative-partner-parent"}:
            st.family["rm"] = True
            st.family_sources.append(ref)
        if ids & {"congenital-malformation", "fetal-structural-anomaly"}:
            st.family["child"] = True
            st.family_sources.append(ref)
        if ids & KARYOTYPE_ABNORMAL_CONCEPTS:
            st.family["chromosome"] = True
            st.family_sources.append(ref)


HANDLERS = {
    "Patient": _patient,
    "Condition": _condition,
    "Observation": _observation,
    "ServiceRequest": _service_request,
    "ProcedureRequest": _service_request,
    "MedicationRequest": _medication_request,
    "MedicationOrder": _medication_request,
    "MedicationAdministration": _medication_administration,
    "MedicationStatement": _medication_statement,
    "Procedure": _procedure,
    "FamilyMemberHistory": _family_member_history,
}
