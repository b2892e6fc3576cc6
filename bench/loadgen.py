"""Load generator: a separate process with N client threads, each with its own keep-alive
`http.client` connection to 127.0.0.1. Run as `python -m bench.loadgen` with a JSON spec on stdin;
it prints one JSON document with the raw latencies of every measured run and exits.

Per spec it does: a warm-up (closed loop, discarded), then `runs` closed-loop runs (every client
sends its next request as soon as the previous answer is in: the throughput figure), then, when
`paced_fraction` > 0, `runs` paced runs that model interactive users: each client waits for its
answer, then thinks for an exponentially distributed time chosen so that all clients together
offer about `paced_fraction` x the measured closed-loop throughput. Being a closed system, the
paced load can never pile up a backlog the server cannot clear.

A run stops by itself after `duration_s` or `max_requests`, whichever comes first (a paced run
may go on up to `paced_max_duration_s` to collect `paced_min_samples`).
"""

from __future__ import annotations

import http.client
import json
import random
import sys
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import itertools

from bench.synthetic import PATIENT_PLACEHOLDER, BodyTemplate, hook_body

IDLE_RECONNECT_S = 4.0  # gunicorn keepalive is 5 s: reconnect first rather than hit a closed socket


@dataclass
class RunResult:
    mode: str
    latencies_ms: list[float] = field(default_factory=list)
    errors: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    elapsed_s: float = 0.0
    offered_rps: float | None = None

    def as_dict(self) -> dict:
        done = len(self.latencies_ms)
        return {
            "mode": self.mode, "latencies_ms": self.latencies_ms,
            "errors": self.errors, "statuses": self.statuses, "elapsed_s": self.elapsed_s,
            "completed": done, "throughput_rps": done / self.elapsed_s if self.elapsed_s else 0.0,
            "offered_rps": self.offered_rps,
        }


class Client:
    """One keep-alive connection; reconnects when idle or when the server closed it."""

    def __init__(self, host: str, port: int, timeout: float):
        self.host, self.port, self.timeout = host, port, timeout
        self.conn: http.client.HTTPConnection | None = None
        self.last_used = 0.0

    def _connection(self) -> http.client.HTTPConnection:
        if self.conn is not None and time.monotonic() - self.last_used > IDLE_RECONNECT_S:
            self.conn.close()
            self.conn = None
        if self.conn is None:
            self.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        return self.conn

    def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        for attempt in (1, 2):
            conn = self._connection()
            try:
                conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
                response = conn.getresponse()
                data = response.read()
                self.last_used = time.monotonic()
                if response.will_close:
                    conn.close()
                    self.conn = None
                return response.status, data
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                conn.close()
                self.conn = None
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()


def _send_and_record(client: Client, path: str, make_body, result: RunResult,
                     lock: threading.Lock) -> None:
    """One request; its latency (200) or an error, and its status, go into `result`."""
    body = make_body()
    sent = time.perf_counter()
    try:
        status, _ = client.post(path, body)
    except OSError:
        status = 0
    took = (time.perf_counter() - sent) * 1000
    with lock:
        result.statuses[str(status)] = result.statuses.get(str(status), 0) + 1
        if status == 200:
            result.latencies_ms.append(took)
        else:
            result.errors += 1


def run_closed(clients: list[Client], path: str, make_body, duration_s: float, max_requests: int,
               mode: str = "closed", min_requests: int = 0) -> RunResult:
    result = RunResult(mode)
    lock = threading.Lock()
    budget = [max_requests]
    start = time.perf_counter()
    stop_at = start + duration_s

    def worker(client: Client) -> None:
        while time.perf_counter() < stop_at or len(result.latencies_ms) + result.errors < min_requests:
            with lock:
                if budget[0] <= 0:
                    return
                budget[0] -= 1
            _send_and_record(client, path, make_body, result, lock)

    _run_threads(clients, worker)
    result.elapsed_s = time.perf_counter() - start
    return result


