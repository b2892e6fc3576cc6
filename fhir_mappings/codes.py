"""Code tables: load `data/codes.json` (+ an optional site file), validate them, and answer
"which guideline concepts does this FHIR coding mean?" fast.

Knowledge lives in the JSON data file; this module only knows how codes are compared:
- system URIs are normalised (http/https, trailing slashes, case, OID and older-FHIR aliases from
  the data file), so `urn:oid:2.16.840.1.113883.6.1` is LOINC;
- ICD-10 codes are compared without the dot and in upper case (`O03.9` == `O039`);
- a coding marked `"match": "descendants"` (ATC / ICD-10 class) also matches the codes below it,
  but an exact code of another concept wins (prednisone H02AB07 is not "other steroids" H02AB);
- codings marked `unverified` are never loaded for matching.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

from jsonschema import Draft202012Validator

from .facts import Category

DATA_PACKAGE = "fhir_mappings.data"
CODES_FILE = "codes.json"
SCHEMA_FILE = "codes.schema.json"
EXTRA_CODES_ENV = "RPL_CDS_EXTRA_CODES"  # read by service.config; passed in as `extra_path`

MATCHABLE = frozenset({"verified", "verified-c", "project", "site"})
ICD10_SYSTEMS = frozenset({"http://hl7.org/fhir/sid/icd-10", "http://hl7.org/fhir/sid/icd-10-cm"})
UPPER_CASE_SYSTEMS = ICD10_SYSTEMS | {
    "http://www.whocc.no/atc",
    "http://terminology.hl7.org/codesystem/v3-rolecode",
}
MEMO_LIMIT = 50_000
# Shortest class code considered when walking up a code's ancestors (ICD-10 "O03", ATC "B01").
MIN_CLASS_CODE_LENGTH = 3

EMPTY: frozenset[str] = frozenset()


class CodeTableError(ValueError):
    """A code table file is missing, not JSON, or does not follow codes.schema.json."""


@dataclass(frozen=True)
class ConceptCoding:
    system: str  # canonical system URI as written in the data file
    code: str
    display: str | None
    verification: str
    source: str
    descendants: bool = False


@dataclass(frozen=True)
class Concept:
    id: str
    label: str
    observation: bool
    lifelong: bool
    codings: tuple[ConceptCoding, ...]  # matchable codings only
    note: str | None = None


def _read_json(path: Path | None, text: str | None, what: str) -> dict:
    try:
        raw = text if text is not None else Path(path).read_text(encoding="utf-8")  # type: ignore[arg-type]
    except OSError as exc:
        raise CodeTableError(f"{what}: cannot read {path}: {exc.strerror or exc}") from exc
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise CodeTableError(f"{what}: not valid JSON (line {exc.lineno}, column {exc.colno}): {exc.msg}") from exc
    return data


@lru_cache(maxsize=1)
def _schema_validator() -> Draft202012Validator:
    schema = json.loads(resources.files(DATA_PACKAGE).joinpath(SCHEMA_FILE).read_text(encoding="utf-8"))
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


def validate_code_file(data: object, what: str) -> None:
    """Raise CodeTableError naming the first few schema violations (with their JSON path)."""
    errors = sorted(_schema_validator().iter_errors(data), key=lambda e: list(e.absolute_path))
    if errors:
        details = "; ".join(
            f"at {'/'.join(str(p) for p in e.absolute_path) or '(top level)'}: {e.message}" for e in errors[:5]
        )
        more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
        raise CodeTableError(f"{what} does not follow {SCHEMA_FILE}: {details}{more}")


class SystemNormaliser:
    """Maps any spelling of a code system URI to one lower-case canonical key."""

    def __init__(self, aliases: Mapping[str, Iterable[str]]):
        self._alias: dict[str, str] = {}
        for canonical, others in aliases.items():
            key = self._basic(canonical)
            self._alias[key] = key
            for other in others:
                self._alias[self._basic(other)] = key
        self._cache: dict[str, str] = {}

    @staticmethod
    def _basic(system: str) -> str:
        s = system.strip().lower().rstrip("/")
        if s.startswith("https://"):
            s = "http://" + s[8:]
        return s

    def __call__(self, system: str) -> str:
        key = self._cache.get(system)
        if key is None:
            basic = self._basic(system)
            key = self._alias.get(basic, basic)
            # SNOMED edition / version URIs: http://snomed.info/sct/11000146104[/version/...]
            if key.startswith("http://snomed.info/sct/"):
                key = "http://snomed.info/sct"
            if len(self._cache) < 10_000:
                self._cache[system] = key
        return key


def normalise_code(system_key: str, code: str) -> str:
    code = code.strip()
    if system_key in ICD10_SYSTEMS:
        return code.replace(".", "").upper()
    if system_key in UPPER_CASE_SYSTEMS:
        return code.upper()
    return code


class CodeTables:
    """Immutable lookup tables built from the code files. Thread-safe for reading."""

    def __init__(self, main: dict, extras: Iterable[tuple[dict, str]] = ()):
        self.system_key = SystemNormaliser(main.get("systemAliases") or {})
        qualitative = main.get("qualitativeResultText") or {}
        self._negative_text = _word_pattern(qualitative.get("negative", ()))
        self._positive_text = _word_pattern(qualitative.get("positive", ()))

        builders: dict[str, dict] = {}
        for raw in main["concepts"]:
            if raw["id"] in builders:
                raise CodeTableError(f"{CODES_FILE}: concept id '{raw['id']}' appears twice")
            builders[raw["id"]] = {"raw": raw, "codings": []}
            builders[raw["id"]]["codings"].extend(raw["codings"])
        missing = sorted(c.value for c in Category if c.value not in builders)
        if missing:
            raise CodeTableError(f"{CODES_FILE}: no concept for the categories {', '.join(missing)}")
        for extra, what in extras:
            for raw in extra["concepts"]:
                if raw["id"] not in builders:
                    known = ", ".join(sorted(builders)[:8])
                    raise CodeTableError(
                        f"{what}: unknown concept id '{raw['id']}' (codings can only be added to existing "
                        f"concepts, e.g. {known}, ...)"
                    )
                builders[raw["id"]]["codings"].extend(raw["codings"])

        self.concepts: dict[str, Concept] = {}
        exact: dict[tuple[str, str], set[str]] = {}
        classes: dict[tuple[str, str], set[str]] = {}
        for cid, b in builders.items():
            raw = b["raw"]
            codings = tuple(
                ConceptCoding(
                    system=c["system"],
                    code=c["code"],
                    display=c.get("display"),
                    verification=c["verification"],
                    source=c["source"],
                    descendants=c.get("match") == "descendants",
                )
                for c in b["codings"]
                if c["verification"] in MATCHABLE
            )
            self.concepts[cid] = Concept(
                id=cid,
                label=raw.get("label", cid),
                observation=bool(raw.get("observation")),
                lifelong=bool(raw.get("lifelong")),
                codings=codings,
                note=raw.get("note"),
            )
            for c in codings:
                skey = self.system_key(c.system)
                key = (skey, normalise_code(skey, c.code))
                (classes if c.descendants else exact).setdefault(key, set()).add(cid)
                if c.descendants:
                    exact.setdefault(key, set()).add(cid)  # the class code itself
        self._exact = {k: frozenset(v) for k, v in exact.items()}
        self._classes = {k: frozenset(v) for k, v in classes.items()}
        self._class_systems = frozenset(s for s, _ in self._classes)
        self._category_by_id = {c.value: c for c in Category}
        # Memo of raw (system, code) -> concepts and of concept sets -> categories: a chart repeats
        # the same few hundred codes thousands of times. Bounded; plain dict writes are atomic.
        self._memo: dict[tuple[object, object], frozenset[str]] = {}
        self._category_ids_memo: dict[frozenset[str], tuple[str, ...]] = {}

    # -- lookups -----------------------------------------------------------------------------

    def concepts_for_code(self, system: object, code: object) -> frozenset[str]:
        """Concept ids for one (system, code); empty for unknown or malformed input."""
        key = (system, code)
        try:
            return self._memo[key]
        except KeyError:
            pass
        except TypeError:  # unhashable junk
            return EMPTY
        found = self._lookup(system, code)
        if len(self._memo) < MEMO_LIMIT:
            self._memo[key] = found
        return found

    def _lookup(self, system: object, code: object) -> frozenset[str]:
        if not isinstance(system, str) or not isinstance(code, str) or not code:
            return EMPTY
        skey = self.system_key(system)
        ncode = normalise_code(skey, code)
        found = self._exact.get((skey, ncode))
        if found is not None:
            return found
        if skey in self._class_systems:
            for end in range(len(ncode) - 1, MIN_CLASS_CODE_LENGTH - 1, -1):
                found = self._classes.get((skey, ncode[:end]))
                if found is not None:
                    return found
        return EMPTY

    def concepts_for(self, value: object) -> frozenset[str]:
        """Concept ids meant by a Coding, a CodeableConcept, or a list of either."""
        if isinstance(value, dict):
            codings = value.get("coding")
            if codings is None and "code" in value:
                return self.concepts_for_code(value.get("system"), value.get("code"))
            if not isinstance(codings, list):
                return EMPTY
            result: frozenset[str] = EMPTY
            for coding in codings:
                if isinstance(coding, dict):
                    found = self.concepts_for_code(coding.get("system"), coding.get("code"))
                    if found:
                        result = found if not result else result | found
            return result
        if isinstance(value, list):
            result = EMPTY
            for item in value:
                found = self.concepts_for(item)
                if found:
                    result = found if not result else result | found
            return result
        return EMPTY

    def first_match(self, codeable: object, concept_id: str) -> tuple[str, str, str | None] | None:
        """(system, code, display) of the first coding of `codeable` that means `concept_id`."""
        codings = codeable.get("coding") if isinstance(codeable, dict) else None
        if not isinstance(codings, list):
            return None
        for coding in codings:
            if isinstance(coding, dict):
                system, code = coding.get("system"), coding.get("code")
                if concept_id in self.concepts_for_code(system, code):
                    display = coding.get("display")
                    return system, code, display if isinstance(display, str) else None
        return None

    def qualitative_result(self, text: object) -> str | None:
        """'POS' / 'NEG' for a free-text qualitative result ("positief", "not detected"), else None.
        Negative words are tried first: "not detected" must not read as "detected"."""
        if not isinstance(text, str) or not text:
            return None
        if self._negative_text is not None and self._negative_text.search(text):
            return "NEG"
        if self._positive_text is not None and self._positive_text.search(text):
            return "POS"
        return None

    def category_ids_in(self, concept_ids: frozenset[str]) -> tuple[str, ...]:
        """The guideline categories among `concept_ids`, as concept id strings (sorted, so the
        order is stable; cheaper to compare and hash than Category members)."""
        if not concept_ids:
            return ()
        found = self._category_ids_memo.get(concept_ids)
        if found is None:
            found = tuple(sorted(c for c in concept_ids if c in self._category_by_id))
            if len(self._category_ids_memo) < MEMO_LIMIT:
                self._category_ids_memo[concept_ids] = found
        return found

    def label_of(self, category: Category | str) -> str:
        return self.concepts[category if isinstance(category, str) else category.value].label

    def codings_of(self, concept_id: str) -> tuple[ConceptCoding, ...]:
        return self.concepts[concept_id].codings

    def observation_search_codes(self) -> list[str]:
        """'system|code' for every exact matchable code of an Observation-relevant concept, for
        `Observation?patient=...&code=...` (class codes cannot be searched and are left out)."""
        seen: dict[str, None] = {}
        for concept in self.concepts.values():
            if concept.observation:
                for c in concept.codings:
                    if not c.descendants:
                        seen.setdefault(f"{c.system}|{c.code}", None)
        return list(seen)


def _word_pattern(words: Iterable[str]) -> re.Pattern[str] | None:
    words = sorted({w.strip().lower() for w in words if w.strip()}, key=len, reverse=True)
    if not words:
        return None
    return re.compile(r"(?<![\w])(?:" + "|".join(re.escape(w) for w in words) + r")(?![\w])", re.IGNORECASE)


def _load(extra_path: str | None) -> CodeTables:
    main_text = resources.files(DATA_PACKAGE).joinpath(CODES_FILE).read_text(encoding="utf-8")
    main = _read_json(None, main_text, CODES_FILE)
    validate_code_file(main, CODES_FILE)
    extras = []
    if extra_path:
        what = f"extra code file {extra_path} ({EXTRA_CODES_ENV})"
        extra = _read_json(Path(extra_path), None, what)
        validate_code_file(extra, what)
        for concept in extra["concepts"]:
            for coding in concept["codings"]:
                coding.setdefault("origin", "site")
        extras.append((extra, what))
    return CodeTables(main, extras)


@lru_cache(maxsize=8)
def _load_cached(extra_path: str | None) -> CodeTables:
    return _load(extra_path)


def load_code_tables(extra_path: str | None = None) -> CodeTables:
    """Load and validate the code tables (cached per `extra_path`). Raises CodeTableError with a
    message naming the file and the problem when a file is unreadable or invalid."""
    return _load_cached(extra_path or None)
