"""Run the bounded load test and report (see loadtest/__init__.py)."""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import random
import subprocess
import tempfile
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

from bench.report import percentile  # the bench's nearest-rank percentile

from .server import ROOT, count_rows, database, start_gunicorn, stored_feedback_stamps
from .traffic import HookTemplate, feedback_epoch, feedback_for, feedback_stamp, hook_templates, patient_id_for

RESULTS = ROOT / "loadtest" / "results" / "latest.md"
HARD_LIMIT_S = 100  # the run itself, whatever --duration says: `python -m loadtest` stays under 2 minutes
MIX = {"patient-view": 0.40, "order-select": 0.25, "order-sign": 0.20, "feedback": 0.15}
KINDS = list(MIX)


@dataclass
class Stats:
    latencies_ms: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    statuses: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))
    errors: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))
    acknowledged: list[str] = field(default_factory=list)  # outcomeTimestamps answered with 200
    cards_issued: int = 0
    requests: int = 0
    reconnects: int = 0  # idle keep-alive connections the server had closed (request re-sent once)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, kind: str, status: int | str, elapsed_ms: float, ok: bool) -> None:
        with self.lock:
            self.requests += 1
            self.latencies_ms[kind].append(elapsed_ms)
            self.statuses[kind][status] += 1
            if not ok:
                self.errors[kind][status] += 1


class Client(threading.Thread):
    """One EHR client: a keep-alive connection, hook calls in the configured mix, and feedback on
    cards it was shown."""

    def __init__(self, number: int, base_url: str, templates: list[HookTemplate], stats: Stats,
                 budget: "Budget", seed: int, epoch: datetime):
        super().__init__(name=f"client-{number}", daemon=True)
        parts = urlsplit(base_url)
        self.host, self.port = parts.hostname, parts.port
        self.templates = templates
        self.by_kind = defaultdict(list)
        for template in templates:
            self.by_kind[template.kind].append(template)
        self.stats = stats
        self.budget = budget
        self.rng = random.Random(seed)
        self.epoch = epoch
        self.cards: list[tuple[str, dict]] = []  # (feedback path, card) the clinician may answer
        self.connection: http.client.HTTPConnection | None = None

    def run(self) -> None:
        while self.budget.take():
            kind = self.rng.choices(KINDS, weights=[MIX[k] for k in KINDS])[0]
            if kind == "feedback" and not self.cards:
                kind = "patient-view"
            if kind == "feedback":
                self.send_feedback()
            else:
                self.send_hook(kind)
        if self.connection is not None:
            self.connection.close()

    def post(self, path: str, body: bytes) -> tuple[int | str, bytes, float]:
        started = time.perf_counter()
        for attempt in (1, 2):
            try:
                if self.connection is None:
                    self.connection = http.client.HTTPConnection(self.host, self.port, timeout=30)
                self.connection.request("POST", path, body, {"Content-Type": "application/json"})
                response = self.connection.getresponse()
                data = response.read()
                if response.getheader("Connection", "").lower() == "close":
                    self.connection.close()
                    self.connection = None
                return response.status, data, (time.perf_counter() - started) * 1000
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError) as error:
                # A keep-alive connection the server closed while idle: reconnect once (what every
                # HTTP client does). A second failure is an error.
                if self.connection is not None:
                    self.connection.close()
                self.connection = None
                with self.stats.lock:
                    self.stats.reconnects += 1
                if attempt == 2:
                    return type(error).__name__, b"", (time.perf_counter() - started) * 1000
            except OSError as error:
                if self.connection is not None:
                    self.connection.close()
                self.connection = None
                return type(error).__name__, b"", (time.perf_counter() - started) * 1000
        raise AssertionError("unreachable")

    def send_hook(self, kind: str) -> None:
        template = self.rng.choice(self.by_kind[kind])
        body = template.render(patient_id_for(template, self.rng))
        status, data, elapsed = self.post(template.path, body)
        ok = status == 200
        self.stats.record(kind, status, elapsed, ok)
        if not ok:
            return
        cards = [c for c in json.loads(data)["cards"] if c.get("uuid")]
        with self.stats.lock:
            self.stats.cards_issued += len(cards)
        # The clinician acts on some cards: warnings (with their removal suggestion) most often.
        for card in cards:
            if card.get("suggestions") or self.rng.random() < 0.1:
                self.cards.append((template.path + "/feedback", card))
        del self.cards[:-20]

    def send_feedback(self) -> None:
        path, card = self.cards.pop(self.rng.randrange(len(self.cards)))
        stamp = feedback_stamp(self.epoch, self.budget.next_feedback_number())
        body = json.dumps({"feedback": [feedback_for(card, stamp)]}).encode()
        status, data, elapsed = self.post(path, body)
        ok = status == 200
        self.stats.record("feedback", status, elapsed, ok)
        if ok:
            with self.stats.lock:
                self.stats.acknowledged.append(stamp)


