"""`python -m bench`: start the service under gunicorn on this machine, load it from a separate
process, and write bench/results/latest.md, latest.json and latency.png. See bench/README.md."""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from contextlib import ExitStack
from datetime import datetime, timezone
from pathlib import Path

from bench import fhir_fallback, report, servers
from bench.synthetic import HOOKS, SERVICE_ID_BY_HOOK
from service.config import Settings

RESULTS_DIR = Path(__file__).resolve().parent / "results"
FALLBACK_PATIENT = "bench-fhir-{size}"
# A 10,000-resource prefetch is about 6.9 MB of JSON: within the service's default limit (16 MiB).
BENCH_MAX_BODY_BYTES = Settings().max_body_bytes

FULL = dict(sizes=[10, 100, 1000, 10000], runs=3, duration_s=3.0, paced_duration_s=3.0, warmup_s=1.0,
            paced_min_samples=30, paced_max_duration_s=15.0, single_duration_s=1.0, single_min_requests=8,
            large_from_size=10000, large_runs=2, large_paced_min_samples=16, large_paced_max_duration_s=10.0,
            startups=3, respawns=3, fallback_sizes=[10, 100, 1000], fallback_requests=40,
            single_repeats=20)
QUICK = dict(sizes=[10, 100, 1000, 10000], runs=1, duration_s=1.0, paced_duration_s=1.2, warmup_s=0.3,
             paced_min_samples=5, paced_max_duration_s=3.0, single_duration_s=0.4, single_min_requests=3,
             large_from_size=10000, large_runs=1, large_paced_min_samples=4, large_paced_max_duration_s=3.0,
             no_warmup_from_size=10000,
             startups=1, respawns=1, fallback_sizes=[100], fallback_requests=15, single_repeats=8)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smoke run, under 2 minutes")
    parser.add_argument("--sizes", help="prefetch sizes, comma-separated (default 10,100,1000,10000)")
    parser.add_argument("--hooks", help=f"hooks to load, comma-separated (default {','.join(HOOKS)})")
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients (default 16)")
    parser.add_argument("--runs", type=int, help="measured runs per configuration and mode")
    parser.add_argument("--duration", type=float, help="seconds per closed-loop run")
    parser.add_argument("--paced-fraction", type=float, default=0.5,
                        help="offered load of the paced runs, as a fraction of measured throughput")
    parser.add_argument("--max-requests", type=int, default=20000, help="request cap per run")
    parser.add_argument("--no-fhir", action="store_true", help="skip the FHIR-fallback measurement")
    parser.add_argument("--no-echo", action="store_true", help="skip the echo endpoint")
    parser.add_argument("--fallback-sizes", help="FHIR-fallback patient sizes (default 10,100,1000; --quick: 100)")
    parser.add_argument("--fhir-workers", type=int, default=1,
                        help="Node processes of the FHIR test server (default 1, the test suite's server, "
                             "which answers one request at a time; N > 1 answers N at once, given the cores)")
    parser.add_argument("--database-url", help="RPL_CDS_DATABASE_URL (default: SQLite in a temp dir)")
    parser.add_argument("--workers", type=int, help="RPL_CDS_WORKERS (default: gunicorn.conf.py's)")
    parser.add_argument("--threads", type=int, help="RPL_CDS_THREADS (default: gunicorn.conf.py's)")
    parser.add_argument("--gunicorn-conf", default="gunicorn.conf.py",
                        help="gunicorn config for service and echo (default: the project's); for experiments")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="results folder")
    parser.add_argument("--strict", action="store_true", help="exit with status 1 when a target FAILs")
    args = parser.parse_args(argv)
    plan = dict(QUICK if args.quick else FULL)
    if args.sizes:
        plan["sizes"] = sorted(int(s) for s in args.sizes.split(","))
    if args.fallback_sizes:
        plan["fallback_sizes"] = sorted(int(s) for s in args.fallback_sizes.split(","))
    if args.runs:
        plan["runs"] = args.runs
    if args.duration:
        plan["duration_s"] = plan["paced_duration_s"] = args.duration
    args.plan = plan
    args.hook_list = args.hooks.split(",") if args.hooks else list(HOOKS)
    return args


