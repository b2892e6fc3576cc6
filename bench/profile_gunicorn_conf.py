"""gunicorn config for profiling: the project's gunicorn.conf.py plus cProfile in every worker.

    BENCH_PROFILE_DIR=/tmp/prof gunicorn -c bench/profile_gunicorn_conf.py 'service:create_app()'

cProfile sees one thread only, so every gthread pool thread gets its own profiler around
`worker.handle` (request parsing, the WSGI app, writing the answer) and the worker's main thread
(accept/poll loop) gets one too. The clock is the thread's CPU time (BENCH_PROFILE_CLOCK=cpu,
the default), so waiting for the GIL, a lock or I/O does not count; BENCH_PROFILE_CLOCK=wall
counts it. On worker exit (SIGTERM to the master) all are merged into
<dir>/worker-<pid>.prof; read it with `python -m bench.profile --stats <file>`.
"""

import os
import runpy
import threading
from pathlib import Path

_project = runpy.run_path(str(Path(__file__).resolve().parent.parent / "gunicorn.conf.py"))
globals().update({k: v for k, v in _project.items() if not k.startswith("__")})
_project_hooks = {name: _project.get(name) for name in ("pre_fork", "post_fork", "worker_exit")}


def _chain(name, *args):
    """The project's own hook of that name runs first."""
    if callable(_project_hooks.get(name)):
        _project_hooks[name](*args)


def _new_profiler():
    import cProfile
    import time

    if os.environ.get("BENCH_PROFILE_CLOCK", "cpu") == "cpu":
        return cProfile.Profile(time.thread_time)
    return cProfile.Profile()


def post_fork(server, worker):
    _chain("post_fork", server, worker)

    profilers = []
    local = threading.local()
    lock = threading.Lock()
    original_handle = worker.handle

    def profiled_handle(conn):
        profiler = getattr(local, "profiler", None)
        if profiler is None:
            profiler = local.profiler = _new_profiler()
            with lock:
                profilers.append(profiler)
        profiler.enable()
        try:
            return original_handle(conn)
        finally:
            profiler.disable()

    worker.handle = profiled_handle
    main = _new_profiler()
    profilers.append(main)
    worker._bench_profilers = profilers
    main.enable()


def worker_exit(server, worker):
    _chain("worker_exit", server, worker)
    import pstats

    profilers = getattr(worker, "_bench_profilers", [])
    if not profilers:
        return
    profilers[0].disable()
    out = Path(os.environ.get("BENCH_PROFILE_DIR", "bench/results/tmp/profile"))
    out.mkdir(parents=True, exist_ok=True)
    stats = None
    for profiler in profilers:
        profiler.create_stats()
        if not profiler.stats:
            continue
        if stats is None:
            stats = pstats.Stats(profiler)
        else:
            stats.add(profiler)
    if stats is not None:
        stats.dump_stats(str(out / f"worker-{os.getpid()}.prof"))
