"""Profile the hook path with cProfile.

    python -m bench.profile --size 1000 --hook order-sign            # in-process, Flask test client
    python -m bench.profile --size 100 --gunicorn [--echo]           # real gunicorn workers under load
    python -m bench.profile --stats bench/results/tmp/profile/worker-123.prof
    python -m bench.profile --startup                                  # where create_app's time goes

In-process mode calls the app directly (no HTTP) `--calls` times and also prints a per-stage
breakdown (parse, validate, gather, extract, evaluate, build, jsonify) timed with perf_counter.
Gunicorn mode runs bench/profile_gunicorn_conf.py (cProfile in every pool thread) under the
load generator and merges the workers' profiles.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import servers
from bench.experiments import body_maker
from bench.synthetic import SERVICE_ID_BY_HOOK


def print_stats(stats: pstats.Stats, limit: int, restrict: str | None = None) -> None:
    for key in ("tottime", "cumulative"):
        buffer = io.StringIO()
        stats.stream = buffer
        stats.sort_stats(key).print_stats(*([restrict] if restrict else []), limit)
        text = buffer.getvalue()
        print(text[text.find("   ncalls"):] if "   ncalls" in text else text)


def in_process(args) -> None:
    from service import create_app
    from service.config import Settings

    workdir = Path(tempfile.mkdtemp(prefix="rpl-bench-profile-"))
    try:
        settings = Settings(auth="disabled", database_url=f"sqlite:///{workdir / 'p.sqlite'}",
                            pseudonym_secret="bench", max_body_bytes=64 * 2**20)
        app = create_app({"RPL_SETTINGS": settings})
        client = app.test_client()
        make_body = body_maker(args.hook, args.size)
        path = f"/cds-services/{SERVICE_ID_BY_HOOK[args.hook]}"
        bodies = [make_body() for _ in range(args.calls + 3)]
        for body in bodies[:3]:
            response = client.post(path, data=body, content_type="application/json")
            assert response.status_code == 200, response.get_data(as_text=True)[:500]
        print(f"{args.hook}, {args.size} resources, {len(bodies[0]) / 1024:.0f} KiB, "
              f"{len(response.get_json()['cards'])} cards")
        started = time.perf_counter()
        for body in bodies[3:]:
            client.post(path, data=body, content_type="application/json")
        plain = (time.perf_counter() - started) / args.calls * 1000
        print(f"unprofiled: {plain:.2f} ms per call (in-process, no HTTP, one thread)")
        stage_breakdown(app, args, make_body)
        profiler = cProfile.Profile()
        profiler.enable()
        for body in [make_body() for _ in range(args.calls)]:
            client.post(path, data=body, content_type="application/json")
        profiler.disable()
        print_stats(pstats.Stats(profiler), args.limit, args.restrict)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def stage_breakdown(app, args, make_body) -> None:
    """Median time per stage of service.hooks.call_service, by wrapping what it calls."""
    import statistics

    import service.hooks as hooks

    current: dict[str, float] = {}
    current_cpu: dict[str, float] = {}

    def timed(original, name):
        def wrapper(*a, **kw):
            began, began_cpu = time.perf_counter(), time.thread_time()
            try:
                return original(*a, **kw)
            finally:
                current[name] = current.get(name, 0.0) + time.perf_counter() - began
                current_cpu[name] = current_cpu.get(name, 0.0) + time.thread_time() - began_cpu
        return wrapper

    names = ["check_json_body_headers", "read_json_body", "validate_hook_request", "flatten_bundle", "decide_fhir_access",
             "gather", "extract_patient_facts", "evaluate", "build_card_pairs",
             "choose_language", "json_response"]
    restore = []
    for name in names:  # a name the hook view no longer calls is an error, not a silent gap
        restore.append((hooks, name, getattr(hooks, name)))
        setattr(hooks, name, timed(getattr(hooks, name), name))
    store = app.extensions.get("rpl_store")
    for name in ("filter_findings", "record_cards_in_background"):
        if store is not None and hasattr(store, name):
            restore.append((store, name, None))
            setattr(store, name, timed(getattr(store, name), f"store.{name}"))
    per_call: list[tuple[dict[str, float], dict[str, float]]] = []
    try:
        client = app.test_client()
        path = f"/cds-services/{SERVICE_ID_BY_HOOK[args.hook]}"
        for _ in range(max(5, args.calls)):
            body = make_body()
            current.clear()
            current_cpu.clear()
            began, began_cpu = time.perf_counter(), time.thread_time()
            client.post(path, data=body, content_type="application/json")
            current["total"] = time.perf_counter() - began
            current_cpu["total"] = time.thread_time() - began_cpu
            per_call.append((dict(current), dict(current_cpu)))
    finally:
        for owner, name, original in restore:
            if original is None:
                delattr(owner, name)
            else:
                setattr(owner, name, original)
    stages = [n for n in per_call[0][0] if n != "total"]

    def median_ms(index: int, name: str) -> float:
        return statistics.median(c[index].get(name, 0.0) for c in per_call) * 1000

    print("stage breakdown, median per call:   wall ms    CPU ms")
    for name in stages:
        print(f"  {name:<30} {median_ms(0, name):8.2f}  {median_ms(1, name):8.2f}")
    rest_wall = median_ms(0, "total") - sum(median_ms(0, n) for n in stages)
    rest_cpu = median_ms(1, "total") - sum(median_ms(1, n) for n in stages)
    print(f"  {'rest (Flask, test client, log)':<30} {rest_wall:8.2f}  {rest_cpu:8.2f}")
    print(f"  {'total':<30} {median_ms(0, 'total'):8.2f}  {median_ms(1, 'total'):8.2f}")


def startup_breakdown(args) -> None:
    """Where create_app's time goes (a fresh interpreter per run; the import of `service` first)."""
    code = r'''
import importlib, sys, tempfile, time
began = time.perf_counter()
import service
imported = time.perf_counter() - began
t = time.perf_counter()
import service.hooks, service.security
hooks_imported = time.perf_counter() - t
from service.config import Settings
timings = {}
def wrap(module_name, attr):
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return
    owner = module
    if "." in attr:  # Class.method
        owner_name, attr = attr.split(".", 1)
        owner = getattr(module, owner_name, None)
        if owner is None:
            return
    original = getattr(owner, attr, None)
    if original is None:
        return
    def timed(*a, **kw):
        t = time.perf_counter()
        try:
            return original(*a, **kw)
        finally:
            key = f"{module_name}.{getattr(owner, '__name__', '')}.{attr}" if owner is not module else f"{module_name}.{attr}"
            timings[key] = timings.get(key, 0) + time.perf_counter() - t
    setattr(owner, attr, timed)
for target in ["service.validation:check_all_schemas", "fhir_mappings.codes:load_code_tables",
               "service.services:load_services", "service:_load_guideline_knowledge",
               "service:_init_optional_parts", "service.errors:register_error_handlers",
               "service.security:init_app", "service.store:init_app", "service.feedback:init_app",
               "service.analytics:init_app", "service.operations:init_app", "service.playground:init_app",
               "service.store:Store.ensure_schema"]:
    wrap(*target.split(":"))
workdir = tempfile.mkdtemp()
settings = Settings(auth="disabled", database_url=f"sqlite:///{workdir}/s.sqlite", pseudonym_secret="b",
                    log_level="ERROR")
t = time.perf_counter()
service.create_app({"RPL_SETTINGS": settings})
total = time.perf_counter() - t
print(f"import service           {imported * 1000:8.1f} ms")
print(f"import service.hooks, service.security (cards, fhir_mappings, fhir_client, auth) {hooks_imported * 1000:8.1f} ms")
for name, value in timings.items():
    print(f"  {name:<40} {value * 1000:8.1f} ms")
print(f"create_app total         {total * 1000:8.1f} ms")
'''
    for _ in range(args.calls if args.calls < 10 else 3):
        subprocess.run([sys.executable, "-c", code], cwd=servers.ROOT, check=True,
                       stderr=subprocess.DEVNULL)
        print()