def machine_info() -> dict:
    cpu_model = "unknown"
    with open("/proc/cpuinfo") as handle:
        for line in handle:
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as handle:
        mem_kb = int(handle.readline().split()[1])
    info = {
        "nproc": len(os.sched_getaffinity(0)), "cpu_count": os.cpu_count(), "cpu_model": cpu_model,
        "mem_total_gb": mem_kb / 1024 / 1024, "kernel": platform.release(),
        "python": platform.python_version(), "loadavg_before": _loadavg(),
    }
    from importlib.metadata import version

    info["gunicorn"], info["flask"] = version("gunicorn"), version("flask")
    node = shutil.which("node")
    if node:
        info["node"] = subprocess.run([node, "--version"], capture_output=True, text=True).stdout.strip()
    try:
        info["git_commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=servers.ROOT, capture_output=True, text=True,
            timeout=5).stdout.strip() or "?"
    except (OSError, subprocess.SubprocessError):
        info["git_commit"] = "?"
    return info


def _loadavg() -> list[float]:
    with open("/proc/loadavg") as handle:
        return [float(x) for x in handle.read().split()[:3]]


def service_env(args: argparse.Namespace, workdir: Path, fhir_base: str | None) -> dict[str, str]:
    env = {
        "RPL_CDS_AUTH": "disabled",
        "RPL_CDS_DATABASE_URL": args.database_url or os.environ.get("RPL_CDS_DATABASE_URL")
        or f"sqlite:///{workdir / 'bench.sqlite'}",
        "RPL_CDS_PSEUDONYM_SECRET": "bench-pseudonym-secret",
    }
    if fhir_base:
        env["RPL_CDS_FHIR_SERVERS"] = fhir_base
    if args.workers:
        env["RPL_CDS_WORKERS"] = str(args.workers)
    if args.threads:
        env["RPL_CDS_THREADS"] = str(args.threads)
    return env


def run_load(spec: dict, server: servers.Gunicorn | None = None) -> dict:
    """One load-generator process for one configuration; returns its raw output, with the CPU time
    the gunicorn workers spent per request when `server` is given (robust to a busy machine)."""
    before = servers.workers_cpu_seconds(server) if server else 0.0
    proc = subprocess.run(
        [sys.executable, "-m", "bench.loadgen"], input=json.dumps(spec), capture_output=True,
        text=True, cwd=servers.ROOT, timeout=900,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"load generator failed: {proc.stderr[-3000:]}")
    raw = json.loads(proc.stdout)
    if server:
        requests_served = 1 + raw.get("warmup", {}).get("completed", 0) + sum(
            r["completed"] + r["errors"] for r in raw.get("runs", []))
        raw["worker_cpu_ms_per_request"] = (servers.workers_cpu_seconds(server) - before) * 1000 / requests_served
    return raw


class MemorySampler:
    """Highest VmRSS of each gunicorn worker while a load runs (sampled every 0.2 s)."""

    def __init__(self, server: servers.Gunicorn):
        self.server, self.peak_rss_mb, self._stop = server, 0.0, threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(0.2):
            for pid in self.server.worker_pids():
                self.peak_rss_mb = max(self.peak_rss_mb, servers.memory_mb(pid).get("VmRSS", 0.0))

    def __enter__(self) -> "MemorySampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def load_spec(args, server: servers.Gunicorn, hook: str, size: int | None, *, clients: int | None = None,
              paced: bool = True, **extra) -> dict:
    plan = args.plan
    large = bool(size and size >= plan["large_from_size"])
    return {
        "base_url": server.base_url, "path": f"/cds-services/{SERVICE_ID_BY_HOOK[hook]}",
        "hook": hook, "size": size, "clients": clients or args.clients,
        "runs": plan["large_runs"] if large else plan["runs"],
        "duration_s": plan["duration_s"], "paced_duration_s": plan["paced_duration_s"],
        "warmup_s": 0 if size and size >= plan.get("no_warmup_from_size", 10**9) else plan["warmup_s"],
        "max_requests": args.max_requests,
        "single_duration_s": plan["single_duration_s"], "single_min_requests": plan["single_min_requests"],
        "paced_min_samples": plan["large_paced_min_samples"] if large else plan["paced_min_samples"],
        "paced_max_duration_s": plan["large_paced_max_duration_s"] if large else plan["paced_max_duration_s"],
        "paced_fraction": args.paced_fraction if paced else 0, **extra,
    }


