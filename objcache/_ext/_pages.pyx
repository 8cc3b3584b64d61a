"""A page arena in one shared-memory mapping (compiled).

Twin: objcache/_ext/pages_py.py (same API and errors; tested for parity).

Invariants
----------
* The arena is ONE memfd of ``npages * page_size`` bytes mapped MAP_SHARED
  once; page i lives at offset ``i * page_size`` of both the mapping and the
  memfd (so ``fd`` can be handed to local readers with SCM_RIGHTS).
* Each page is free or allocated. ``pins[i]`` counts explicit pins plus live
  buffer exports of page i. A pinned page is never freed or handed out again;
  the arena can't be closed while any page is pinned.
* A view (``view(i)``) is a memoryview over a small exporter object; the page
  stays pinned exactly as long as that memoryview (or anything derived from
  it: slices, numpy arrays) is alive. The exporter holds a reference to the
  arena, so the mapping outlives every view.
* Not thread-safe: the control plane owns an arena from one thread (the
  event loop). Views may be read from any thread while pinned.
"""
cimport cython
from cpython.buffer cimport PyBUF_WRITABLE, PyBUF_FORMAT, PyBUF_ND, PyBUF_STRIDES
from libc.stdint cimport uint32_t, uint8_t
from libc.stdlib cimport calloc, free as c_free
from libc.string cimport memset
from posix.unistd cimport close as c_close, ftruncate

import os

from objcache._ext.errors import ArenaFullError, PageError, PagePinnedError

cdef extern from "<sys/mman.h>" nogil:
    void *mmap(void *addr, size_t length, int prot, int flags, int fd, long offset)
    int munmap(void *addr, size_t length)
    int madvise(void *addr, size_t length, int advice)
    void *MAP_FAILED
    int PROT_READ, PROT_WRITE, MAP_SHARED, MADV_DONTNEED, MADV_REMOVE

cdef extern from "oc_debug.h":
    int oc_debug_enabled()
    long oc_debug_get(int c)
    void OC_DEBUG_INC(int c)
    void OC_DEBUG_DEC(int c)
    int OC_PAGE_VIEWS, OC_ARENAS

cdef enum:
    PAGE_FREE = 0
    PAGE_ALLOCATED = 1

# 4 KiB: the memfd offsets handed to readers must be mmap-able.
cdef Py_ssize_t PAGE_ALIGN = 4096
cdef char *_FORMAT_B = b"B"


