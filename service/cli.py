"""The `rpl-cds` command: serve, rules, and the other sub-commands registered below."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

# Sub-command modules add themselves with `register(subparsers)`; each handler returns an exit code.
Handler = Callable[[argparse.Namespace], int]


def _serve(args: argparse.Namespace) -> int:
    from . import create_app
    from .config import ConfigError, is_loopback_host, settings_from_env

    try:
        settings = settings_from_env()
    except ConfigError as error:
        print(f"rpl-cds: configuration error: {error}", file=sys.stderr)
        return 2
    if settings.auth == "disabled" and not is_loopback_host(args.host):
        print(
            "rpl-cds: refusing to listen on a non-loopback address with RPL_CDS_AUTH=disabled "
            f"({args.host}). Enable JWT checks or bind to 127.0.0.1.",
            file=sys.stderr,
        )
        return 2
    try:
        app = create_app()
    except ValueError as error:  # code tables, knowledge files, trusted clients: named in the message
        print(f"rpl-cds: cannot start: {error}", file=sys.stderr)
        return 2
    print(f"rpl-cds: discovery at http://{args.host}:{args.port}/cds-services", file=sys.stderr)
    from .security import QuietRequestHandler

    app.run(
        host=args.host, port=args.port, debug=False, threaded=True, use_reloader=False,
        request_handler=QuietRequestHandler,  # no Werkzeug/Python version in the Server header
    )
    return 0


def _rules(args: argparse.Namespace) -> int:
    from cards.rulebook import render_rule_book, scenario_index

    from .scenarios import all_scenarios

    scenarios = scenario_index(all_scenarios())
    sys.stdout.write(render_rule_book(args.format, language=args.language, scenarios=scenarios))
    return 0


def _openapi(args: argparse.Namespace) -> int:
    from .openapi import render_openapi_yaml

    sys.stdout.write(render_openapi_yaml())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rpl-cds",
        description="CDS Hooks service for recurrent pregnancy loss (ESHRE 2022, NVOG adaptation).",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the development server (production: gunicorn)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8080)
    serve.set_defaults(handler=_serve)

    rules = sub.add_parser("rules", help="print the rule book (every rule id and its source)")
    rules.add_argument("--format", choices=("text", "markdown"), default="text")
    rules.add_argument("--language", choices=("nl", "en"), default="nl")
    rules.set_defaults(handler=_rules)

    openapi = sub.add_parser("openapi", help="print openapi.yaml (generated from the JSON Schemas)")
    openapi.set_defaults(handler=_openapi)

    for register in _extra_commands():
        register(sub)
    return parser


def _extra_commands() -> list[Callable[[argparse._SubParsersAction], None]]:
    registrars = []
    for module_name in ("service.report_cli", "service.integration_cli"):
        try:
            module = __import__(module_name, fromlist=["register"])
        except ModuleNotFoundError as error:
            if error.name != module_name:
                raise
            continue
        registrars.append(module.register)
    return registrars


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    raise SystemExit(main())