def describe(summary: dict) -> str:
    paced, closed = summary.get("paced", {}), summary.get("closed", {})
    first = summary.get("first_response") or {}
    single = summary.get("single", {})
    text = (f"CPU {summary.get('worker_cpu_ms_per_request', float('nan')):.2f} ms/req; "
            f"1 client p50 {single.get('p50_ms', float('nan')):.1f} ms; paced p50 {paced.get('p50_ms', float('nan')):.1f} / p99 {paced.get('p99_ms', float('nan')):.1f} ms"
            f" @ {paced.get('offered_rps') or 0:.0f} req/s; closed {closed.get('throughput_rps', 0):.0f} req/s,"
            f" p50 {closed.get('p50_ms', float('nan')):.1f} ms")
    if "cards" in first:
        text += f"; {first['cards']} cards"
    if first.get("status") != 200:
        text += f"; FIRST ANSWER HTTP {first.get('status')}: {first.get('error', '')[:200]}"
    return text


def bench_service(args, server: servers.Gunicorn, results: dict, log) -> None:
    memory = results["memory"]
    for size in args.plan["sizes"]:
        peak = 0.0
        for hook in args.hook_list:
            with MemorySampler(server) as sampler:
                raw = run_load(load_spec(args, server, hook, size), server)
            peak = max(peak, sampler.peak_rss_mb)
            summary = report.summarise(raw)
            results["raw"].setdefault("service", {}).setdefault(hook, {})[size] = _rounded(raw)
            results["service"].setdefault(hook, {})[size] = summary
            log(f"  {hook:<12} {size:>6} res: {describe(summary)}")
        snapshot = servers.worker_memory(server)
        workers = snapshot["workers"].values()
        memory["after"][f"{size} resources"] = {
            "max_rss_mb": max((w.get("VmRSS", 0) for w in workers), default=None),
            "max_pss_mb": max((w.get("Pss", 0) for w in workers), default=None),
            "max_hwm_mb": max((w.get("VmHWM", 0) for w in workers), default=None),
            "peak_rss_mb": peak,
        }
        if peak > memory.get("peak_max_rss_mb", 0):
            memory["peak_max_rss_mb"], memory["peak_at"] = peak, f"{size} resources"


def bench_fallback(args, server: servers.Gunicorn, fhir_base: str, results: dict, log) -> None:
    templates = fhir_fallback.discovery_templates(server.base_url, SERVICE_ID_BY_HOOK["patient-view"])
    for size in args.plan["fallback_sizes"]:
        patient_id = FALLBACK_PATIENT.format(size=size)
        entry: dict = {}
        try:
            single = fhir_fallback.time_single_queries(fhir_base, templates, patient_id, args.plan["single_repeats"])
            slowest_key = max(single, key=lambda k: single[k]["p50_ms"])
            entry.update(single=single, slowest_key=slowest_key, slowest_single_ms=single[slowest_key]["p50_ms"],
                         sequential_ms=sum(v["p50_ms"] for v in single.values()))
            entry["parallel_floor"] = fhir_fallback.time_parallel_queries(
                fhir_base, templates, patient_id, args.plan["single_repeats"])
            raw = run_load({
                "base_url": server.base_url, "path": f"/cds-services/{SERVICE_ID_BY_HOOK['patient-view']}",
                "hook": "patient-view", "size": None, "fhir_server": fhir_base, "patient_id": patient_id,
                "clients": 1, "runs": 1, "duration_s": 60, "max_requests": args.plan["fallback_requests"],
                "warmup_s": 0.5, "warmup_requests": 5, "paced_fraction": 0,
            }, server)
            entry["hook"] = report.summarise(raw)
            results["raw"].setdefault("fallback", {})[size] = _rounded(raw)
            first = raw.get("first_response", {})
            if first.get("status") != 200:
                entry = {"error": f"hook without prefetch answered HTTP {first.get('status')}: {first.get('error', '')}"}
            else:
                closed = entry["hook"]["closed"]
                log(f"  fallback {size:>6} res: total p50 {closed['p50_ms']:.1f} ms, slowest single "
                    f"{entry['slowest_single_ms']:.1f} ms ({slowest_key}), sequential {entry['sequential_ms']:.1f} ms,"
                    f" all queries at once from the bench {entry['parallel_floor']['p50_ms']:.1f} ms,"
                    f" {first.get('cards')} cards")
        except Exception as error:  # noqa: BLE001 - reported as SKIP with its reason, the rest goes on
            entry = {"error": f"{type(error).__name__}: {error}"}
            log(f"  fallback {size}: {entry['error']}")
        results["fallback"][size] = entry


