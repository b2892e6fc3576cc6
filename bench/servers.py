"""Start and stop the processes under test: the service (or the echo app) under gunicorn with the
project's gunicorn.conf.py, and the Node FHIR test server. Also start-up timing and per-worker
memory read from /proc."""

from __future__ import annotations

import contextlib
import http.client
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SERVICE_APP = "service:create_app()"
ECHO_APP = "bench.echo_app:create_app()"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http_status(host: str, port: int, path: str, timeout: float = 1.0) -> int | None:
    """Status of a GET on a fresh connection; None if nothing answers."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        response.read()
        return response.status
    except OSError:
        return None
    finally:
        conn.close()


@dataclass
class Gunicorn:
    proc: subprocess.Popen
    port: int
    startup_s: float
    log_path: Path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def worker_pids(self) -> list[int]:
        return children_of(self.proc.pid)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def start_gunicorn(app: str, workdir: Path, env_overrides: dict[str, str], label: str,
                   timeout_s: float = 60, config: str = "gunicorn.conf.py") -> Gunicorn:
    """Launch gunicorn with `config` and time launch -> first 200 on GET /cds-services."""
    port = free_port()
    env = {**os.environ, "RPL_CDS_BIND": f"127.0.0.1:{port}", **env_overrides}
    log_path = workdir / f"gunicorn-{label}-{port}.log"
    gunicorn = Path(sys.executable).with_name("gunicorn")
    with open(log_path, "w") as log:  # a file, not a pipe: an unread pipe would block gunicorn
        started = time.perf_counter()
        proc = subprocess.Popen(
            [str(gunicorn), "-c", config, app], cwd=ROOT, env=env,
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
        )
    deadline = started + timeout_s
    while time.perf_counter() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"gunicorn ({label}) exited with {proc.returncode}:\n"
                               + log_path.read_text(errors="replace")[-4000:])
        if http_status("127.0.0.1", port, "/cds-services", timeout=2) == 200:
            return Gunicorn(proc, port, time.perf_counter() - started, log_path)
        time.sleep(0.005)
    stop_process(proc)
    raise RuntimeError(f"gunicorn ({label}) gave no 200 within {timeout_s} s:\n"
                       + log_path.read_text(errors="replace")[-4000:])


def stop_process(proc: subprocess.Popen, timeout_s: float = 20) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


def children_of(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                stat = handle.read()
        except OSError:
            continue
        # Field 4 (ppid) follows the parenthesised command name, which may contain spaces.
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == pid:
            found.append(int(entry))
    return sorted(found)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def workers_cpu_seconds(server: "Gunicorn") -> float:
    return sum(cpu_seconds(pid) for pid in server.worker_pids())


def memory_mb(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM from /proc/<pid>/status, Pss from smaps_rollup (shared pages split)."""
    figures: dict[str, float] = {}
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    figures[key] = int(value.split()[0]) / 1024
        with contextlib.suppress(OSError):
            with open(f"/proc/{pid}/smaps_rollup") as handle:
                for line in handle:
                    if line.startswith("Pss:"):
                        figures["Pss"] = int(line.split()[1]) / 1024
    except OSError:
        pass
    return figures


def worker_memory(server: Gunicorn) -> dict:
    return {
        "master": memory_mb(server.proc.pid),
        "workers": {str(pid): memory_mb(pid) for pid in server.worker_pids()},
    }


def wait_for_workers(server: Gunicorn, timeout_s: float = 10, settle_s: float = 0.5) -> None:
    """Until gunicorn has forked all its workers, however many its config asks for: the count
    has stayed the same for `settle_s` (or the timeout)."""
    deadline = time.perf_counter() + timeout_s
    count, stable_since = len(server.worker_pids()), time.perf_counter()
    while time.perf_counter() < deadline:
        time.sleep(0.05)
        now = len(server.worker_pids())
        if now != count:
            count, stable_since = now, time.perf_counter()
        elif count and time.perf_counter() - stable_since >= settle_s:
            return


LOG_PATTERNS = {
    "database busy/unavailable (a hook answered without the store)": re.compile(r"database (busy|unavailable)"),
    "tracebacks": re.compile(r"^Traceback"),
    "worker timeouts": re.compile(r"WORKER TIMEOUT"),
    "error lines": re.compile(r"\[ERROR\]|\"level\": ?\"error\"", re.IGNORECASE),
}


IGNORED_LINES = re.compile(r"was sent SIGKILL")  # the respawn measurement's own kills


def log_findings(server: Gunicorn) -> dict[str, int]:
    """Counts of notable lines in a gunicorn log (the service logs to it too)."""
    counts = {name: 0 for name in LOG_PATTERNS}
    try:
        text = server.log_path.read_text(errors="replace")
    except OSError:
        return counts
    for line in text.splitlines():
        if IGNORED_LINES.search(line):
            continue
        for name, pattern in LOG_PATTERNS.items():
            if pattern.search(line):
                counts[name] += 1
    return counts


def measure_worker_respawn(server: Gunicorn, timeout_s: float = 30) -> float:
    """Seconds from SIGKILL of one worker until its replacement answers 200.

    The other workers are paused (SIGSTOP) meanwhile, so the only process that can accept the
    probe connections is the new worker.
    """
    workers = server.worker_pids()
    if not workers:
        raise RuntimeError("no gunicorn workers found")
    victim, others = workers[0], workers[1:]
    for pid in others:
        os.kill(pid, signal.SIGSTOP)
    try:
        killed = time.perf_counter()
        os.kill(victim, signal.SIGKILL)
        while time.perf_counter() - killed < timeout_s:
            fresh = [p for p in server.worker_pids() if p != victim and p not in others]
            if fresh and http_status("127.0.0.1", server.port, "/cds-services", timeout=0.5) == 200:
                return time.perf_counter() - killed
            time.sleep(0.002)
        raise RuntimeError("the replacement worker did not answer in time")
    finally:
        for pid in others:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


# ---------------------------------------------------------------------------------------------
# The Node FHIR test server (tests/fhir_server), started as the tests start it.


@contextlib.contextmanager
def running_fhir_server(seed: Path, workers: int) -> Iterator[str]:
    """tests/support/fhir_server.py's server on a free port, `workers` Node processes each loaded
    with the `seed` Bundle; yields its base URL."""
    from tests.support.fhir_server import running_fhir_server as start_fhir_server

    with start_fhir_server(seed=seed, workers=workers) as server:
        yield server.base_url