def under_gunicorn(args) -> None:
    from bench.run import run_load

    prof_dir = Path(tempfile.mkdtemp(prefix="rpl-bench-prof-"))
    workdir = Path(tempfile.mkdtemp(prefix="rpl-bench-gun-"))
    env = {"RPL_CDS_AUTH": "disabled", "RPL_CDS_DATABASE_URL": f"sqlite:///{workdir / 'p.sqlite'}",
           "RPL_CDS_PSEUDONYM_SECRET": "bench", "RPL_CDS_MAX_BODY_BYTES": str(64 * 2**20),
           "BENCH_PROFILE_DIR": str(prof_dir)}
    app = servers.ECHO_APP if args.echo else servers.SERVICE_APP
    server = servers.start_gunicorn(app, workdir, env, "profile", config="bench/profile_gunicorn_conf.py")
    try:
        raw = run_load({"base_url": server.base_url, "path": f"/cds-services/{SERVICE_ID_BY_HOOK[args.hook]}",
                        "hook": args.hook, "size": args.size, "clients": args.clients, "runs": 1,
                        "duration_s": args.duration, "warmup_s": 0, "max_requests": 10**6, "paced_fraction": 0})
        done = sum(r["completed"] for r in raw["runs"])
        print(f"{done} requests in {args.duration} s with {args.clients} clients; first {raw['first_response']}")
    finally:
        servers.stop_process(server.proc)
    files = sorted(prof_dir.glob("*.prof"))
    if not files:
        print("no profiles written; see", server.log_path)
        return
    stats = pstats.Stats(str(files[0]))
    for extra in files[1:]:
        stats.add(str(extra))
    print(f"merged {len(files)} worker profiles ({prof_dir})")
    print_stats(stats, args.limit, args.restrict)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hook", default="patient-view", choices=list(SERVICE_ID_BY_HOOK))
    parser.add_argument("--size", type=int, default=100)
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--limit", type=int, default=30)
    parser.add_argument("--gunicorn", action="store_true", help="profile real gunicorn workers under load")
    parser.add_argument("--echo", action="store_true", help="with --gunicorn: the echo app instead")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--stats", type=Path, help="print a saved .prof file")
    parser.add_argument("--restrict", help="regular expression on file:function to keep in the listing")
    parser.add_argument("--startup", action="store_true", help="time the steps of create_app")
    args = parser.parse_args(argv)
    if args.startup:
        startup_breakdown(args)
    elif args.stats:
        print_stats(pstats.Stats(str(args.stats)), args.limit, args.restrict)
    elif args.gunicorn:
        under_gunicorn(args)
    else:
        in_process(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