def bench_echo(args, workdir: Path, env: dict, results: dict, log) -> None:
    for mode, key, sizes in (("echo", "echo", args.plan["sizes"]), ("parse", "echo_parse", [100])):
        if 100 not in args.plan["sizes"] and mode == "parse":
            continue
        server = servers.start_gunicorn(servers.ECHO_APP, workdir, {**env, "BENCH_ECHO_MODE": mode}, key,
                                        config=args.gunicorn_conf)
        try:
            for size in sizes:
                raw = run_load(load_spec(args, server, "patient-view", size), server)
                summary = report.summarise(raw)
                results["raw"].setdefault(key, {})[size] = _rounded(raw)
                results[key][size] = summary
                log(f"  {key:<12} {size:>6} res: {describe(summary)}")
        finally:
            servers.stop_process(server.proc)


def measure_startup(args, workdir: Path, env: dict, results: dict, log) -> servers.Gunicorn:
    """Start the service `startups` times (launch -> first 200); the last one stays up."""
    cold = []
    server = None
    for attempt in range(args.plan["startups"]):
        if server is not None:
            servers.stop_process(server.proc)
        server = servers.start_gunicorn(servers.SERVICE_APP, workdir, env, f"service{attempt}",
                                        config=args.gunicorn_conf)
        cold.append(server.startup_s)
    results["startup"]["cold_s"] = cold
    log(f"  gunicorn launch -> first 200: {', '.join(f'{x:.3f} s' for x in cold)}")
    servers.wait_for_workers(server)
    idle = servers.worker_memory(server)
    results["memory"]["idle"] = idle
    results["memory"]["idle_max_rss_mb"] = max(w.get("VmRSS", 0) for w in idle["workers"].values())
    results["memory"]["idle_max_pss_mb"] = max(w.get("Pss", 0) for w in idle["workers"].values())
    results["memory"]["master_idle_rss_mb"] = idle["master"].get("VmRSS")
    results["settings"]["workers"] = len(idle["workers"])
    log(f"  workers {len(idle['workers'])}, idle VmRSS max {results['memory']['idle_max_rss_mb']:.1f} MB")
    respawn = [servers.measure_worker_respawn(server) for _ in range(args.plan["respawns"])]
    results["startup"]["respawn_s"] = respawn
    log(f"  worker respawn -> first 200: {', '.join(f'{x:.3f} s' for x in respawn)}")
    return server


def _rounded(raw: dict) -> dict:
    out = dict(raw)
    out["runs"] = [{**r, "latencies_ms": [round(x, 2) for x in r["latencies_ms"]]} for r in raw.get("runs", [])]
    return out


