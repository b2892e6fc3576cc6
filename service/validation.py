"""Request parsing and validation against the JSON Schemas kept in service/schemas/.

The schemas are shallow on purpose where the payload is large (prefetch resources are checked by
the data-gathering step, not by jsonschema): validating 10,000 resources per call would cost more
than the rest of the hook together.
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources

from flask import Request
from werkzeug.exceptions import RequestEntityTooLarge
from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError
from referencing import Registry, Resource

from .errors import ApiError
from .fast_schema import Check, Unsupported, compile_schema
from .json_codec import DecodeError, decode_json

SCHEMA_PACKAGE = "service.schemas"
CONTEXT_SCHEMA_BY_HOOK = {
    "patient-view": "context-patient-view.schema.json",
    "order-select": "context-order-select.schema.json",
    "order-sign": "context-order-sign.schema.json",
}
JSON_MEDIA_TYPES = ("application/json", "application/fhir+json")


@cache
def schema_registry() -> Registry:
    registry = Registry()
    for entry in resources.files(SCHEMA_PACKAGE).iterdir():
        if entry.name.endswith(".schema.json"):
            contents = json.loads(entry.read_text(encoding="utf-8"))
            resource = Resource.from_contents(contents)
            registry = registry.with_resources(
                [(contents["$id"], resource), (entry.name, resource)]
            )
    return registry


@cache
def load_schema(name: str) -> dict:
    return json.loads(resources.files(SCHEMA_PACKAGE).joinpath(name).read_text(encoding="utf-8"))


@cache
def validator(name: str) -> Draft202012Validator:
    schema = load_schema(name)
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(
        with_files_inlined(schema),
        registry=schema_registry(),
        format_checker=Draft202012Validator.FORMAT_CHECKER,
    )


def with_files_inlined(schema: object) -> object:
    """The schema with each `{"$ref": "<other file>.schema.json"}` replaced by that file's schema
    (its `$schema` and `$id` left out). Same meaning, one self-contained schema: the fast check
    (service/fast_schema.py) compiles it, and jsonschema no longer resolves the reference on
    every validation."""
    if isinstance(schema, list):
        return [with_files_inlined(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.endswith(".schema.json") and len(schema) == 1:
        target = load_schema(ref)
        return with_files_inlined({k: v for k, v in target.items() if k not in ("$schema", "$id")})
    return {key: with_files_inlined(value) for key, value in schema.items()}


def check_all_schemas() -> None:
    """Start-up check: every schema file is a valid 2020-12 schema and its refs resolve; the
    fast checks are compiled now, not on the first request."""
    for entry in resources.files(SCHEMA_PACKAGE).iterdir():
        if entry.name.endswith(".schema.json"):
            validator(entry.name)
            fast_check(entry.name)


def _error_path(error: ValidationError, prefix: str) -> str:
    parts = [prefix] if prefix else []
    for part in error.absolute_path:
        parts.append(f"[{part}]" if isinstance(part, int) else str(part))
    return ".".join(parts).replace(".[", "[") or "(body)"


def describe_validation_error(error: ValidationError, prefix: str = "") -> tuple[str, str]:
    """A short message naming the field, and a FHIRPath-like expression for it."""
    path = _error_path(error, prefix)
    if error.validator == "required":
        missing = error.message.split("'")[1] if "'" in error.message else error.message
        field = f"{path}.{missing}" if path != "(body)" else missing
        return f"{field}: required member is missing", field
    if error.validator == "dependentRequired":
        return f"{path}: {error.message}", path
    if error.validator == "type":
        return f"{path}: expected {_type_names(error.validator_value)}, got {_json_type(error.instance)}", path
    if error.validator in ("const", "enum"):
        return f"{path}: {_shown(error.instance)} is not an allowed value", path
    if error.validator == "pattern":
        return f"{path}: {_shown(error.instance)} has an invalid form", path
    return f"{path}: {error.message[:200]}", path


def _shown(value: object, limit: int = 80) -> str:
    shown = repr(value)
    return shown if len(shown) <= limit else shown[: limit - 3] + "..."


def _json_type(value: object) -> str:
    for kind, name in ((bool, "boolean"), (int, "integer"), (float, "number"), (str, "string"),
                       (list, "array"), (dict, "object")):
        if isinstance(value, kind):
            return name
    return "null"


def _type_names(expected: object) -> str:
    return " or ".join(expected) if isinstance(expected, list) else str(expected)


@cache
def fast_check(name: str) -> Check | None:
    """The compiled yes/no check of a schema (service/fast_schema.py), or None when the schema
    uses a keyword the compiler does not implement."""
    try:
        return compile_schema(validator(name).schema)
    except Unsupported:
        return None


def validate_or_400(instance: object, schema_name: str, prefix: str = "") -> None:
    check = fast_check(schema_name)
    if check is not None and check(instance):
        return
    # Invalid (or not compiled): jsonschema finds and names the error.
    error = next(iter(sorted(validator(schema_name).iter_errors(instance), key=_relevance)), None)
    if error is not None:
        message, expression = describe_validation_error(error, prefix)
        raise ApiError(400, message, expression=[expression])


def _relevance(error: ValidationError) -> tuple:
    # Report the shallowest error first: "context.patientId missing" before deeper noise.
    return (len(error.absolute_path), error.validator != "required")


def _stream_has_more(request: Request) -> bool:
    try:
        return bool(request.stream.read(1))
    except RequestEntityTooLarge:
        return True


def _read_body(request: Request, at_most: int) -> bytes:
    """Up to `at_most` bytes of the body, in chunks (a chunked body of unknown length must not
    cost a buffer of the full limit either)."""
    if at_most <= _READ_CHUNK_BYTES or request.content_length is not None:
        return request.stream.read(at_most)
    chunks: list[bytes] = []
    remaining = at_most
    while remaining > 0:
        chunk = request.stream.read(min(remaining, _READ_CHUNK_BYTES))
        if not chunk:
            break
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


_READ_CHUNK_BYTES = 1024 * 1024


def parse_json_body(request: Request, max_bytes: int) -> object:
    """Read and parse a JSON body: 415 for other media types, 413 over the limit, 400 if invalid."""
    check_json_body_headers(request, max_bytes)
    return read_json_body(request, max_bytes)


def check_json_body_headers(request: Request, max_bytes: int) -> None:
    """The checks that need no body: 415 for other media types, 413 for a declared size over
    the limit."""
    mimetype = (request.mimetype or "").lower()
    if mimetype not in JSON_MEDIA_TYPES:
        shown = mimetype or "none"
        raise ApiError(415, f"Content-Type must be application/json (got {shown}).")
    declared = request.content_length
    if declared is not None and declared > max_bytes:
        raise ApiError(413, f"Request body is larger than the limit of {max_bytes} bytes.")


def read_json_body(request: Request, max_bytes: int) -> object:
    """The body, parsed, after check_json_body_headers: 413 over the limit, 400 if invalid."""
    declared = request.content_length
    # Read what was declared, not the limit: read(n) allocates an n-byte buffer first, and a
    # 16 MiB buffer per hook call showed up in the workers' memory (bench/README.md).
    raw = _read_body(request, declared if declared is not None else max_bytes + 1)
    if len(raw) >= max_bytes and (len(raw) > max_bytes or _stream_has_more(request)):
        # A chunked body has no Content-Length: Werkzeug's limited stream stops at the limit
        # and only says so when read past it.
        raise ApiError(413, f"Request body is larger than the limit of {max_bytes} bytes.")
    if not raw.strip():
        raise ApiError(400, "Request body is empty; a JSON object is required.")
    try:
        return decode_json(raw)
    except DecodeError as error:
        raise ApiError(400, f"Request body is not valid JSON: {error}") from None
