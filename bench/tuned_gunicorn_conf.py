"""Experiments: the project's gunicorn.conf.py plus runtime probes, to measure a proposal without
editing the service:

    BENCH_NO_STORE=1 python -m bench --gunicorn-conf bench/tuned_gunicorn_conf.py

Each probe is off unless its variable is set (settings the service itself reads, such as
RPL_CDS_WORKERS, RPL_CDS_THREADS or RPL_CDS_LARGE_BODIES_AT_ONCE, need no probe):
- BENCH_SWITCH_INTERVAL=s: `sys.setswitchinterval(s)` in each worker. With several threads per
  worker, a thread that releases the GIL (socket I/O, os.urandom for uuid4, writing a log line)
  waits up to the interval (default 5 ms) to get it back while another thread computes.
- BENCH_NO_STORE=1: the workers drop the `rpl_store` extension, so hooks neither read override
  memories nor record cards: the upper bound of what moving the store off the hook path saves.
"""

import os
import runpy
import sys
from pathlib import Path

_project = runpy.run_path(str(Path(__file__).resolve().parent.parent / "gunicorn.conf.py"))
globals().update({k: v for k, v in _project.items() if not k.startswith("__")})
_project_post_fork = _project.get("post_fork")


def post_fork(server, worker):
    if callable(_project_post_fork):
        _project_post_fork(server, worker)  # the project's own hook runs first
    if os.environ.get("BENCH_SWITCH_INTERVAL"):
        sys.setswitchinterval(float(os.environ["BENCH_SWITCH_INTERVAL"]))
    extensions = getattr(getattr(server.app, "callable", None), "extensions", {})
    if os.environ.get("BENCH_NO_STORE") == "1":
        extensions.pop("rpl_store", None)
    store = extensions.get("rpl_store")
    if store is not None and os.environ.get("BENCH_NO_STORE_READS") == "1":
        store.filter_findings = lambda call, facts, findings: list(findings)
    if store is not None and os.environ.get("BENCH_NO_STORE_WRITES") == "1":
        store.record_cards_in_background = lambda call, pairs: None
