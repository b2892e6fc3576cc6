"""In-process A/B experiments behind the optimisation work (bench/README.md, "Tools for the optimisation work").

    python -m bench.experiments gc  [--size 10000] [--hook order-sign]   # garbage-collector settings
    python -m bench.experiments gil [--size 100] [--threads 4]           # GIL hand-offs in a threaded worker
    python -m bench.experiments parse [--size 10000]                     # JSON parse alone
    python -m bench.experiments store [--size 100] [--hook order-sign]   # the card store on the hook path
    python -m bench.experiments startup [--rounds 5]                     # import + create_app

They call the Flask app directly (no HTTP) and time with CPU time where the question is work
done (robust to other processes on the machine), with wall time where the question is waiting.
Variants are interleaved, so that a change in the machine's load hits all of them alike.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import statistics
import sys
import tempfile
import threading
import time
import uuid

import itertools

from bench.synthetic import PATIENT_PLACEHOLDER, SERVICE_ID_BY_HOOK, BodyTemplate, hook_body

_patients = itertools.count()


def body_maker(hook: str, size: int):
    """Request bodies for `size` resources, each for a new patient (the card store keeps
    per-patient history, which must not grow across variants) with a fresh hookInstance."""
    template = BodyTemplate(hook_body(hook, size, patient_id=PATIENT_PLACEHOLDER))
    return lambda: template.render(f"exp-p{next(_patients):07d}")


def make_app():
    from service import create_app
    from service.config import Settings

    workdir = tempfile.mkdtemp(prefix="rpl-bench-exp-")
    settings = Settings(auth="disabled", database_url=os.environ.get("RPL_CDS_DATABASE_URL")
                        or f"sqlite:///{workdir}/e.sqlite", pseudonym_secret="bench-pseudonym-secret-0123456789",
                        max_body_bytes=64 * 2**20, log_level="WARNING")
    app = create_app({"RPL_SETTINGS": settings})
    logging.disable(logging.WARNING)  # a log line per call would time the terminal
    return app


class GcMeter:
    """Collections and time spent in the collector (gc.callbacks)."""

    def __init__(self):
        self.count = [0, 0, 0]
        self.seconds = [0.0, 0.0, 0.0]
        self._start = 0.0
        gc.callbacks.append(self._callback)

    def _callback(self, phase, info):
        if phase == "start":
            self._start = time.perf_counter()
        else:
            generation = info["generation"]
            self.count[generation] += 1
            self.seconds[generation] += time.perf_counter() - self._start

    def reset(self):
        self.count, self.seconds = [0, 0, 0], [0.0, 0.0, 0.0]


def gc_experiment(args) -> None:
    app = make_app()
    client = app.test_client()
    make_body = body_maker(args.hook, args.size)
    path = f"/cds-services/{SERVICE_ID_BY_HOOK[args.hook]}"
    default_threshold = gc.get_threshold()
    variants = {
        "default (700,10,10)": (False, default_threshold),
        "freeze": (True, default_threshold),
        "threshold 50000,20,20": (False, (50000, 20, 20)),
        "freeze + threshold 50000,20,20": (True, (50000, 20, 20)),
    }
    meter = GcMeter()
    cpu: dict[str, list[float]] = {name: [] for name in variants}
    collections: dict[str, list[list[int]]] = {name: [] for name in variants}
    gc_time: dict[str, list[float]] = {name: [] for name in variants}
    calls = args.calls or {10: 200, 100: 200, 1000: 40, 10000: 6}.get(args.size, 10)
    for _ in range(2):
        client.post(path, data=make_body(), content_type="application/json")
    for _round in range(args.rounds):
        for name, (freeze, threshold) in variants.items():
            gc.collect()
            if freeze:
                gc.freeze()
            gc.set_threshold(*threshold)
            meter.reset()
            for _ in range(calls):
                body = make_body()
                began = time.process_time()
                response = client.post(path, data=body, content_type="application/json")
                cpu[name].append((time.process_time() - began) * 1000)
                assert response.status_code == 200
            collections[name].append([c / calls for c in meter.count])
            gc_time[name].append(sum(meter.seconds) / calls * 1000)
            gc.set_threshold(*default_threshold)
            gc.unfreeze()
    print(f"{args.hook}, {args.size} resources, {calls} calls x {args.rounds} rounds (CPU ms per call)")
    print("| variant | CPU median | CPU p90 | GC collections per call (gen0/1/2) | time in GC per call |")
    print("|---|---|---|---|---|")
    for name in variants:
        counts = [statistics.mean(c[i] for c in collections[name]) for i in range(3)]
        print(f"| {name} | {statistics.median(cpu[name]):.2f} ms | {_p90(cpu[name]):.2f} ms | "
              f"{counts[0]:.1f} / {counts[1]:.1f} / {counts[2]:.2f} | {statistics.median(gc_time[name]):.2f} ms |")


def _p90(values):
    ordered = sorted(values)
    return ordered[int(0.9 * (len(ordered) - 1))]


class PooledUuid4:
    """uuid4 from a buffer of os.urandom bytes refilled 4 KiB at a time: one GIL release per 256
    UUIDs instead of one per UUID, still from the operating system's CSPRNG."""

    def __init__(self):
        self._local = threading.local()

    def __call__(self) -> uuid.UUID:
        local = self._local
        buffer = getattr(local, "buffer", b"")
        offset = getattr(local, "offset", 0)
        if offset + 16 > len(buffer):
            buffer, offset = os.urandom(4096), 0
            local.buffer = buffer
        local.offset = offset + 16
        return uuid.UUID(bytes=buffer[offset:offset + 16], version=4)