cdef class PageArena:
    """``PageArena(page_size, npages, name="objcache-arena")``.

    ``page_size`` must be a positive multiple of 4096; ``npages`` >= 1.
    """
    cdef int _fd
    cdef char *_base
    cdef Py_ssize_t _page_size
    cdef Py_ssize_t _npages
    cdef uint32_t *_pins
    cdef uint8_t *_state
    cdef uint32_t *_free_stack      # LIFO: the most recently freed page is reused first
    cdef Py_ssize_t _nfree
    cdef Py_ssize_t _pinned_pages   # pages with pins > 0
    cdef bint _closed
    cdef readonly str name

    def __cinit__(self, page_size, npages, name="objcache-arena"):
        self._fd = -1
        self._base = NULL
        self._closed = True
        if not isinstance(page_size, int) or not isinstance(npages, int):
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
        self._pins = <uint32_t *>calloc(npages, sizeof(uint32_t))
        self._state = <uint8_t *>calloc(npages, sizeof(uint8_t))
        self._free_stack = <uint32_t *>calloc(npages, sizeof(uint32_t))
        if self._pins == NULL or self._state == NULL or self._free_stack == NULL:
            raise MemoryError()
        cdef Py_ssize_t i
        for i in range(npages):
            self._free_stack[i] = <uint32_t>(npages - 1 - i)   # page 0 on top
        self._nfree = npages
        self._pinned_pages = 0

        cdef size_t size = <size_t>page_size * <size_t>npages
        self._fd = os.memfd_create(name, os.MFD_CLOEXEC)
        if ftruncate(self._fd, size) != 0:
            raise OSError(os.strerror(_errno()), "ftruncate of the arena memfd")
        cdef void *base = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED,
                               self._fd, 0)
        if base == MAP_FAILED:
            raise OSError(_errno(), f"mmap of a {size}-byte arena failed")
        self._base = <char *>base
        self._closed = False
        OC_DEBUG_INC(OC_ARENAS)

    def __dealloc__(self):
        # Views hold a reference to the arena, so none is alive here.
        self._release()
        c_free(self._pins)
        c_free(self._state)
        c_free(self._free_stack)

    cdef void _release(self) noexcept:
        if self._base != NULL:
            munmap(self._base, <size_t>self._page_size * <size_t>self._npages)
            self._base = NULL
            OC_DEBUG_DEC(OC_ARENAS)
        if self._fd >= 0:
            c_close(self._fd)
            self._fd = -1
        self._closed = True

    # -- properties --------------------------------------------------------

    @property
    def fd(self):
        """The memfd holding the pages (owned by the arena; dup it to keep)."""
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
        return self._nfree

    @property
    def closed(self):
        return self._closed

    # -- page lifecycle ----------------------------------------------------

    cdef int _check_open(self) except -1:
        if self._closed:
            raise PageError("the page arena is closed")
        return 0

    cdef Py_ssize_t _index(self, object idx) except -1:
        self._check_open()
        if not isinstance(idx, int):
            raise TypeError(f"page index must be an int, not {type(idx).__name__}")
        if idx < 0 or idx >= self._npages:
            raise IndexError(f"page index {idx} out of range [0, {self._npages})")
        return idx

    cdef Py_ssize_t _allocated(self, object idx) except -1:
        cdef Py_ssize_t i = self._index(idx)
        if self._state[i] != PAGE_ALLOCATED:
            raise PageError(f"page {i} is not allocated")
        return i

    def allocate(self):
        """Take a free page; returns its index. ArenaFullError when none."""
        self._check_open()
        if self._nfree == 0:
            raise ArenaFullError(f"all {self._npages} pages are allocated")
        self._nfree -= 1
        cdef uint32_t i = self._free_stack[self._nfree]
        self._state[i] = PAGE_ALLOCATED
        return i

    def free(self, idx):
        """Return page ``idx`` to the free list. PagePinnedError if pinned;
        PageError if it is not allocated (double free)."""
        cdef Py_ssize_t i = self._allocated(idx)
        if self._pins[i]:
            raise PagePinnedError(f"page {i} is pinned ({self._pins[i]} pins) "
                                  f"and cannot be freed")
        self._state[i] = PAGE_FREE
        self._free_stack[self._nfree] = <uint32_t>i
        self._nfree += 1

    def discard(self, idx):
        """Give page ``idx``'s memory back to the kernel (contents become
        zero). The page stays allocated; it must not be pinned."""
        cdef Py_ssize_t i = self._allocated(idx)
        if self._pins[i]:
            raise PagePinnedError(f"page {i} is pinned and cannot be discarded")
        if madvise(self._base + i * self._page_size, <size_t>self._page_size,
                   MADV_REMOVE) != 0:
            memset(self._base + i * self._page_size, 0, <size_t>self._page_size)

    cdef void _pin(self, Py_ssize_t i) noexcept:
        if self._pins[i] == 0:
            self._pinned_pages += 1
        self._pins[i] += 1

    cdef void _unpin(self, Py_ssize_t i) noexcept:
        self._pins[i] -= 1
        if self._pins[i] == 0:
            self._pinned_pages -= 1

    def pin(self, idx):
        """Pin page ``idx`` explicitly (in addition to live views)."""
        self._pin(self._allocated(idx))

    def unpin(self, idx):
        """Undo one pin(). PageError if the page has no explicit pin to undo
        (pins held by live views are released by releasing the views)."""
        cdef Py_ssize_t i = self._allocated(idx)
        if self._pins[i] == 0:
            raise PageError(f"page {i} is not pinned")
        self._unpin(i)

    def pin_count(self, idx):
        """Explicit pins plus live views of page ``idx``."""
        return self._pins[self._index(idx)]

    def is_allocated(self, idx):
        return self._state[self._index(idx)] == PAGE_ALLOCATED

    def offset(self, idx):
        """Byte offset of page ``idx`` in the mapping and in ``fd``."""
        return self._index(idx) * self._page_size

    def view(self, idx, *, readonly=False):
        """A memoryview of page ``idx`` that keeps it pinned while alive.

        Release it (``mv.release()`` or drop every reference, including
        numpy arrays made from it) to unpin."""
        cdef Py_ssize_t i = self._allocated(idx)
        return memoryview(_PageBuffer.create(self, i, readonly))

    def close(self):
        """Unmap and close the memfd. PagePinnedError while any page is
        pinned (a live view would otherwise point at unmapped memory).
        Idempotent."""
        if self._closed:
            return
        if self._pinned_pages:
            raise PagePinnedError(f"{self._pinned_pages} pages are still pinned; "
                                  f"release their views before closing the arena")
        self._release()

    def __enter__(self):
        self._check_open()
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        state = "closed" if self._closed else f"{self._nfree} free"
        return (f"<PageArena {self.name!r} {self._npages} x {self._page_size} B, "
                f"{state}>")