class Budget:
    """Requests and time left: every client stops when either runs out."""

    def __init__(self, max_requests: int, duration_s: float):
        self.left = max_requests
        self.ends_at = time.monotonic() + duration_s
        self._feedback = 0
        self._lock = threading.Lock()

    def take(self) -> bool:
        with self._lock:
            if self.left <= 0 or time.monotonic() >= self.ends_at:
                return False
            self.left -= 1
            return True

    def next_feedback_number(self) -> int:
        with self._lock:
            self._feedback += 1
            return self._feedback


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, timeout=5).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    import loadtest

    parser = argparse.ArgumentParser(prog="python -m loadtest", description=loadtest.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=60.0,
                        help=f"seconds of load (default 60, at most {HARD_LIMIT_S})")
    parser.add_argument("--max-requests", type=int, default=200_000, help="stop after this many requests")
    parser.add_argument("--clients", type=int, default=32, help="concurrent clients (default 32)")
    parser.add_argument("--workers", type=int, default=2, help="gunicorn workers (default 2)")
    parser.add_argument("--threads", type=int, default=None, help="threads per worker (gunicorn.conf.py default)")
    parser.add_argument("--postgres", action="store_true",
                        help="PostgreSQL at 127.0.0.1:5432 (a database created and dropped for the run)")
    parser.add_argument("--seed", type=int, default=2022)
    parser.add_argument("--output", type=Path, default=RESULTS, help="the Markdown report (default %(default)s)")
    args = parser.parse_args(argv)
    args.duration = max(1.0, min(args.duration, HARD_LIMIT_S))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    templates = hook_templates(args.seed)
    stats = Stats()
    with tempfile.TemporaryDirectory(prefix="rpl-loadtest-") as workdir, \
            database(args.postgres, Path(workdir)) as url:
        server = start_gunicorn(Path(workdir), url, args.workers, args.threads)
        exit_status = None
        try:
            budget = Budget(args.max_requests, args.duration)
            epoch = feedback_epoch()
            clients = [Client(n, server.base_url, templates, stats, budget, args.seed + n, epoch)
                       for n in range(args.clients)]
            started = time.monotonic()
            for client in clients:
                client.start()
            for client in clients:
                client.join(HARD_LIMIT_S + 30)
            elapsed = time.monotonic() - started
        finally:
            exit_status = server.stop()
        log_tail = server.log_path.read_text()[-4000:]
        stored = stored_feedback_stamps(url)
        cards_recorded = count_rows(url, "rpl_card")
    lost = sorted(set(stats.acknowledged) - set(stored))
    report = render_report(args, stats, elapsed, server.started_in_s, exit_status, stored, lost,
                           cards_recorded, log_tail)
    passed = report_passed(stats, lost, cards_recorded, exit_status)
    print(report)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(report, encoding="utf-8")
    print(f"\nwritten to {args.output}")
    return 0 if passed else 1


def unrecorded_cards(stats: Stats, cards_recorded: int) -> int:
    """Cards shown but not in the database: feedback on them would be refused as "no such card"."""
    return max(0, stats.cards_issued - cards_recorded)