def gil_experiment(args) -> None:
    """Threads of one process call the app at once, as a gthread worker's pool does."""
    app = make_app()
    make_body = body_maker(args.hook, args.size)
    path = f"/cds-services/{SERVICE_ID_BY_HOOK[args.hook]}"
    original_uuid4, original_interval = uuid.uuid4, sys.getswitchinterval()
    variants = {
        "default": (original_uuid4, original_interval),
        "pooled uuid4": (PooledUuid4(), original_interval),
        "switch interval 0.5 ms": (original_uuid4, 0.0005),
        "pooled uuid4 + 0.5 ms": (PooledUuid4(), 0.0005),
    }
    latencies: dict[str, list[float]] = {name: [] for name in variants}
    rates: dict[str, list[float]] = {name: [] for name in variants}
    calls_counter = {"urandom": 0}
    original_urandom = os.urandom

    def counting_urandom(n):
        calls_counter["urandom"] += 1
        return original_urandom(n)

    warm = app.test_client()
    for _ in range(3):
        warm.post(path, data=make_body(), content_type="application/json")
    os.urandom = counting_urandom
    warm.post(path, data=make_body(), content_type="application/json")
    os.urandom = original_urandom
    print(f"os.urandom calls per hook call (default): {calls_counter['urandom']}")
    for _round in range(args.rounds):
        for name, (uuid4, interval) in variants.items():
            uuid.uuid4 = uuid4
            sys.setswitchinterval(interval)
            stop_at = time.perf_counter() + args.duration
            lock = threading.Lock()
            done = [0]

            def worker():
                client = app.test_client()
                while time.perf_counter() < stop_at:
                    body = make_body()
                    began = time.perf_counter()
                    client.post(path, data=body, content_type="application/json")
                    took = (time.perf_counter() - began) * 1000
                    with lock:
                        latencies[name].append(took)
                        done[0] += 1

            threads = [threading.Thread(target=worker) for _ in range(args.threads)]
            began = time.perf_counter()
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            rates[name].append(done[0] / (time.perf_counter() - began))
    uuid.uuid4 = original_uuid4
    sys.setswitchinterval(original_interval)
    print(f"{args.hook}, {args.size} resources, {args.threads} threads in one process, "
          f"{args.rounds} x {args.duration} s per variant (wall-clock latency per call)")
    print("| variant | p50 | p90 | p99 | calls/s |\n|---|---|---|---|---|")
    for name in variants:
        values = sorted(latencies[name])
        p99 = values[int(0.99 * (len(values) - 1))]
        print(f"| {name} | {statistics.median(values):.2f} ms | {_p90(values):.2f} ms | {p99:.2f} ms | "
              f"{statistics.median(rates[name]):.0f} |")


