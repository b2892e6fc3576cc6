"""Code tables: the data file is valid, its verified codes match, unverified ones never do, and a
site can add local codes (or gets a clear error for a broken file)."""

from __future__ import annotations

import json
import re
from importlib import resources
from pathlib import Path

import pytest
from jsonschema import Draft202012Validator

from fhir_mappings.codes import CodeTableError, CodeTables, load_code_tables
from fhir_mappings.facts import Category
from tests.fhir_fixtures import ATC, ICD10, ICD10CM, LOINC, SNOMED, cc

CODES_MD = Path(__file__).resolve().parents[2] / "shared" / "reference" / "codes.md"


def _data(name: str) -> dict:
    return json.loads(resources.files("fhir_mappings.data").joinpath(name).read_text(encoding="utf-8"))


def _codings(verifications: set[str]):
    for concept in _data("codes.json")["concepts"]:
        for coding in concept["codings"]:
            if coding["verification"] in verifications:
                yield concept["id"], coding


@pytest.fixture(scope="module")
def tables() -> CodeTables:
    return load_code_tables()


def test_code_file_follows_its_schema():
    schema = _data("codes.schema.json")
    Draft202012Validator.check_schema(schema)
    errors = list(Draft202012Validator(schema).iter_errors(_data("codes.json")))
    assert errors == []


def test_every_guideline_category_has_a_concept_and_unverified_ones_say_so(tables):
    for category in Category:
        concept = tables.concepts[category.value]
        if not concept.codings:
            assert concept.note and concept.note.startswith("unverified: no code"), category


def test_every_verified_coding_matches_its_concept(tables):
    checked = 0
    for concept_id, coding in _codings({"verified", "verified-c", "project"}):
        assert concept_id in tables.concepts_for_code(coding["system"], coding["code"]), coding
        checked += 1
    assert checked > 300


def test_codings_taken_from_codes_md_are_verified_there():
    """A coding without `origin` claims to come from shared/reference/codes.md: its code must stand
    on a row of that file marked VERIFIED or VERIFIED-C."""
    if not CODES_MD.is_file():
        pytest.skip("shared/reference/codes.md is not beside the repository")
    rows = [line for line in CODES_MD.read_text(encoding="utf-8").splitlines() if line.startswith("|")]
    missing = []
    for concept_id, coding in _codings({"verified", "verified-c"}):
        if coding.get("origin"):
            continue
        token = re.compile(r"(?<![\w.-])" + re.escape(coding["code"]) + r"(?![\w-]|\.\d)")
        verified_rows = [r for r in rows if token.search(r) and re.search(r"\bVERIFIED(-C)?\b", r.replace("UNVERIFIED", ""))]
        if not verified_rows:
            missing.append((concept_id, coding["code"]))
    assert missing == []


def test_unverified_codings_are_never_matchable(tables):
    unverified = list(_codings({"unverified"}))
    assert unverified, "the data file keeps unverified leads (e.g. LOINC LA6577-6); the test needs one"
    for concept_id, coding in unverified:
        assert concept_id not in tables.concepts_for_code(coding["system"], coding["code"])
    assert tables.concepts_for_code(LOINC, "LA6577-6") == frozenset()


@pytest.mark.parametrize(
    ("system", "code", "concept"),
    [
        ("urn:oid:2.16.840.1.113883.6.1", "3016-3", "tsh"),  # LOINC by OID
        ("https://loinc.org/", "3016-3", "tsh"),  # https and trailing slash
        ("http://snomed.info/sct/11000146104", "102878001", "recurrent-miscarriage"),  # NL edition URI
        ("urn:oid:2.16.840.1.113883.6.96", "17369002", "miscarriage"),
        (ICD10, "N96", "recurrent-miscarriage"),
        (ICD10, "o26.2", "recurrent-miscarriage"),  # lower case
        (ICD10, "O262", "recurrent-miscarriage"),  # without dot
        ("http://hl7.org/fhir/sid/icd-10-nl", "O03.9", "miscarriage"),  # Dutch ICD-10
        (ICD10CM, "O26.21", "recurrent-miscarriage"),  # CM subcode below O26.2
        (ICD10, "O03.4", "miscarriage"),  # below the O03 class
        (ATC, "H02AB07", "prednisone"),  # exact code wins over the H02AB class
        (ATC, "H02AB08", "steroids"),  # other glucocorticoid: the class
        ("urn:oid:2.16.840.1.113883.6.73", "b01ab05", "lmwh"),
        ("http://hl7.org/fhir/v3/RoleCode", "MTH", "relative-parent"),  # DSTU2/STU3 URI
    ],
)
def test_system_and_code_spellings_are_tolerated(tables, system, code, concept):
    assert concept in tables.concepts_for_code(system, code)


