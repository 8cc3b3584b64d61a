"""A page arena in one shared-memory mapping: the pure-Python twin of
``_pages.pyx`` (same API, same errors, same invariants; see that module).

Views: ``view(i)`` returns ``memoryview(arr)`` where ``arr`` is a private
numpy array over the page. The memoryview holds the only reference to
``arr``; when the memoryview (and everything derived from it) is released,
``arr`` dies and a ``weakref.finalize`` unpins the page. CPython frees
objects at refcount zero, so the unpin is immediate, as in the compiled
version.
"""
from __future__ import annotations

import mmap
import os
import weakref

import numpy as np

from objcache._ext.errors import ArenaFullError, PageError, PagePinnedError

PAGE_ALIGN = 4096
_FREE, _ALLOCATED = 0, 1


class PageArena:
    """``PageArena(page_size, npages, name="objcache-arena")``."""

    def __init__(self, page_size, npages, name="objcache-arena"):
        self._closed = True
        if isinstance(page_size, bool) or not isinstance(page_size, int) \
                or isinstance(npages, bool) or not isinstance(npages, int):
            raise TypeError("page_size and npages must be ints")
        if not isinstance(name, str):
            raise TypeError("name must be a str")
        if page_size <= 0 or page_size % PAGE_ALIGN:
            raise ValueError(f"page_size must be a positive multiple of "
                             f"{PAGE_ALIGN}, got {page_size}")
        if npages <= 0:
            raise ValueError(f"npages must be >= 1, got {npages}")
        if npages > 0xFFFFFFFF:
            raise ValueError(f"npages must be < 2**32, got {npages}")
        self._page_size = page_size
        self._npages = npages
        self.name = name
        self._pins = [0] * npages
        self._state = bytearray(npages)
        self._free_stack = list(range(npages - 1, -1, -1))   # page 0 on top
        self._pinned_pages = 0
        size = page_size * npages
        self._fd = os.memfd_create(name, os.MFD_CLOEXEC)
        try:
            os.ftruncate(self._fd, size)
            self._mm = mmap.mmap(self._fd, size, mmap.MAP_SHARED,
                                 mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(self._fd)
            raise
        self._closed = False

    # -- properties --------------------------------------------------------

    @property
    def fd(self):
        self._check_open()
        return self._fd

    @property
    def page_size(self):
        return self._page_size

    @property
    def npages(self):
        return self._npages

    @property
    def nbytes(self):
        return self._page_size * self._npages

    @property
    def free_pages(self):
        return len(self._free_stack)

    @property
    def closed(self):
        return self._closed

    # -- page lifecycle ----------------------------------------------------

    def _check_open(self):
        if self._closed:
            raise PageError("the page arena is closed")

    def _index(self, idx) -> int:
        self._check_open()
        if isinstance(idx, bool) or not isinstance(idx, int):
            raise TypeError(f"page index must be an int, not {type(idx).__name__}")
        if idx < 0 or idx >= self._npages:
            raise IndexError(f"page index {idx} out of range [0, {self._npages})")
        return idx

    def _allocated(self, idx) -> int:
        i = self._index(idx)
        if self._state[i] != _ALLOCATED:
            raise PageError(f"page {i} is not allocated")
        return i

    def allocate(self):
        self._check_open()
        if not self._free_stack:
            raise ArenaFullError(f"all {self._npages} pages are allocated")
        i = self._free_stack.pop()
        self._state[i] = _ALLOCATED
        return i

    def free(self, idx):
        i = self._allocated(idx)
        if self._pins[i]:
            raise PagePinnedError(f"page {i} is pinned ({self._pins[i]} pins) "
                                  f"and cannot be freed")
        self._state[i] = _FREE
        self._free_stack.append(i)

    def discard(self, idx):
        i = self._allocated(idx)
        if self._pins[i]:
            raise PagePinnedError(f"page {i} is pinned and cannot be discarded")
        start = i * self._page_size
        try:
            self._mm.madvise(mmap.MADV_REMOVE, start, self._page_size)
        except (OSError, AttributeError):
            self._mm[start:start + self._page_size] = bytes(self._page_size)

    def _pin(self, i):
        if self._pins[i] == 0:
            self._pinned_pages += 1
        self._pins[i] += 1

    def _unpin(self, i):
        self._pins[i] -= 1
        if self._pins[i] == 0:
            self._pinned_pages -= 1

    def pin(self, idx):
        self._pin(self._allocated(idx))

    def unpin(self, idx):
        i = self._allocated(idx)
        if self._pins[i] == 0:
            raise PageError(f"page {i} is not pinned")
        self._unpin(i)

    def pin_count(self, idx):
        return self._pins[self._index(idx)]

    def is_allocated(self, idx):
        return self._state[self._index(idx)] == _ALLOCATED

    def offset(self, idx):
        return self._index(idx) * self._page_size

    def view(self, idx, *, readonly=False):
        i = self._allocated(idx)
        arr = np.frombuffer(self._mm, dtype=np.uint8, count=self._page_size,
                            offset=i * self._page_size)
        if readonly:
            arr.flags.writeable = False
        self._pin(i)
        # The finalizer keeps the arena alive until the page is unpinned,
        # as the compiled exporter's reference to the arena does.
        weakref.finalize(arr, self._unpin, i)
        return memoryview(arr)

    def close(self):
        if self._closed:
            return
        if self._pinned_pages:
            raise PagePinnedError(f"{self._pinned_pages} pages are still pinned; "
                                  f"release their views before closing the arena")
        self._mm.close()
        os.close(self._fd)
        self._closed = True

    def __enter__(self):
        self._check_open()
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        if not getattr(self, "_closed", True) and not self._pinned_pages:
            self.close()

    def __repr__(self):
        state = "closed" if self._closed else f"{self.free_pages} free"
        return (f"<PageArena {self.name!r} {self._npages} x {self._page_size} B, "
                f"{state}>")


def debug_counters():
    return None