def run_paced(clients: list[Client], path: str, make_body, duration_s: float, max_requests: int,
              rate_rps: float, seed: int, min_samples: int = 0, max_duration_s: float | None = None) -> RunResult:
    """Interactive users: each client sends, waits for the answer, then "thinks" for an
    exponentially distributed time whose mean makes all clients together offer about `rate_rps`.
    Runs for `duration_s`, longer if needed to collect `min_samples` (up to `max_duration_s`)."""
    result = RunResult("paced", offered_rps=rate_rps)
    lock = threading.Lock()
    budget = [max_requests]
    mean_think_s = len(clients) / rate_rps
    start = time.perf_counter()
    stop_at = start + duration_s
    hard_stop = start + (max_duration_s or duration_s)

    def keep_going() -> bool:
        now = time.perf_counter()
        return now < stop_at or (now < hard_stop and len(result.latencies_ms) < min_samples)

    def worker(client: Client, index: int) -> None:
        rng = random.Random(seed * 1000 + index)
        pause = rng.uniform(0, mean_think_s)  # clients start out of step
        while pause > 0 and keep_going():
            time.sleep(min(pause, 0.25))
            pause -= 0.25
        while keep_going():
            with lock:
                if budget[0] <= 0:
                    return
                budget[0] -= 1
            _send_and_record(client, path, make_body, result, lock)
            pause = rng.expovariate(1 / mean_think_s)
            while pause > 0 and keep_going():  # wake up to stop on time
                time.sleep(min(pause, 0.25))
                pause -= 0.25

    _run_threads(clients, worker, with_index=True)
    result.elapsed_s = time.perf_counter() - start
    return result


def _run_threads(clients: list[Client], target, with_index: bool = False) -> None:
    threads = [
        threading.Thread(target=target, args=(client, i) if with_index else (client,), daemon=True)
        for i, client in enumerate(clients)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def first_response_summary(client: Client, path: str, body: bytes) -> dict:
    """One request before the runs: status and, for a service, the cards it answered with."""
    status, data = client.post(path, body)
    summary: dict = {"status": status, "bytes": len(data)}
    try:
        parsed = json.loads(data)
    except ValueError:
        return summary
    if isinstance(parsed, dict) and isinstance(parsed.get("cards"), list):
        summary["cards"] = len(parsed["cards"])
        summary["card_topics"] = [
            (c.get("source") or {}).get("topic", {}).get("code") for c in parsed["cards"]
        ]
    elif status != 200:
        summary["error"] = str(parsed)[:500]
    return summary


def execute(spec: dict) -> dict:
    url = urlsplit(spec["base_url"])
    template = BodyTemplate(hook_body(spec["hook"], spec.get("size"), fhir_server=spec.get("fhir_server"),
                                      patient_id=PATIENT_PLACEHOLDER))
    # Many patients, as an EHR has: the service's card store keeps per-patient history.
    fixed = spec.get("patient_id")
    patients = itertools.cycle([fixed] if fixed else [f"bench-p{n:06d}" for n in range(spec.get("patient_pool", 1000))])
    patients_lock = threading.Lock()

    def make_body() -> bytes:
        with patients_lock:
            patient = next(patients)
        return template.render(patient)

    path = spec["path"]
    timeout = spec.get("timeout_s", 60)
    clients = [Client(url.hostname, url.port, timeout) for _ in range(spec["clients"])]
    out: dict = {"body_bytes": template.size_bytes, "runs": []}
    try:
        out["first_response"] = first_response_summary(clients[0], path, make_body())
        if out["first_response"]["status"] != 200:
            return out
        if spec.get("warmup_s", 0) > 0:
            warm = run_closed(clients, path, make_body, spec["warmup_s"], spec.get("warmup_requests", 10**9))
            out["warmup"] = {"completed": len(warm.latencies_ms) + warm.errors}
        if spec.get("single_min_requests", 0) > 0:
            # One client alone: the service time without queueing, for reference.
            single = run_closed(clients[:1], path, make_body, spec.get("single_duration_s", 1.0),
                                spec["max_requests"], mode="single", min_requests=spec["single_min_requests"])
            out["runs"].append(single.as_dict())
        closed = []
        for _ in range(spec.get("runs", 1)):
            run = run_closed(clients, path, make_body, spec["duration_s"], spec["max_requests"])
            closed.append(run)
            out["runs"].append(run.as_dict())
        fraction = spec.get("paced_fraction", 0)
        if fraction > 0:
            capacity = sum(len(r.latencies_ms) for r in closed) / sum(r.elapsed_s for r in closed)
            rate = max(capacity * fraction, 0.5)
            for index in range(spec.get("runs", 1)):
                run = run_paced(clients, path, make_body, spec["paced_duration_s"],
                                spec["max_requests"], rate, seed=index + 1,
                                min_samples=spec.get("paced_min_samples", 0),
                                max_duration_s=spec.get("paced_max_duration_s"))
                out["runs"].append(run.as_dict())
    finally:
        for client in clients:
            client.close()
    return out


def main() -> int:
    spec = json.load(sys.stdin)
    json.dump(execute(spec), sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
