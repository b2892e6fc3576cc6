"""Card language: the user's Practitioner.communication when it names a supported language,
otherwise RPL_CDS_LANGUAGE (Dutch by default)."""

from __future__ import annotations

from collections.abc import Iterable

from .config import SUPPORTED_LANGUAGES


def choose_language(practitioners: Iterable[dict], default: str) -> str:
    for practitioner in practitioners:
        if not isinstance(practitioner, dict) or practitioner.get("resourceType") != "Practitioner":
            continue
        for concept in practitioner.get("communication") or ():
            for code in _language_codes(concept):
                primary = code.split("-")[0].lower()
                if primary in SUPPORTED_LANGUAGES:
                    return primary
    return default


def _language_codes(concept: object) -> list[str]:
    # R4: communication is a CodeableConcept; R5 moved it to communication.language.
    if not isinstance(concept, dict):
        return []
    if isinstance(concept.get("language"), dict):
        concept = concept["language"]
    return [
        c["code"] for c in concept.get("coding") or ()
        if isinstance(c, dict) and isinstance(c.get("code"), str)
    ]
