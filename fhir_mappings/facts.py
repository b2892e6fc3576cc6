"""The guideline's view of a patient: typed facts derived from FHIR data.

This module is the contract between `fhir_mappings` (FHIR -> facts) and `cards` (facts -> findings).
Everything here is plain, immutable data: no FHIR parsing, no I/O. The extraction lives in
`fhir_mappings.extract`; the rules in `cards.rules`.

Durations in pregnancy are in whole days of gestational age ("AD" = amenorrhoeaduur), so that
12+0 weeks is 84 days and 16+0 weeks is 112 days; `weeks_days()` converts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date
from enum import Enum


def weeks_days(weeks: int, days: int = 0) -> int:
    """Gestational age in days for `weeks`+`days` (12+0 -> 84)."""
    return weeks * 7 + days


class Category(str, Enum):
    """Guideline categories of tests and treatments (a stable vocabulary shared with the code tables).

    The value is the concept id used in `fhir_mappings/data/codes.json`.
    """

    # --- recommended work-up (AANBEVOLEN) ---
    TSH = "tsh"
    FT4 = "ft4"
    TPO_ANTIBODIES = "tpo-antibodies"  # not advised by default (A2); recognised only
    LUPUS_ANTICOAGULANT = "lupus-anticoagulant"
    ACL_IGG = "anticardiolipin-igg"
    ACL_IGM = "anticardiolipin-igm"
    B2GPI_IGG = "anti-b2gpi-igg"
    B2GPI_IGM = "anti-b2gpi-igm"
    UTERINE_IMAGING = "uterine-imaging"  # 3D / 2D transvaginal ultrasound of the uterus
    UROGENITAL_IMAGING = "urogenital-tract-imaging"
    PARENTAL_KARYOTYPE = "parental-karyotype"
    GENETIC_COUNSELLING = "clinical-genetics-referral"
    # --- tests NOT recommended (NIET AANBEVOLEN, diagnostics) ---
    PREGNANCY_TISSUE_GENETICS = "pregnancy-tissue-genetics"
    THROMBOPHILIA_TEST = "thrombophilia-test"
    HLA_TYPING = "hla-typing"
    HLA_ANTIBODIES = "hla-antibodies"
    ANTI_HY = "anti-hy"
    CYTOKINES = "cytokines"
    ANA = "ana"
    NK_CELLS = "nk-cells"
    SPERM_DNA_FRAGMENTATION = "sperm-dna-fragmentation"
    HORMONE_PROFILE = "hormone-profile"  # FSH, oestradiol ... (cycle work-up)
    PROLACTIN = "prolactin"
    OVARIAN_RESERVE = "ovarian-reserve-test"  # AMH, inhibin B, antral follicle count
    LUTEAL_INSUFFICIENCY_TEST = "luteal-insufficiency-test"  # serum progesterone
    LH_SERUM = "lh-serum-test"
    ANDROGENS = "androgen-test"
    VITAMIN_D_TEST = "vitamin-d-test"
    HOMOCYSTEINE = "homocysteine"
    # --- treatments ---
    LEVOTHYROXINE = "levothyroxine"
    LOW_DOSE_ASPIRIN = "low-dose-aspirin"
    LMWH = "lmwh"  # low-molecular-weight heparins and unfractionated heparin
    PROGESTERONE = "progesterone"  # incl. dydrogesterone
    HCG = "hcg"
    METFORMIN = "metformin"
    BROMOCRIPTINE = "bromocriptine"
    OVULATION_INDUCTION = "ovulation-induction"
    ANTIOXIDANTS = "antioxidants"
    LYMPHOCYTE_IMMUNISATION = "lymphocyte-immunisation"
    IVIG = "ivig"
    STEROIDS = "steroids"  # glucocorticoids other than prednisone/prednisolone
    PREDNISONE = "prednisone"  # prednisone and prednisolone ("wel in studieverband")
    INTRALIPID = "intralipid"
    G_CSF = "g-csf"
    UTERINE_SURGERY = "uterine-surgery"  # septum resection, polypectomy, myomectomy, adhesiolysis
    ENDOMETRIAL_SCRATCHING = "endometrial-scratching"
    SPERM_SELECTION = "sperm-selection"
    CERCLAGE = "cerclage"
    ANTI_D = "anti-d-immunoglobulin"
    FOLIC_ACID = "folic-acid"
    VITAMIN_D_SUPPLEMENT = "vitamin-d-supplement"


# The five antiphospholipid tests of the card, in card order.
APL_TESTS: tuple[Category, ...] = (
    Category.LUPUS_ANTICOAGULANT,
    Category.ACL_IGG,
    Category.ACL_IGM,
    Category.B2GPI_IGG,
    Category.B2GPI_IGM,
)


class LossKind(str, Enum):
    """What kind of pregnancy loss a record describes (A1)."""

    MISCARRIAGE = "miscarriage"  # clinical intrauterine miscarriage (any trimester < 24 weeks)
    BIOCHEMICAL = "biochemical"  # hCG-only / non-visualised loss, failed PUL: counted per ESHRE
    ECTOPIC = "ectopic"  # never counted
    MOLAR = "molar"  # never counted
    UNSPECIFIED = "unspecified"  # a loss without more detail: counted


COUNTED_LOSS_KINDS = frozenset({LossKind.MISCARRIAGE, LossKind.BIOCHEMICAL, LossKind.UNSPECIFIED})


@dataclass(frozen=True)
class PregnancyLoss:
    kind: LossKind
    onset: date | None  # Condition.onset / recorded date; distinct dates = distinct losses
    gestational_age_days: int | None  # at the loss, when known
    source: str  # "Condition/123"

    @property
    def second_trimester(self) -> bool:
        # A8: second trimester taken as 12+0 .. <24+0 weeks (guideline.md, section 2).
        ga = self.gestational_age_days
        return ga is not None and weeks_days(12) <= ga < weeks_days(24)


class InterventionState(str, Enum):
    DONE = "done"  # a result, completed procedure, given medication
    ORDERED = "ordered"  # an active / on-hold order already signed
    DRAFT = "draft"  # in context.draftOrders (not yet signed)


# Intervention and LabResult are built by the hundreds per hook call (one per lab result and
# order): as plain slotted dataclasses they cost 0.4 us each to build, frozen ones 1.7 us (their
# __init__ goes through object.__setattr__ for every field). They are therefore mutable and not
# hashable (nor is anything holding one, such as a Finding): never change one, never hash one.
@dataclass(slots=True)
class Intervention:
    """A test or treatment, done, ordered or drafted, mapped to a guideline category."""

    category: Category
    state: InterventionState
    resource_ref: str  # "ServiceRequest/123", "MedicationRequest/abc", "Observation/9"
    code_display: str | None  # display of the matched coding, for card text
    code: tuple[str, str] | None  # (system, code) of the matched coding
    when: date | None  # authoredOn / effective date / performed date
    # True for draft orders the hook focuses on: the `selections` at order-select, all drafts at
    # order-sign. False for everything else (including non-selected drafts at order-select).
    in_focus: bool = False
    # reasonCode / reasonReference of the order mapped to text codes; see `has_other_indication`.
    reason_codes: tuple[tuple[str, str], ...] = ()
    # The order's reason names recurrent miscarriage (e.g. a partner's sperm test in his chart).
    reason_is_rpl: bool = False
    # The order's reason names a non-RPL indication (e.g. venous thrombosis for a thrombophilia panel).
    reason_is_other_indication: bool = False
    # Ordered within a clinical study (R36: prednisone "wel in studieverband").
    in_study: bool = False
    # Medication dose text or structured dose, where it matters (low-dose aspirin vs analgesic).
    dosage_text: str | None = None
    # The draft order's own resource (only for DRAFT): suggestions that update/replace it need it.
    resource: dict | None = field(default=None, compare=False, repr=False)


@dataclass(slots=True)
class LabResult:
    category: Category  # TSH, FT4, one of APL_TESTS, PROLACTIN ...
    when: date | None  # effective date (sample date)
    value: float | None
    unit: str | None
    low: float | None  # reference range from Observation.referenceRange
    high: float | None
    # Observation.interpretation mapped to 'H', 'L', 'N', 'POS', 'NEG', 'A' (abnormal) or None.
    interpretation: str | None
    source: str  # "Observation/1"
    # (system, code) of the result's test code, e.g. an LA panel interpretation (75514-0) versus a
    # dRVVT screen time (6303-2). Added by fhir_mappings; None when built elsewhere.
    code: tuple[str, str] | None = None

    @property
    def positive(self) -> bool | None:
        """aPL positivity: interpretation POS/H/A, else value above the reference high, else unknown.

        A4: "verhoogd" = LA positive, or aCL / anti-beta2GPI above the lab's cut-off (the 99th
        percentile the lab reports as the upper reference limit). aCL also > 40 GPL/MPL.
        """
        if self.interpretation in ("POS", "H", "HH", "A", "AA"):
            return True
        if self.interpretation in ("NEG", "N", "L"):
            return False
        if self.value is not None and self.high is not None:
            return self.value > self.high
        if self.value is not None and self.category in (Category.ACL_IGG, Category.ACL_IGM):
            return self.value > 40
        return None


@dataclass(frozen=True)
class FamilyHistory:
    # Footnote *: "herhaalde miskramen bij broers/zussen of ouders van patiënte of partner".
    recurrent_miscarriage_in_siblings_or_parents: bool = False
    # "een eerdere geboorte van een kind met structurele afwijkingen (in de familie)"
    child_with_structural_anomalies: bool = False
    # "een familielid met een (on)gebalanceerde chromosoomafwijking"
    relative_with_chromosome_abnormality: bool = False
    sources: tuple[str, ...] = ()


@dataclass(frozen=True)
class PatientFacts:
    """Everything the rules know about one patient at one moment (`today`)."""

    today: date
    patient_ref: str | None = None  # "Patient/123" (for suggestions' subject; never logged)
    age_years: int | None = None
    sex: str | None = None  # FHIR administrative gender
    # --- pregnancy losses (A1) ---
    losses: tuple[PregnancyLoss, ...] = ()
    # ESHRE count: distinct counted losses, or the larger obstetric-history count (LOINC 11614-5),
    # or 2 when only a recurrent-miscarriage diagnosis (N96 / O26.2 / 102878001) is recorded.
    loss_count: int = 0
    loss_count_basis: str = "none"  # 'conditions' | 'obstetric-history' | 'rpl-diagnosis' | 'none'
    rpl_diagnosis_recorded: bool = False
    second_trimester_loss: bool = False
    # --- current pregnancy ---
    pregnant: bool = False
    gestational_age_days: int | None = None  # today
    intrauterine_pregnancy_confirmed: bool | None = None  # A7: None = not recorded
    vaginal_bleeding: bool = False  # in the current pregnancy
    bleeding_onset_gestational_age_days: int | None = None
    # A current (active) miscarriage and its gestational age (leaflet rules: anti-D, aftercare)
    active_miscarriage: bool = False
    active_miscarriage_gestational_age_days: int | None = None
    # --- thyroid (A2/A3) ---
    tsh_results: tuple[LabResult, ...] = ()  # newest first
    ft4_results: tuple[LabResult, ...] = ()  # newest first
    hypothyroidism_diagnosed: bool = False
    # --- antiphospholipid antibodies (A4/A5) ---
    apl_results: tuple[LabResult, ...] = ()  # all five tests, newest first
    aps_diagnosed: bool = False
    hereditary_thrombophilia: bool = False
    # --- genetics (footnote *) ---
    family_history: FamilyHistory = FamilyHistory()
    parental_karyotype_abnormal: bool | None = None  # None = no result
    translocation_in_pregnancy_tissue: bool = False
    fetal_structural_anomaly: bool = False  # a loss with structural / ultrasound anomalies (R21)
    # --- uterus ---
    congenital_uterine_anomaly: bool = False
    adenomyosis: bool = False
    uterine_polyp_myoma_or_adhesions: bool = False
    cervical_insufficiency_suspected: bool = False
    # --- conditional tests ---
    cycle_disorder: bool = False  # any cycle disorder (hormone profile allowed, R29)
    oligo_or_amenorrhoea: bool = False  # prolactin allowed (R30, A10)
    autoimmune_disease_signs: bool = False  # ANA may be considered (R28, A9)
    # A recorded hyperprolactinaemia diagnosis (E22.1); the card's prolactin exception (R30) is the
    # symptom `oligo_or_amenorrhoea`, this is only context. Added by fhir_mappings.
    hyperprolactinaemia: bool = False
    # --- blood group / anti-D (leaflet) ---
    rhd_negative: bool | None = None  # None = unknown
    anti_d_given_during_current_loss: bool = False
    # --- tests and treatments, by guideline category ---
    interventions: tuple[Intervention, ...] = ()
    # Data that could not be read (wrong shapes, unparseable dates): counted, never fatal.
    skipped_resources: int = 0

    # Convenience queries used by the rules -------------------------------------------------

    @property
    def has_rpl(self) -> bool:
        """R01: "2 of meer miskramen = herhaalde miskramen"."""
        return self.loss_count >= 2

    def interventions_in(self, *categories: Category) -> tuple[Intervention, ...]:
        wanted = set(categories)
        return tuple(i for i in self.interventions if i.category in wanted)

    def has_any(self, *categories: Category) -> bool:
        """A recommended item counts as present when done, ordered or in the draft orders."""
        return bool(self.interventions_in(*categories))

    @property
    def focus_orders(self) -> tuple[Intervention, ...]:
        return tuple(i for i in self.interventions if i.in_focus)