def report_passed(stats: Stats, lost: list[str], cards_recorded: int, exit_status: int | None) -> bool:
    errors = sum(sum(c.values()) for c in stats.errors.values())
    return errors == 0 and not lost and unrecorded_cards(stats, cards_recorded) == 0 and exit_status == 0


def render_report(args, stats: Stats, elapsed: float, startup_s: float, exit_status: int | None,
                  stored: list[str], lost: list[str], cards_recorded: int, log_tail: str) -> str:
    errors = sum(sum(c.values()) for c in stats.errors.values())
    every = [v for values in stats.latencies_ms.values() for v in values]
    lines = [
        "# Load test: latest run",
        "",
        f"`python -m loadtest{' --postgres' if args.postgres else ''}` on {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, "
        f"commit {git_commit()}.",
        "",
        f"- machine: {os.cpu_count()} CPUs ({cpu_model()}), Python {platform.python_version()}; "
        "the load generator shares the CPUs with the service",
        f"- service: gunicorn, gunicorn.conf.py (gthread), {args.workers} workers"
        f"{f', {args.threads} threads each' if args.threads else ''}, 127.0.0.1, JWT checks off, "
        f"database {'PostgreSQL 127.0.0.1:5432 (fresh database)' if args.postgres else 'SQLite (fresh file)'}; "
        f"started in {startup_s:.1f} s",
        f"- load: {args.clients} concurrent clients (keep-alive connections), for {elapsed:.1f} s "
        f"(limit {args.duration:.0f} s or {args.max_requests} requests); mix "
        + ", ".join(f"{k} {int(v * 100)} %" for k, v in MIX.items())
        + "; hook bodies from the 29 clinical scenarios in Dutch and English, each with about 80 "
        "unrelated chart resources (33-40 kB)",
        "",
        "| | requests | errors | p50 ms | p90 ms | p99 ms | max ms |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for kind in [*KINDS, "all"]:
        values = every if kind == "all" else stats.latencies_ms.get(kind, [])
        kind_errors = errors if kind == "all" else sum(stats.errors.get(kind, Counter()).values())
        lines.append(
            f"| {kind} | {len(values)} | {kind_errors} | {percentile(values, 50):.1f} | "
            f"{percentile(values, 90):.1f} | {percentile(values, 99):.1f} | {max(values, default=float('nan')):.1f} |"
        )
    lines += [
        "",
        "Closed loop: each client sends its next request when it has the answer, so the service is "
        "saturated and latency is about clients / throughput (Little's law); the latency targets "
        "live in bench/ (paced load).",
        "",
        f"Throughput: {stats.requests / elapsed:.0f} requests/s. Re-sent on a fresh connection after "
        f"the server had closed an idle keep-alive one: {stats.reconnects}. Statuses: "
        + "; ".join(f"{kind} {dict(counter)}" for kind, counter in stats.statuses.items()) + ".",
        "",
        "## Durability check",
        "",
        f"- feedback acknowledged with 200: {len(stats.acknowledged)}",
        f"- feedback rows in the database after the run: {len(stored)}",
        f"- acknowledged but missing (lost): **{len(lost)}**",
        f"- cards issued (with uuid): {stats.cards_issued}; card rows recorded: {cards_recorded}; "
        f"shown but not recorded (their feedback would be refused): **{unrecorded_cards(stats, cards_recorded)}**",
        f"- gunicorn exit status after SIGTERM: {exit_status}",
        "",
        f"Result: **{'PASS' if report_passed(stats, lost, cards_recorded, exit_status) else 'FAIL'}** "
        "(PASS = no errors, no acknowledged feedback lost, every card shown recorded, gunicorn exit "
        "status 0).",
    ]
    if errors:
        lines += ["", "Errors by kind and status: "
                  + "; ".join(f"{kind} {dict(counter)}" for kind, counter in stats.errors.items() if counter)]
    if not report_passed(stats, lost, cards_recorded, exit_status):
        lines += ["", "Last lines of the gunicorn log:", "", "```", log_tail.strip()[-3000:], "```"]
    return "\n".join(lines) + "\n"
