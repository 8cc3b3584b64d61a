"""glibc allocator settings for objcache's long-running processes.

Measured (bench/macro/memory.py, embedded mount, fsx-style random 1 B..1 MiB
writes): Python held ~55 MiB of live objects while the process's anonymous
memory had grown to ~400 MiB. The rest was freed memory glibc kept: after
the first free of a large block, glibc raises its mmap threshold (up to 32
MiB), so later 1-8 MiB buffers (RPC payloads, chunk copies, FUSE writes)
come from heap arenas, where interleaved lifetimes fragment them and free
space is rarely at a top that can be trimmed; every thread that allocates
may add an arena of its own. Two settings end it, at the start of a
process, before the big allocations:

* M_MMAP_THRESHOLD fixed at ``MMAP_THRESHOLD`` (this also turns the dynamic
  threshold off): blocks this size or larger are mmapped and unmapped when
  freed, so their memory goes back to the kernel at once;
* M_ARENA_MAX ``ARENA_MAX``: threads share a few arenas.

Same fsx run with them: 148 MiB of anonymous memory instead of 397 MiB.
The environment variables MALLOC_MMAP_THRESHOLD_ / MALLOC_ARENA_MAX, when
set, win (glibc reads them first; these calls are skipped).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3          # glibc's mallopt parameter numbers (malloc.h)
M_ARENA_MAX = -8
MMAP_THRESHOLD = 128 << 10
ARENA_MAX = 2


def bound_freed_memory() -> bool:
    """Apply the settings above; False where glibc is not the allocator."""
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    ok = True
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        ok &= bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    if "MALLOC_ARENA_MAX" not in os.environ:
        ok &= bool(mallopt(M_ARENA_MAX, ARENA_MAX))
    if not ok:
        log.debug("mallopt refused a setting; the allocator keeps its defaults")
    return ok
