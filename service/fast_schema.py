"""A fast yes/no check for the hook-path JSON Schemas; jsonschema still explains every "no".

Checking an order-sign request with jsonschema took about 0.19 ms per call, most of it the
library's per-keyword machinery (a new validator object for each of ~34 sub-schemas). The schemas
on the hook path use a handful of keywords; `compile_schema` turns such a schema into nested
Python closures that answer only "valid or not" (about ten times faster). The schema files stay the
single source of truth: a valid request is accepted here; for anything else the service asks
jsonschema, which reports the error exactly as before (service/validation.py `validate_or_400`).

A schema with any keyword not listed in `_KEYWORDS` is refused at compile time (`Unsupported`),
and that schema is then checked by jsonschema alone. tests/test_fast_schema.py checks, on
generated and mutated requests, that this check and jsonschema always agree.
"""

from __future__ import annotations

import re
from collections.abc import Callable

Check = Callable[[object], bool]

# Annotations: no effect on validity.
_ANNOTATIONS = {"$schema", "$id", "title", "description", "$comment", "examples", "default"}
_KEYWORDS = {
    "type", "required", "properties", "additionalProperties", "dependentRequired", "const",
    "enum", "pattern", "minLength", "maxLength", "minimum", "maximum", "minItems", "maxItems",
    "items",
}


class Unsupported(ValueError):
    """The schema uses something this compiler does not implement."""


def _is_integer(value: object) -> bool:
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, float) and value.is_integer())


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# JSON Schema 2020-12 types as jsonschema's default type checker defines them.
_TYPES: dict[str, Check] = {
    "array": lambda v: isinstance(v, list),
    "boolean": lambda v: isinstance(v, bool),
    "integer": _is_integer,
    "null": lambda v: v is None,
    "number": _is_number,
    "object": lambda v: isinstance(v, dict),
    "string": lambda v: isinstance(v, str),
}


def compile_schema(schema: object) -> Check:
    """A function instance -> bool that agrees with Draft202012Validator(schema).is_valid.
    Raises Unsupported for keywords (or keyword values) it does not implement."""
    if schema is True:
        return lambda _value: True
    if schema is False:
        return lambda _value: False
    if not isinstance(schema, dict):
        raise Unsupported(f"schema is not an object: {schema!r}")
    unknown = set(schema) - _KEYWORDS - _ANNOTATIONS
    if unknown:
        raise Unsupported(f"keywords {sorted(unknown)}")
    checks: list[Check] = []
    if "type" in schema:
        checks.append(_type_check(schema["type"]))
    checks.extend(_object_checks(schema))
    checks.extend(_string_checks(schema))
    checks.extend(_number_checks(schema))
    checks.extend(_array_checks(schema))
    if "const" in schema:
        expected = schema["const"]
        if not isinstance(expected, str):
            raise Unsupported("const other than a string")
        checks.append(lambda v: isinstance(v, str) and v == expected)
    if "enum" in schema:
        allowed = schema["enum"]
        if not isinstance(allowed, list) or not all(isinstance(a, str) for a in allowed):
            raise Unsupported("enum other than strings")
        allowed_set = frozenset(allowed)
        checks.append(lambda v: isinstance(v, str) and v in allowed_set)
    if not checks:
        return lambda _value: True
    if len(checks) == 1:
        return checks[0]
    return lambda value: all(check(value) for check in checks)


def _type_check(declared: object) -> Check:
    names = [declared] if isinstance(declared, str) else declared
    if not isinstance(names, list) or not names or not all(n in _TYPES for n in names):
        raise Unsupported(f"type {declared!r}")
    tests = [_TYPES[n] for n in names]
    if len(tests) == 1:
        return tests[0]
    return lambda value: any(test(value) for test in tests)


def _object_checks(schema: dict) -> list[Check]:
    checks: list[Check] = []
    required = schema.get("required")
    if required is not None:
        if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
            raise Unsupported("required")
        names = tuple(required)
        checks.append(lambda v: not isinstance(v, dict) or all(n in v for n in names))
    properties = schema.get("properties")
    if properties is not None:
        if not isinstance(properties, dict):
            raise Unsupported("properties")
        compiled = {name: compile_schema(sub) for name, sub in properties.items()}
        checks.append(
            lambda v: not isinstance(v, dict)
            or all(check(v[name]) for name, check in compiled.items() if name in v)
        )
    if "additionalProperties" in schema:
        extra = compile_schema(schema["additionalProperties"])
        known = frozenset(properties or ())
        checks.append(
            lambda v: not isinstance(v, dict)
            or all(extra(value) for key, value in v.items() if key not in known)
        )
    dependent = schema.get("dependentRequired")
    if dependent is not None:
        if not isinstance(dependent, dict) or not all(
            isinstance(d, list) and all(isinstance(x, str) for x in d) for d in dependent.values()
        ):
            raise Unsupported("dependentRequired")
        pairs = tuple((name, tuple(needs)) for name, needs in dependent.items())
        checks.append(
            lambda v: not isinstance(v, dict)
            or all(all(n in v for n in needs) for name, needs in pairs if name in v)
        )
    return checks


def _string_checks(schema: dict) -> list[Check]:
    checks: list[Check] = []
    if "pattern" in schema:
        # re.search, as jsonschema does (an unanchored pattern matches anywhere).
        search = re.compile(schema["pattern"]).search
        checks.append(lambda v: not isinstance(v, str) or search(v) is not None)
    return checks + _size_checks(schema, "minLength", "maxLength", str)


def _number_checks(schema: dict) -> list[Check]:
    checks: list[Check] = []
    if "minimum" in schema:
        low = schema["minimum"]
        if not _is_number(low):
            raise Unsupported("minimum")
        checks.append(lambda v: not _is_number(v) or v >= low)
    if "maximum" in schema:
        high = schema["maximum"]
        if not _is_number(high):
            raise Unsupported("maximum")
        checks.append(lambda v: not _is_number(v) or v <= high)
    return checks


def _array_checks(schema: dict) -> list[Check]:
    checks = _size_checks(schema, "minItems", "maxItems", list)
    if "items" in schema:
        item = compile_schema(schema["items"])
        checks.append(lambda v: not isinstance(v, list) or all(item(x) for x in v))
    return checks


def _size_checks(schema: dict, fewest_key: str, most_key: str, kind: type) -> list[Check]:
    """minLength/maxLength (strings, in code points as len() counts) or minItems/maxItems."""
    checks: list[Check] = []
    if fewest_key in schema:
        fewest = _count(schema[fewest_key])
        checks.append(lambda v: not isinstance(v, kind) or len(v) >= fewest)
    if most_key in schema:
        most = _count(schema[most_key])
        checks.append(lambda v: not isinstance(v, kind) or len(v) <= most)
    return checks


def _count(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise Unsupported(f"count {value!r}")
    return value
