"""JSON text -> Python objects, for request bodies and FHIR server responses.

msgspec builds the Python objects straight from the text. orjson, used before, first builds its
own document tree: parsing a 10,000-resource prefetch (6.9 MB) peaked at 116 MB for a 34 MB
result, which was most of a worker's memory peak. msgspec peaks at the result's size and is as
fast at 100 resources (0.19 ms) and faster at 10,000 (47 vs 55 ms) (bench/README.md).

Strict JSON either way: NaN, Infinity, trailing data, a byte order mark, invalid UTF-8 and lone
surrogates are errors. Integers beyond 64 bits come back as Python ints (orjson made them floats);
numbers too large for a float, integers of thousands of digits and nesting deeper than about 900
levels are errors.
"""

from __future__ import annotations

import msgspec
from flask import Response

DecodeError = msgspec.DecodeError  # ValidationError (number out of range) is a subclass

_decoder = msgspec.json.Decoder()
_encoder = msgspec.json.Encoder()


def decode_json(data: bytes | bytearray | memoryview | str) -> object:
    """Raises DecodeError for anything that is not one valid JSON document."""
    try:
        return _decoder.decode(data)
    except UnicodeDecodeError as error:  # msgspec lets invalid UTF-8 in a string through as this
        raise DecodeError(f"invalid UTF-8 (byte {error.start})") from None
    except RecursionError:
        # msgspec counts nesting against Python's recursion limit (1000 frames, less the caller's
        # stack): about 900 levels. No FHIR resource comes near; orjson stopped at 1024.
        raise DecodeError("nested too deeply") from None


def json_response(payload: object, status: int = 200) -> Response:
    """A JSON response encoded by msgspec: compact UTF-8, keys in insertion order (as Flask's
    `jsonify` is configured here), about five times faster than the standard library for a
    hook's cards."""
    return Response(_encoder.encode(payload), status=status, mimetype="application/json")


def json_text(payload: object) -> str:
    """Compact JSON text (UTF-8 characters as they are, keys in insertion order): what
    `json.dumps(payload, separators=(",", ":"), ensure_ascii=False)` writes, about four times
    faster (a float's exponent may be spelled differently: 1e20 for 1e+20)."""
    return _encoder.encode(payload).decode()
