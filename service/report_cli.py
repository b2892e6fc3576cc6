"""`rpl-cds report`, `rpl-cds purge` and `rpl-cds migrate` (registered by service/cli.py).

They use the same configuration as the service (RPL_CDS_* variables; the default SQLite database
in the instance folder), so run them where the service runs.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys

EXIT_CONFIG = 2
EXIT_DATABASE = 3

COLUMNS = (
    ("shown", "shown"),
    ("accepted", "accepted"),
    ("overridden", "overridden"),
    ("ignored", "ignored"),
    ("lowValueOrdersRemoved", "low_value_orders_removed"),
)


def register(subparsers: argparse._SubParsersAction) -> None:
    report = subparsers.add_parser(
        "report", help="cards shown / accepted / overridden / ignored per rule"
    )
    report.add_argument("--since", help="only cards issued on or after this date (YYYY-MM-DD)")
    report.add_argument("--format", choices=("table", "json", "csv"), default="table")
    report.set_defaults(handler=_report)

    purge = subparsers.add_parser(
        "purge", help="delete cards (and their feedback) older than the retention period"
    )
    purge.add_argument(
        "--older-than",
        type=_days,
        metavar="DAYS",
        help="age in days (default: RPL_CDS_RETENTION_DAYS, 730)",
    )
    purge.set_defaults(handler=_purge)

    migrate = subparsers.add_parser(
        "migrate", help="upgrade the database schema now (the service also does so at start-up)"
    )
    migrate.set_defaults(handler=_migrate)


def _days(raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of days, got {raw!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1 day")
    return value


def _app():
    from . import create_app
    from .config import ConfigError

    from . import store

    try:
        app = create_app()
        if "rpl_store" not in app.extensions:
            store.init_app(app)
        return app
    except ConfigError as error:
        print(f"rpl-cds: configuration error: {error}", file=sys.stderr)
        return None


def _database_error() -> int:
    print("rpl-cds: the database is unavailable (see RPL_CDS_DATABASE_URL).", file=sys.stderr)
    return EXIT_DATABASE


def _report(args: argparse.Namespace) -> int:
    from .analytics import analytics_document
    from .store import StoreUnavailable, parse_since

    try:
        since = parse_since(args.since)
    except ValueError as error:
        print(f"rpl-cds report: --since: {error}", file=sys.stderr)
        return EXIT_CONFIG
    app = _app()
    if app is None:
        return EXIT_CONFIG
    try:
        document = analytics_document(app, since)
    except StoreUnavailable:
        return _database_error()
    sys.stdout.write(render_report(document, args.format))
    return 0


def render_report(document: dict, output_format: str) -> str:
    if output_format == "json":
        return json.dumps(document, indent=2, ensure_ascii=False) + "\n"
    if output_format == "csv":
        return _csv(document)
    return _table(document)


def _reasons_text(rule: dict) -> str:
    return "; ".join(
        f"{item['reason'] or 'no reason'}={item['count']}" for item in rule["overriddenByReason"]
    )


def _csv(document: dict) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["rule_id", *(name for _key, name in COLUMNS), "overridden_by_reason"])
    for rule in document["rules"]:
        writer.writerow([rule["ruleId"], *(rule[key] for key, _n in COLUMNS), _reasons_text(rule)])
    writer.writerow(["TOTAL", *(document["totals"][key] for key, _n in COLUMNS), ""])
    return out.getvalue()


def _table(document: dict) -> str:
    headers = ["rule", "shown", "accepted", "overridden", "ignored", "orders removed"]
    rows = [[r["ruleId"], *(str(r[key]) for key, _n in COLUMNS)] for r in document["rules"]]
    rows.append(["TOTAL", *(str(document["totals"][key]) for key, _n in COLUMNS)])
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = "  ".join(cell.rjust(width) for cell, width in zip(cells[1:], widths[1:]))
        return f"{first}  {rest}".rstrip()

    period = f"since {document['since']}" if document["since"] else "all recorded cards"
    lines = [f"rpl-cds card use ({period}; generated {document['generatedAt']})", ""]
    lines.append(line(headers))
    lines.append(line(["-" * w for w in widths]))
    lines.extend(line(row) for row in rows)
    reasons = [(r["ruleId"], _reasons_text(r)) for r in document["rules"] if r["overriddenByReason"]]
    if reasons:
        lines += ["", "override reasons (system|code=count):"]
        lines += [f"  {rule}: {text}" for rule, text in reasons]
    return "\n".join(lines) + "\n"


def _purge(args: argparse.Namespace) -> int:
    from .store import StoreUnavailable, get_store

    app = _app()
    if app is None:
        return EXIT_CONFIG
    store = get_store(app)
    days = args.older_than or store.options.retention_days
    try:
        cards, feedback = store.purge(days)
    except StoreUnavailable:
        return _database_error()
    print(f"rpl-cds purge: deleted {cards} cards and {feedback} feedback items older than {days} days")
    return 0


def _migrate(args: argparse.Namespace) -> int:
    from .migrations import current_revision, upgrade_to_head
    from .store import DATABASE_ERRORS, get_store

    app = _app()
    if app is None:
        return EXIT_CONFIG
    engine = get_store(app).engine
    try:
        upgrade_to_head(engine)
        revision = current_revision(engine)
    except DATABASE_ERRORS:  # also a schema newer than this release (alembic CommandError)
        return _database_error()
    print(f"rpl-cds migrate: database schema at revision {revision}")
    return 0
