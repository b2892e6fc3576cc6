"""Random (version 4) UUIDs for cards and suggestions, from the operating system's CSPRNG like
`uuid.uuid4`, but with one `os.urandom` call per 64 UUIDs instead of one per UUID: each call is a
system call that releases the GIL, and a hook issues several UUIDs (measured with py-spy under
the benchmark: about 3 % of a busy worker's time in `uuid4`).

Each thread has its own buffer; a forked process starts with empty buffers, so two gunicorn
workers never hand out bytes read by their parent.
"""

from __future__ import annotations

import os
import threading
import uuid

_PER_READ = 64
_local = threading.local()


def _forget_buffers() -> None:
    global _local
    _local = threading.local()


os.register_at_fork(after_in_child=_forget_buffers)


def new_uuid() -> str:
    """A random UUID (version 4, RFC 9562) as its canonical string."""
    state = _local
    buffer = getattr(state, "buffer", b"")
    position = getattr(state, "position", 0)
    if position >= len(buffer):
        buffer, position = os.urandom(16 * _PER_READ), 0
        state.buffer = buffer
    state.position = position + 16
    return str(uuid.UUID(bytes=buffer[position : position + 16], version=4))
