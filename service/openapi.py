"""openapi.yaml is generated from the JSON Schemas in service/schemas/ (the single source of truth)
by `rpl-cds openapi`; a test fails when the committed file and the generated one differ."""

from __future__ import annotations

import copy
import json
from importlib import resources

import yaml

SERVICE_IDS = ["rpl-patient-view", "rpl-order-select", "rpl-order-sign"]

ERROR_DESCRIPTIONS = {
    "400": "Invalid JSON, envelope or context; the OperationOutcome names the field.",
    "401": "Missing or invalid CDS Hooks JWT (no reason given in the body).",
    "404": "Unknown CDS Service id.",
    "405": "Method not allowed.",
    "413": "Body larger than RPL_CDS_MAX_BODY_BYTES.",
    "415": "Content-Type is not application/json.",
}


def _component_name(file_name: str) -> str:
    stem = file_name.removesuffix(".schema.json")
    return "".join(part.capitalize() for part in stem.split("-"))


def _schema_components() -> dict[str, dict]:
    components: dict[str, dict] = {}
    for entry in sorted(resources.files("service.schemas").iterdir(), key=lambda e: e.name):
        if not entry.name.endswith(".schema.json") or entry.name == "services-data.schema.json":
            continue
        schema = json.loads(entry.read_text(encoding="utf-8"))
        components[_component_name(entry.name)] = _rewrite_refs(schema)
    return components


def _rewrite_refs(node):
    """File references (`draft-orders.schema.json`) become component references."""
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str) and value.endswith(".schema.json"):
                out[key] = f"#/components/schemas/{_component_name(value)}"
            elif key in ("$schema", "$id"):
                continue
            else:
                out[key] = _rewrite_refs(value)
        return out
    if isinstance(node, list):
        return [_rewrite_refs(item) for item in node]
    return node


def error_response(description: str) -> dict:
    """An OpenAPI response whose body is an OperationOutcome (every error of this service)."""
    return {
        "description": description,
        "content": {
            "application/fhir+json": {
                "schema": {"$ref": "#/components/schemas/OperationOutcome"}
            }
        },
    }


def build_openapi() -> dict:
    components = _schema_components()
    # Embedded `$defs` references must be absolute within the OpenAPI document.
    for name, schema in components.items():
        components[name] = _absolutise_local_refs(schema, name)
    hook_request = copy.deepcopy(components["HookRequest"])
    # anyOf, not oneOf: an order-select context is also a valid patient-view context.
    hook_request["properties"]["context"] = {
        "anyOf": [
            {"$ref": "#/components/schemas/ContextPatientView"},
            {"$ref": "#/components/schemas/ContextOrderSelect"},
            {"$ref": "#/components/schemas/ContextOrderSign"},
        ]
    }
    components["HookRequest"] = hook_request
    paths = {
        "/cds-services": {
            "get": {
                "summary": "CDS Hooks discovery",
                "operationId": "discovery",
                "responses": {
                    "200": {
                        "description": "The CDS Services offered.",
                        "content": {
                            "application/json": {
                                "schema": {"$ref": "#/components/schemas/DiscoveryResponse"}
                            }
                        },
                    },
                    "401": error_response(ERROR_DESCRIPTIONS["401"]),
                },
            }
        },
        "/cds-services/{id}": {
            "post": {
                "summary": "Call a CDS Service (patient-view, order-select or order-sign)",
                "operationId": "callService",
                "parameters": [
                    {
                        "name": "id",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "string", "enum": SERVICE_IDS},
                    }
                ],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {"$ref": "#/components/schemas/HookRequest"}
                        }
                    },
                },
                "responses": {
                    "200": {
                        "description": "Cards (possibly none).",
                        "content": {
                            "application/json": {
                                "schema": {"$ref": "#/components/schemas/HookResponse"}
                            }
                        },
                    },
                    "412": error_response(
                        "Required FHIR data could not be obtained from prefetch or the FHIR "
                        "server; the OperationOutcome names the prefetch keys."
                    ),
                    **{code: error_response(text) for code, text in ERROR_DESCRIPTIONS.items()},
                    "503": error_response(
                        "Another hook with a large body (over 1 MiB) held this worker's turn for "
                        "too long (RPL_CDS_LARGE_BODIES_AT_ONCE); Retry-After says when to retry."
                    ),
                },
            }
        },
    }
    for extra in _extra_paths():
        paths.update(extra(components))
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "rpl-cds: CDS Hooks 2.0 service for recurrent pregnancy loss",
            "version": "0.1.0",
            "description": (
                "Dutch adaptation (NVOG) of the ESHRE 2022 Recurrent Pregnancy Loss guideline as "
                "CDS Hooks services. Generated from service/schemas/*.schema.json by "
                "`rpl-cds openapi`; do not edit by hand."
            ),
            "license": {"name": "Apache-2.0", "identifier": "Apache-2.0"},
        },
        "jsonSchemaDialect": "https://json-schema.org/draft/2020-12/schema",
        "servers": [{"url": "http://127.0.0.1:8080"}],
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {
                "cdsHooksJwt": {
                    "type": "http",
                    "scheme": "bearer",
                    "bearerFormat": "JWT",
                    "description": "CDS Hooks client JWT (ES384/RS384), aud = the URL invoked.",
                }
            },
        },
        "security": [{"cdsHooksJwt": []}],
    }


def _absolutise_local_refs(node, component: str):
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str) and value.startswith("#/$defs/"):
                out[key] = f"#/components/schemas/{component}/$defs/" + value.removeprefix("#/$defs/")
            else:
                out[key] = _absolutise_local_refs(value, component)
        return out
    if isinstance(node, list):
        return [_absolutise_local_refs(item, component) for item in node]
    return node


def _extra_paths():
    """Other parts of the service (feedback, analytics, health) describe their paths here."""
    extras = []
    for module_name in ("service.feedback", "service.operations"):
        try:
            module = __import__(module_name, fromlist=["openapi_paths"])
        except ModuleNotFoundError as error:
            if error.name != module_name:
                raise
            continue
        if hasattr(module, "openapi_paths"):
            extras.append(module.openapi_paths)
    return extras


def render_openapi_yaml() -> str:
    return yaml.safe_dump(build_openapi(), sort_keys=False, allow_unicode=True, width=100)
