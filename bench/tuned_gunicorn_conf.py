"""Experiments: the project's gunicorn.conf.py plus runtime tuning, to measure a proposal without
editing the service:

    BENCH_GC_FREEZE=1 BENCH_GC_THRESHOLD=50000,20,20 BENCH_SWITCH_INTERVAL=0.0005 \
        python -m bench --gunicorn-conf bench/tuned_gunicorn_conf.py

Each knob is off unless its variable is set:
- BENCH_GC_FREEZE=1: `gc.freeze()` in the master just before each fork. The objects of the
  preloaded app (code tables, schemas, knowledge) move to the permanent generation: the workers'
  full collections no longer scan them, and their copy-on-write pages stay shared.
- BENCH_GC_THRESHOLD=a,b,c: `gc.set_threshold(a, b, c)` in each worker. A hook builds about a
  hundred container objects per prefetched resource; the default (700, 10, 10) then runs full
  collections over the whole request while it is alive.
- BENCH_SWITCH_INTERVAL=s: `sys.setswitchinterval(s)` in each worker. With several threads per
  worker, a thread that releases the GIL (socket I/O, os.urandom for uuid4, writing a log line)
  waits up to the interval (default 5 ms) to get it back while another thread computes.
- BENCH_NO_STORE=1: the workers drop the `rpl_store` extension, so hooks neither read override
  memories nor record cards: the upper bound of what moving the store off the hook path saves.
- BENCH_LARGE_BODY_LIMIT=n: at most n requests with a body over 1 MiB are processed at once per
  worker (a semaphore around the WSGI app); the others wait. In a CPU-bound worker, running
  several large hooks at once only shares the GIL, and each holds ~120 MB while it runs.
"""

import gc
import os
import runpy
import sys
from pathlib import Path

_project = runpy.run_path(str(Path(__file__).resolve().parent.parent / "gunicorn.conf.py"))
globals().update({k: v for k, v in _project.items() if not k.startswith("__")})
_project_hooks = {name: _project.get(name) for name in ("pre_fork", "post_fork")}


def _chain(name, *args):
    """The project's own hook of that name runs first."""
    if callable(_project_hooks.get(name)):
        _project_hooks[name](*args)


def pre_fork(server, worker):
    _chain("pre_fork", server, worker)
    if os.environ.get("BENCH_GC_FREEZE") == "1":
        gc.freeze()


def post_fork(server, worker):
    _chain("post_fork", server, worker)
    if os.environ.get("BENCH_GC_THRESHOLD"):
        gc.set_threshold(*(int(x) for x in os.environ["BENCH_GC_THRESHOLD"].split(",")))
    if os.environ.get("BENCH_SWITCH_INTERVAL"):
        sys.setswitchinterval(float(os.environ["BENCH_SWITCH_INTERVAL"]))
    if os.environ.get("BENCH_LARGE_BODY_LIMIT"):
        _limit_large_bodies(server, int(os.environ["BENCH_LARGE_BODY_LIMIT"]))
    if os.environ.get("BENCH_NO_STORE") == "1":
        flask_app = getattr(server.app, "callable", None)
        if flask_app is not None:
            flask_app.extensions.pop("rpl_store", None)


def _limit_large_bodies(server, limit):
    import threading

    flask_app = getattr(server.app, "callable", None)
    if flask_app is None:
        return
    gate = threading.BoundedSemaphore(limit)
    inner = flask_app.wsgi_app

    def gated(environ, start_response):
        try:
            length = int(environ.get("CONTENT_LENGTH") or 0)
        except ValueError:
            length = 0
        if length <= 1024 * 1024:
            return inner(environ, start_response)
        with gate:
            return inner(environ, start_response)

    flask_app.wsgi_app = gated