# no_gc_clear: a memoryview of a page can die inside cyclic garbage; if
# the collector cleared ``arena`` first, __releasebuffer__ then unpinned
# through None and crashed the process (found by fsstress).
@cython.no_gc_clear
cdef class _PageBuffer:
    """Buffer exporter for one page. Each export (one per memoryview made
    from it) holds one pin, released in __releasebuffer__."""
    cdef PageArena arena
    cdef Py_ssize_t index
    cdef bint readonly
    cdef Py_ssize_t shape[1]
    cdef Py_ssize_t strides[1]

    @staticmethod
    cdef _PageBuffer create(PageArena arena, Py_ssize_t index, bint readonly):
        cdef _PageBuffer b = _PageBuffer.__new__(_PageBuffer)
        b.arena = arena
        b.index = index
        b.readonly = readonly
        b.shape[0] = arena._page_size
        b.strides[0] = 1
        return b

    def __getbuffer__(self, Py_buffer *buf, int flags):
        if self.readonly and (flags & PyBUF_WRITABLE) == PyBUF_WRITABLE:
            raise BufferError("this page view is read-only")
        if self.arena._closed or self.arena._state[self.index] != PAGE_ALLOCATED:
            raise BufferError(f"page {self.index} is no longer allocated")
        buf.buf = self.arena._base + self.index * self.arena._page_size
        buf.obj = self
        buf.len = self.arena._page_size
        buf.readonly = self.readonly
        buf.itemsize = 1
        if (flags & PyBUF_FORMAT) == PyBUF_FORMAT:
            buf.format = _FORMAT_B
        else:
            buf.format = NULL
        buf.ndim = 1
        buf.shape = self.shape if (flags & PyBUF_ND) == PyBUF_ND else NULL
        buf.strides = self.strides if (flags & PyBUF_STRIDES) == PyBUF_STRIDES else NULL
        buf.suboffsets = NULL
        buf.internal = NULL
        self.arena._pin(self.index)
        OC_DEBUG_INC(OC_PAGE_VIEWS)

    def __releasebuffer__(self, Py_buffer *buf):
        self.arena._unpin(self.index)
        OC_DEBUG_DEC(OC_PAGE_VIEWS)


cdef extern from "<errno.h>":
    int errno


cdef inline int _errno() noexcept:
    return errno


def debug_counters():
    if not oc_debug_enabled():
        return None
    return {"page_views": oc_debug_get(OC_PAGE_VIEWS),
            "arenas": oc_debug_get(OC_ARENAS)}
