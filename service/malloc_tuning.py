"""glibc malloc settings for the worker processes, and handing memory back after a large hook.

glibc raises its mmap threshold each time a large block is freed (up to 32 MB): after the first
multi-megabyte request body, later bodies of that size come from the heap instead of mmap, and
the heap keeps the pages after they are freed. With one malloc arena per thread as well, a
worker's resident memory crept up request after request (bench/README.md). Fixing the threshold
at 1 MiB keeps large buffers in mmap (returned on free), two arenas bound per-thread growth, and
`malloc_trim(0)` after a large hook gives the freed heap pages back to the OS.

Everything here is a no-op where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_ARENA_MAX = -8
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 1024 * 1024
ARENAS = 2


def _glibc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt  # noqa: B018 - glibc only
        libc.malloc_trim  # noqa: B018
    except (OSError, AttributeError):
        return None
    return libc


_libc = _glibc()


def tune_worker_malloc() -> bool:
    """Call once per worker process, before it serves (gunicorn's post_fork)."""
    if _libc is None:
        return False
    ok = _libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1
    return _libc.mallopt(M_ARENA_MAX, ARENAS) == 1 and ok


def give_back_free_memory() -> None:
    if _libc is not None:
        _libc.malloc_trim(0)
