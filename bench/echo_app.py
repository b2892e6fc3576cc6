"""The framework's limit: a minimal Flask app under the same gunicorn settings as the service,
whose hook endpoint only parses the JSON body and echoes it back.

`gunicorn -c gunicorn.conf.py 'bench.echo_app:create_app()'`

It parses with msgspec, as the service does (service/json_codec.py), and serialises with orjson,
the fastest way available, so the echo is as cheap as Flask allows and
the service/echo ratio is not flattered. BENCH_ECHO_MODE=parse answers `{"cards": []}` instead of
the echo: the bare cost of Flask + gunicorn + parsing, with a response as small as the service's.
"""

from __future__ import annotations

import os

import msgspec
import orjson
from flask import Flask, Response, request

_decoder = msgspec.json.Decoder()


def create_app() -> Flask:
    app = Flask(__name__)
    echo_body = os.environ.get("BENCH_ECHO_MODE", "echo") != "parse"

    @app.get("/cds-services")
    def discovery():
        return Response(b'{"services":[]}', mimetype="application/json")

    @app.post("/cds-services/<service_id>")
    def echo(service_id: str):
        body = _decoder.decode(request.get_data(cache=False))
        payload = orjson.dumps(body) if echo_body else b'{"cards":[]}'
        return Response(payload, mimetype="application/json")

    return app
