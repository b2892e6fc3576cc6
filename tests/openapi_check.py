"""Validate real responses against openapi.yaml (the committed file, as integrators read it)."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import yaml
from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

OPENAPI_PATH = Path(__file__).resolve().parent.parent / "openapi.yaml"
ROOT = "urn:rpl-cds:openapi"


@cache
def openapi_document() -> dict:
    return yaml.safe_load(OPENAPI_PATH.read_text(encoding="utf-8"))


@cache
def _registry() -> Registry:
    document = Resource.from_contents(openapi_document(), default_specification=DRAFT202012)
    return Registry().with_resource(ROOT, document)


def response_schema(path: str, method: str, status: int) -> dict:
    operation = openapi_document()["paths"][path][method.lower()]
    response = operation["responses"][str(status)]
    (media,) = response["content"].values()
    return media["schema"]


def assert_matches_openapi(path: str, method: str, status: int, body: object) -> None:
    schema = response_schema(path, method, status)
    pointer = schema["$ref"].removeprefix("#")
    validator = Draft202012Validator({"$ref": f"{ROOT}#{pointer}"}, registry=_registry(),
                                     format_checker=Draft202012Validator.FORMAT_CHECKER)
    validator.validate(body)
