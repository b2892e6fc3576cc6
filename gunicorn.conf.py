"""gunicorn settings for production: `gunicorn -c gunicorn.conf.py 'service:create_app()'`.

Worker choice: gthread. A hook call is mostly CPU (parse JSON, extract facts, build cards: a few
milliseconds), but the FHIR fallback path waits on the EHR's FHIR server for up to the deadline
(2 s by default). With sync workers one slow FHIR server would block a whole worker; gthread lets
the other threads of the worker answer meanwhile, without the monkey-patching of gevent/eventlet.
Workers = 2 x CPU cores, threads per worker = 4 (enough to overlap FHIR waits). The GIL makes
threads useless for the CPU part, processes are not; and with one worker per core, the threads of
a worker took turns on the GIL at every point where a request releases it (socket and SQLite
calls), which stretched the slowest requests. Measured at 100 resources, 16 clients (bench/README.md):
p99 21.7 -> 13.5 ms (order-sign) and 21.6 -> 12.9 ms (patient-view), same throughput. Every setting
can be overridden from the environment.
"""

import gc
import multiprocessing
import os

bind = os.environ.get("RPL_CDS_BIND", "0.0.0.0:8080")
worker_class = "gthread"
workers = int(os.environ.get("RPL_CDS_WORKERS", 2 * multiprocessing.cpu_count()))
threads = int(os.environ.get("RPL_CDS_THREADS", 4))
# Longer than the hook deadline so a worker is never killed while answering within it.
timeout = int(os.environ.get("RPL_CDS_WORKER_TIMEOUT", 30))
graceful_timeout = int(os.environ.get("RPL_CDS_GRACEFUL_TIMEOUT", 20))
keepalive = 5
# Load the app (and its knowledge files) once in the master: workers fork with it ready.
preload_app = True
# Request lines are logged by the service itself without identifiers; gunicorn's access log would
# print query strings, so it stays off.
accesslog = None
errorlog = "-"
loglevel = os.environ.get("RPL_CDS_LOG_LEVEL", "info").lower()
# Trust X-Forwarded-* only from these proxies (comma-separated); RPL_CDS_PUBLIC_URL is preferred.
forwarded_allow_ips = os.environ.get("RPL_CDS_FORWARDED_ALLOW_IPS", "127.0.0.1")

# Prometheus metrics across workers (service/operations.py): with PROMETHEUS_MULTIPROC_DIR set,
# every worker writes its counters to files there and /metrics adds them up. The directory must
# exist and be empty before the workers fork (stale files from a previous run would count again).
_prometheus_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
if _prometheus_dir:
    os.makedirs(_prometheus_dir, exist_ok=True)
    for _name in os.listdir(_prometheus_dir):
        if _name.endswith(".db"):
            os.remove(os.path.join(_prometheus_dir, _name))


def child_exit(server, worker):
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)


# Garbage collection: a large prefetch creates hundreds of thousands of short-lived dicts, and the
# default thresholds run the collector over them many times per request. The loaded app (knowledge,
# code tables, schemas) is frozen in the master so workers neither scan nor copy it; the workers
# collect less often. Measured (bench/README.md): 10,000-resource CPU per request 369 -> 219 ms.
def pre_fork(server, worker):
    gc.freeze()


def post_fork(server, worker):
    gc.set_threshold(50_000, 20, 20)
    # Large request bodies in mmap, two malloc arenas: see service/malloc_tuning.py.
    from service.malloc_tuning import tune_worker_malloc

    tune_worker_malloc()
