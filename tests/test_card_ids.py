"""Card and suggestion UUIDs (cards/ids.py): valid version-4 UUIDs, never repeated, and not
shared between a process and its fork."""

from __future__ import annotations

import os
import uuid

from cards.ids import new_uuid


def test_ids_are_distinct_version_4_uuids_across_buffer_refills():
    ids = [new_uuid() for _ in range(1000)]
    assert len(set(ids)) == 1000
    for value in ids[:200]:
        parsed = uuid.UUID(value)
        assert parsed.version == 4 and parsed.variant == uuid.RFC_4122 and str(parsed) == value


def test_a_forked_child_does_not_reuse_the_parents_buffered_bytes():
    new_uuid()  # the parent now holds a buffer with unused bytes
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(read_end)
        os.write(write_end, "\n".join(new_uuid() for _ in range(5)).encode())
        os._exit(0)
    os.close(write_end)
    child_ids = set(os.read(read_end, 4096).decode().split("\n"))
    os.waitpid(pid, 0)
    parent_ids = {new_uuid() for _ in range(5)}
    assert len(child_ids) == 5 and not child_ids & parent_ids
