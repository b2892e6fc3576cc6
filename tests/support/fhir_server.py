"""A real FHIR R4 server for the tests: Medplum's router + in-memory repository (tests/fhir_server).

Use the pytest fixtures (register with `pytest_plugins = ["tests.support.fhir_server"]`):
- `fhir_server`: one server per test session, searches return every match on one page;
- `fhir_server_paged`: one server per test session whose searches without `_count` return
  pages of `PAGED_DEFAULT_COUNT` entries with `next` links (to exercise paging).
Both servers live for the whole session: give each test its own patient ids.

Or, outside pytest: `with running_fhir_server() as server: server.load(bundle)`.

The fixtures FAIL (never skip) when node or tests/fhir_server/node_modules is missing: CI and
`make test` install them (`npm ci` in tests/fhir_server).
"""

from __future__ import annotations

import collections
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import requests

SERVER_DIR = Path(__file__).resolve().parent.parent / "fhir_server"
SERVER_SCRIPT = "server.mjs"
PAGED_DEFAULT_COUNT = 2
START_TIMEOUT_S = 60.0
_READY = re.compile(r"FHIR server ready at (?P<base>\S+) \(startup (?P<ms>\d+) ms\)")
_FHIR_JSON = "application/fhir+json"


class FhirServerUnavailable(RuntimeError):
    """node or the npm packages are missing, or the server did not start."""


class FhirLoadError(RuntimeError):
    """A transaction/batch Bundle was not loaded in full."""


class FhirTestServer:
    """A running server: `base_url` ends in /fhir (no trailing slash)."""

    def __init__(self, process: subprocess.Popen, base_url: str, startup_ms: int, launch_s: float):
        self.process = process
        self.base_url = base_url
        self.startup_ms = startup_ms  # as reported by the server (module loading + schema indexing)
        self.launch_s = launch_s  # Popen -> ready line, as measured here
        self._http = requests.Session()

    def load(self, bundle: dict) -> dict:
        """POST a transaction or batch Bundle; return the response Bundle; raise if any entry failed."""
        response = self._http.post(
            self.base_url, json=bundle, timeout=30,
            headers={"Content-Type": _FHIR_JSON, "Accept": _FHIR_JSON},
        )
        if response.status_code != 200:
            raise FhirLoadError(f"loading the Bundle gave HTTP {response.status_code}: {response.text[:500]}")
        reply = response.json()
        failures = [
            (index, entry.get("response", {}).get("status"), entry.get("response", {}).get("outcome"))
            for index, entry in enumerate(reply.get("entry") or [])
            if not str(entry.get("response", {}).get("status", "")).startswith("2")
        ]
        if failures or len(reply.get("entry") or []) != len(bundle.get("entry") or []):
            raise FhirLoadError(f"entries not loaded (index, status, outcome): {failures}")
        return reply

    def get(self, relative_url: str, **kwargs) -> requests.Response:
        """GET `<base>/<relative_url>` (test convenience)."""
        kwargs.setdefault("timeout", 10)
        headers = {"Accept": _FHIR_JSON, **kwargs.pop("headers", {})}
        return self._http.get(f"{self.base_url}/{relative_url.lstrip('/')}", headers=headers, **kwargs)

    def stop(self) -> None:
        self._http.close()
        _stop(self.process)


def transaction(resources: list[dict]) -> dict:
    """A transaction Bundle that stores `resources`: PUT when a resource has an id, else POST."""
    entries = []
    for resource in resources:
        kind = resource["resourceType"]
        if resource.get("id"):
            request = {"method": "PUT", "url": f"{kind}/{resource['id']}"}
        else:
            request = {"method": "POST", "url": kind}
        entries.append({"resource": resource, "request": request})
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}