def store_experiment(args) -> None:
    """The card store on the hook path (override memory read + card insert) against none."""
    app = make_app()
    store = app.extensions.get("rpl_store")
    if store is None:
        print("the app has no rpl_store extension")
        return
    client = app.test_client()
    make_body = body_maker(args.hook, args.size)
    path = f"/cds-services/{SERVICE_ID_BY_HOOK[args.hook]}"
    calls = args.calls or {10: 300, 100: 200, 1000: 40, 10000: 6}.get(args.size, 20)
    cpu: dict[str, list[float]] = {"with store": [], "without store": []}
    wall: dict[str, list[float]] = {"with store": [], "without store": []}
    for _ in range(3):
        client.post(path, data=make_body(), content_type="application/json")
    for _round in range(args.rounds):
        for name in cpu:
            if name == "with store":
                app.extensions["rpl_store"] = store
            else:
                app.extensions.pop("rpl_store", None)
            for _ in range(calls):
                body = make_body()
                began, began_cpu = time.perf_counter(), time.process_time()
                client.post(path, data=body, content_type="application/json")
                cpu[name].append((time.process_time() - began_cpu) * 1000)
                wall[name].append((time.perf_counter() - began) * 1000)
    app.extensions["rpl_store"] = store
    print(f"{args.hook}, {args.size} resources, {calls} calls x {args.rounds} rounds, database {store.dialect}")
    print("| variant | CPU median | wall median | wall p90 |\n|---|---|---|---|")
    for name in cpu:
        print(f"| {name} | {statistics.median(cpu[name]):.2f} ms | {statistics.median(wall[name]):.2f} ms | "
              f"{_p90(wall[name]):.2f} ms |")


STARTUP_SNIPPET = r"""
import os, sys, tempfile, time
began_wall, began_cpu = time.perf_counter(), time.process_time()
if os.environ.get("BENCH_SKIP_CHECK_SCHEMA") == "1":
    import jsonschema
    jsonschema.Draft202012Validator.check_schema = classmethod(lambda cls, schema, **kw: None)
import service
from service.config import Settings
workdir = tempfile.mkdtemp()
settings = Settings(auth="disabled", database_url=f"sqlite:///{workdir}/s.sqlite",
                    pseudonym_secret="bench-pseudonym-secret-0123456789", log_level="ERROR")
service.create_app({"RPL_SETTINGS": settings})
print(time.perf_counter() - began_wall, time.process_time() - began_cpu)
"""


def startup_experiment(args) -> None:
    """import + create_app in a fresh interpreter (the master's share of gunicorn's start-up)."""
    import subprocess

    from bench.servers import ROOT

    variants = {"default": {}, "schemas not meta-validated at start (check_schema skipped)":
                {"BENCH_SKIP_CHECK_SCHEMA": "1"}}
    wall: dict[str, list[float]] = {name: [] for name in variants}
    cpu: dict[str, list[float]] = {name: [] for name in variants}
    for _round in range(args.rounds):
        for name, env in variants.items():
            out = subprocess.run([sys.executable, "-c", STARTUP_SNIPPET], cwd=ROOT, capture_output=True,
                                 text=True, env={**os.environ, **env}, check=True).stdout.split()
            wall[name].append(float(out[-2]) * 1000)
            cpu[name].append(float(out[-1]) * 1000)
    print(f"import service + create_app, fresh interpreter, {args.rounds} runs each")
    print("| variant | wall median | CPU median |\n|---|---|---|")
    for name in variants:
        print(f"| {name} | {statistics.median(wall[name]):.0f} ms | {statistics.median(cpu[name]):.0f} ms |")


def parse_experiment(args) -> None:
    from service.json_codec import decode_json

    make_body = body_maker(args.hook, args.size)
    raw = make_body()
    print(f"{len(raw) / 1e6:.2f} MB body")
    for label, disable in (("gc enabled", False), ("gc disabled during parse", True)):
        times = []
        for _ in range(args.calls or 10):
            if disable:
                gc.disable()
            began = time.process_time()
            parsed = decode_json(raw)
            times.append((time.process_time() - began) * 1000)
            gc.enable()
            del parsed
        print(f"decode_json (msgspec), {label}: median {statistics.median(times):.1f} ms CPU")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.experiments", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment", choices=["gc", "gil", "parse", "store", "startup"])
    parser.add_argument("--size", type=int, default=None)
    parser.add_argument("--hook", default=None, choices=list(SERVICE_ID_BY_HOOK))
    parser.add_argument("--calls", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--duration", type=float, default=3.0)
    args = parser.parse_args(argv)
    if args.experiment == "gc":
        args.size, args.hook = args.size or 10000, args.hook or "order-sign"
        gc_experiment(args)
    elif args.experiment == "startup":
        startup_experiment(args)
    elif args.experiment == "store":
        args.size, args.hook = args.size or 100, args.hook or "order-sign"
        store_experiment(args)
    elif args.experiment == "gil":
        args.size, args.hook = args.size or 100, args.hook or "patient-view"
        gil_experiment(args)
    else:
        args.size, args.hook = args.size or 10000, args.hook or "patient-view"
        parse_experiment(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
