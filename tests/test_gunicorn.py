"""The production entry point: the service under a real gunicorn, called over HTTP."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

from tests.hookdata import full_prefetch, hook_request, miscarriage

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_gunicorn(tmp_path, env_overrides: dict[str, str] | None = None, workers: int = 2):
    port = free_port()
    env = {
        **os.environ,
        "RPL_CDS_AUTH": "disabled",
        "RPL_CDS_DATABASE_URL": f"sqlite:///{tmp_path / 'gunicorn.sqlite'}",
        "RPL_CDS_BIND": f"127.0.0.1:{port}",
        "RPL_CDS_WORKERS": str(workers),
        "RPL_CDS_PSEUDONYM_SECRET": "test-secret",
        **(env_overrides or {}),
    }
    gunicorn = Path(sys.executable).with_name("gunicorn")
    # Output goes to a file, not a pipe: a pipe nobody empties blocks the workers after ~64 KB.
    log_path = tmp_path / f"gunicorn-{port}.log"
    log_file = open(log_path, "w")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen(
        [str(gunicorn), "-c", "gunicorn.conf.py", "service:create_app()"],
        cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT, text=True,
    )
    proc.log_path = log_path
    log_file.close()
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"gunicorn exited: {log_path.read_text()[-4000:]}")
        try:
            if requests.get(f"{base}/cds-services", timeout=1).status_code in (200, 401):
                return proc, base
        except requests.ConnectionError:
            time.sleep(0.1)
    proc.kill()
    raise AssertionError("gunicorn did not start in 30 s")


def stop(proc):
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


def test_service_answers_under_gunicorn(tmp_path):
    proc, base = start_gunicorn(tmp_path)
    try:
        discovery = requests.get(f"{base}/cds-services", timeout=5)
        assert discovery.status_code == 200
        assert len(discovery.json()["services"]) == 3
        body = hook_request(prefetch=full_prefetch([miscarriage("a", "2023-01-01"), miscarriage("b", "2024-01-01")]))
        response = requests.post(f"{base}/cds-services/rpl-patient-view", json=body, timeout=5)
        assert response.status_code == 200
        assert any(c["source"]["topic"]["code"] == "rpl-summary" for c in response.json()["cards"])
        bad = requests.post(f"{base}/cds-services/rpl-patient-view", data="{", headers={"Content-Type": "application/json"}, timeout=5)
        assert bad.status_code == 400 and bad.json()["resourceType"] == "OperationOutcome"
    finally:
        stop(proc)
    assert proc.returncode == 0