def test_codes_are_not_confused_across_systems_or_prefixes(tables):
    assert tables.concepts_for_code(LOINC, "102878001") == frozenset()  # a SNOMED code under LOINC
    assert tables.concepts_for_code(ICD10, "O2") == frozenset()  # shorter than any class
    assert tables.concepts_for_code(ICD10, "N961") == frozenset()  # N96 is exact-only: no invented subcodes
    assert "miscarriage" not in tables.concepts_for_code(ICD10, "O00.1")  # ectopic is not a miscarriage
    assert tables.concepts_for_code(ATC, "N02BA01") == frozenset({"aspirin-analgesic"})
    assert tables.concepts_for(None) == frozenset() and tables.concepts_for({"coding": "x"}) == frozenset()


def test_codeable_concepts_and_lists_collect_every_meaning(tables):
    both = {"coding": [{"system": SNOMED, "code": "17369002"}, {"system": ICD10, "code": "N96"}]}
    assert tables.concepts_for(both) == {"miscarriage", "recurrent-miscarriage"}
    assert tables.concepts_for([cc(LOINC, "3016-3"), cc(LOINC, "3024-7")]) == {"tsh", "ft4"}


def test_observation_search_codes_cover_labs_and_pregnancy_but_not_drugs(tables):
    codes = tables.observation_search_codes()
    assert len(codes) == len(set(codes))
    for expected in ("http://loinc.org|3016-3", "http://loinc.org|11614-5", "http://loinc.org|82810-3",
                     "http://snomed.info/sct|57036006", "http://loinc.org|10331-7"):
        assert expected in codes
    assert not [c for c in codes if c.startswith(ATC) or c.endswith("|LA6577-6")]
    assert all(re.fullmatch(r"\S+\|\S+", c) for c in codes)


def _write(tmp_path: Path, content: object) -> str:
    path = tmp_path / "extra-codes.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content), encoding="utf-8")
    return str(path)


SITE_TSH = {"system": "https://lab.example-hospital.nl/codes", "code": "TSH-01", "display": "TSH (lab)",
            "verification": "site", "source": "lab catalogue 2025"}


def test_extra_codes_file_adds_a_site_lab_code(tmp_path):
    path = _write(tmp_path, {"concepts": [{"id": "tsh", "codings": [SITE_TSH]}]})
    with_site = load_code_tables(path)
    assert with_site.concepts_for_code(SITE_TSH["system"], "TSH-01") == {"tsh"}
    assert load_code_tables().concepts_for_code(SITE_TSH["system"], "TSH-01") == frozenset()
    assert "https://lab.example-hospital.nl/codes|TSH-01" in with_site.observation_search_codes()
    assert with_site.concepts_for_code(LOINC, "3016-3") == {"tsh"}  # the shipped codes stay


def test_extra_codes_file_cannot_sneak_in_unverified_codes(tmp_path):
    path = _write(tmp_path, {"concepts": [{"id": "tsh", "codings": [dict(SITE_TSH, verification="unverified")]}]})
    assert load_code_tables(path).concepts_for_code(SITE_TSH["system"], "TSH-01") == frozenset()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not valid JSON"),
        ({"concepts": [{"id": "tsh", "codings": [{"system": "x:y", "code": "1", "verification": "site"}]}]},
         "'source' is a required property"),
        ({"concepts": [{"id": "tsh", "codings": [dict(SITE_TSH, verification="trust-me")]}]}, "trust-me"),
        ({"concepts": [{"id": "no-such-concept", "codings": [SITE_TSH]}]}, "unknown concept id 'no-such-concept'"),
        ({"concepts": "tsh"}, "at concepts"),
    ],
)
def test_invalid_extra_codes_file_gives_a_clear_error(tmp_path, content, message):
    path = _write(tmp_path, content)
    with pytest.raises(CodeTableError) as excinfo:
        load_code_tables(path)
    assert message in str(excinfo.value)
    assert path in str(excinfo.value) and "RPL_CDS_EXTRA_CODES" in str(excinfo.value)


def test_missing_extra_codes_file_names_the_path(tmp_path):
    path = str(tmp_path / "absent.json")
    with pytest.raises(CodeTableError, match="cannot read"):
        load_code_tables(path)


def test_qualitative_text_reads_negative_before_positive(tables):
    assert tables.qualitative_result("Niet aangetoond") == "NEG"
    assert tables.qualitative_result("not detected") == "NEG"
    assert tables.qualitative_result("Positief") == "POS"
    assert tables.qualitative_result("Lupus anticoagulant detected") == "POS"
    assert tables.qualitative_result("see report") is None
    assert tables.qualitative_result("nonspecific") is None  # no word inside another word


def test_schema_check_at_load_rejects_a_malformed_table():
    from fhir_mappings.codes import validate_code_file

    broken = {"concepts": [{"id": "Not An Id", "codings": [{"system": "http://loinc.org", "code": " 3016-3"}]}]}
    with pytest.raises(CodeTableError) as excinfo:
        validate_code_file(broken, "codes.json")
    message = str(excinfo.value)
    assert "concepts/0/id" in message and "concepts/0/codings/0" in message