def gunicorn_threads(args) -> int:
    return args.threads or int(os.environ.get("RPL_CDS_THREADS", 4))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    began = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - began:6.1f} s] {message}", flush=True)

    workdir = args.out / "tmp" / datetime.now().strftime("%Y%m%d-%H%M%S")
    workdir.mkdir(parents=True, exist_ok=True)
    plan = args.plan
    results: dict = {
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "settings": {
            "quick": args.quick, "sizes": plan["sizes"], "hooks": args.hook_list, "clients": args.clients,
            "runs": plan["runs"], "duration_s": plan["duration_s"], "paced_duration_s": plan["paced_duration_s"],
            "warmup_s": plan["warmup_s"], "paced_fraction": args.paced_fraction, "worker_class": "gthread",
            "fhir_workers": args.fhir_workers,
            "threads": gunicorn_threads(args), "workers": args.workers,
            "database": "PostgreSQL" if (args.database_url or os.environ.get("RPL_CDS_DATABASE_URL", "")
                                         ).startswith("postgres") else "SQLite",
            "max_body_bytes": BENCH_MAX_BODY_BYTES, "gunicorn_conf": args.gunicorn_conf, "plan": plan,
            "tuning": {k: v for k, v in os.environ.items() if k.startswith("BENCH_") or k in
                       ("RPL_CDS_WORKERS", "RPL_CDS_THREADS", "RPL_CDS_DATABASE_URL")},
        },
        "startup": {}, "memory": {"after": {}}, "service": {}, "echo": {}, "echo_parse": {},
        "fallback": {}, "raw": {}, "notes": [],
    }
    m = results["machine"]
    log(f"machine: {m['nproc']} CPUs, {m['cpu_model']}, Python {m['python']}; "
        f"plan: sizes {plan['sizes']}, {args.clients} clients, {plan['runs']} run(s) per mode")
    with ExitStack() as stack:
        fhir_base = None
        if not args.no_fhir:
            try:
                seed = workdir / "fhir-seed.json"
                fhir_fallback.write_seed(seed, plan["fallback_sizes"], FALLBACK_PATIENT)
                fhir_base = stack.enter_context(servers.running_fhir_server(seed, args.fhir_workers))
                log(f"FHIR test server at {fhir_base} ({args.fhir_workers} Node process(es)), "
                    f"loaded patients of {plan['fallback_sizes']} resources")
            except Exception as error:  # noqa: BLE001 - the rest of the bench still runs
                results["notes"].append(f"FHIR fallback not measured: {error}")
                log(f"FHIR test server unavailable: {error}")
                fhir_base = None
        env = service_env(args, workdir, fhir_base)
        log("start-up and memory")
        server = measure_startup(args, workdir, env, results, log)
        try:
            log("hooks with prefetch")
            bench_service(args, server, results, log)
            if fhir_base:
                log("FHIR fallback (no prefetch)")
                bench_fallback(args, server, fhir_base, results, log)
        finally:
            servers.stop_process(server.proc)
            findings = servers.log_findings(server)
            results["log_findings"] = findings
            for name, count in findings.items():
                if count:
                    results["notes"].append(f"service log: {count} x {name} (see the gunicorn log).")
                    log(f"  service log: {count} x {name}")
        if not args.no_echo:
            log("echo endpoint (same gunicorn settings)")
            bench_echo(args, workdir, env, results, log)
    results["elapsed_s"] = time.perf_counter() - began
    results["machine"]["loadavg_after"] = _loadavg()
    if results["machine"]["loadavg_before"][0] > 0.5:
        results["notes"].append(
            f"The machine was not idle: load average {results['machine']['loadavg_before'][0]:.2f} at the start "
            f"and {results['machine']['loadavg_after'][0]:.2f} at the end (other processes compete for the CPUs, "
            "so the figures are pessimistic and noisy).")
    results["targets"] = report.evaluate_targets(results)
    paths = report.write_all(results, args.out)
    print()
    print(f"Machine: nproc {m['nproc']}, {m['cpu_model']}, Python {m['python']}")
    width = max(len(c["target"]) for c in results["targets"]) if results["targets"] else 10
    for check in results["targets"]:
        digits = 3 if check["unit"] == "s" else 2
        figure = "n/a" if check["figure"] is None else f"{check['figure']:.{digits}f} {check['unit']}"
        print(f"{check['verdict']:<4}  {check['target']:<{width}}  {figure:>12}  ({check['rule']}) {check['note']}")
    print(f"\nWrote {paths['md']}, {paths['json']}, {paths['png']} in {results['elapsed_s']:.0f} s")
    if any(results.get("log_findings", {}).values()):
        print(f"gunicorn logs kept in {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    failed = any(c["verdict"] == "FAIL" for c in results["targets"])
    return 1 if failed and args.strict else 0