@contextmanager
def running_fhir_server(
    default_count: int | None = None, *, seed: Path | None = None, workers: int = 1
) -> Iterator[FhirTestServer]:
    """Start the Node FHIR server on a free port of 127.0.0.1; stop it on exit, whatever happens.

    `seed`: a batch/transaction Bundle file every worker loads before it answers. `workers` > 1:
    that many Node processes share the port and answer concurrent requests in parallel; the
    server is then read-only (each worker holds its own copy of the seed)."""
    command = _command()
    env = {**os.environ, "FHIR_EXIT_ON_STDIN_EOF": "1"}  # no orphan server if this process dies
    for name in ("FHIR_DEFAULT_COUNT", "FHIR_SEED", "FHIR_WORKERS"):
        env.pop(name, None)
    if default_count is not None:
        env["FHIR_DEFAULT_COUNT"] = str(default_count)
    if seed is not None:
        env["FHIR_SEED"] = str(Path(seed).resolve())
    if workers > 1:
        env["FHIR_WORKERS"] = str(workers)
    started = time.monotonic()
    process = subprocess.Popen(
        command, cwd=SERVER_DIR, env=env, text=True,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    server = None
    try:
        base_url, startup_ms = _wait_until_ready(process)
        server = FhirTestServer(process, base_url, startup_ms, time.monotonic() - started)
        yield server
    finally:
        if server is not None:
            server.stop()
        else:
            _stop(process)


def _command() -> list[str]:
    node = os.environ.get("FHIR_TEST_NODE") or shutil.which("node")
    if not node:
        raise FhirServerUnavailable(
            "node is not installed: the FHIR test server needs Node.js 20 or newer (apt-get install nodejs)"
        )
    if not (SERVER_DIR / "node_modules" / "@medplum" / "fhir-router").is_dir():
        raise FhirServerUnavailable(
            f"{SERVER_DIR}/node_modules is missing: run `npm ci --no-audit --no-fund` in {SERVER_DIR} "
            "(or `make node-deps`)"
        )
    flags = ["--experimental-websocket"] if _node_major(node) < 22 else []  # Medplum 5 needs WebSocket
    return [node, *flags, SERVER_SCRIPT, "0"]


def _node_major(node: str) -> int:
    version = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=10).stdout
    match = re.match(r"v(\d+)", version.strip())
    if not match:
        raise FhirServerUnavailable(f"cannot tell the version of {node}: {version!r}")
    if int(match.group(1)) < 20:
        raise FhirServerUnavailable(f"Node.js 20 or newer is needed, found {version.strip()}")
    return int(match.group(1))


def _wait_until_ready(process: subprocess.Popen) -> tuple[str, int]:
    """Read stdout until the ready line; keep draining it afterwards so the pipe never fills."""
    lines: collections.deque[str] = collections.deque(maxlen=40)
    ready = threading.Event()
    found: dict[str, object] = {}

    def drain() -> None:
        for line in process.stdout:
            lines.append(line.rstrip())
            match = _READY.search(line)
            if match and not ready.is_set():
                found.update(base=match["base"], ms=int(match["ms"]))
                ready.set()
        ready.set()  # the process ended

    threading.Thread(target=drain, name="fhir-server-stdout", daemon=True).start()
    ready.wait(START_TIMEOUT_S)
    if "base" not in found:
        _stop(process)
        output = "\n".join(lines) or "(no output)"
        raise FhirServerUnavailable(f"the FHIR test server did not start (exit code {process.poll()}):\n{output}")
    return str(found["base"]), int(found["ms"])  # type: ignore[arg-type]


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)
    if process.stdin:
        process.stdin.close()


@contextmanager
def _server_or_fail(default_count: int | None) -> Iterator[FhirTestServer]:
    try:
        context = running_fhir_server(default_count)
        server = context.__enter__()
    except FhirServerUnavailable as error:
        pytest.fail(str(error), pytrace=False)
    try:
        yield server
    finally:
        context.__exit__(None, None, None)


@pytest.fixture(scope="session")
def fhir_server() -> Iterator[FhirTestServer]:
    """One Medplum FHIR R4 server for the test session (searches return all matches on one page)."""
    with _server_or_fail(default_count=None) as server:
        yield server


@pytest.fixture(scope="session")
def fhir_server_paged() -> Iterator[FhirTestServer]:
    """Like `fhir_server`, but searches without `_count` return pages of PAGED_DEFAULT_COUNT entries."""
    with _server_or_fail(default_count=PAGED_DEFAULT_COUNT) as server:
        yield server
