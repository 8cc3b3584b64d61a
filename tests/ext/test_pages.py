"""Page arena: lifecycle, pinning by views, shared-memory visibility, misuse."""
import gc
import mmap
import os

import numpy as np
import pytest

from objcache._ext.errors import ArenaFullError, PageError, PagePinnedError

PS = 4096


@pytest.fixture
def arena(impl):
    a = impl.PageArena(PS, 4, name="test-arena")
    yield a
    gc.collect()
    a.close()


def test_allocate_free_reuse(arena):
    assert arena.free_pages == 4 and arena.nbytes == 4 * PS
    pages = [arena.allocate() for _ in range(4)]
    assert sorted(pages) == [0, 1, 2, 3] and pages[0] == 0
    with pytest.raises(ArenaFullError):
        arena.allocate()
    arena.free(2)
    assert arena.free_pages == 1
    assert arena.allocate() == 2           # LIFO: the warmest page first


def test_view_reads_and_writes_shared_memory(arena):
    i = arena.allocate()
    mv = arena.view(i)
    assert len(mv) == PS and not mv.readonly
    mv[:5] = b"hello"
    # The memfd is the same memory: another mapping sees the bytes.
    other = mmap.mmap(arena.fd, PS, mmap.MAP_SHARED, mmap.PROT_READ,
                      offset=arena.offset(i))
    assert other[:5] == b"hello"
    other.close()
    assert os.pread(arena.fd, 5, arena.offset(i)) == b"hello"
    mv.release()


def test_view_pins_until_released(arena):
    i = arena.allocate()
    mv = arena.view(i)
    assert arena.pin_count(i) == 1
    with pytest.raises(PagePinnedError):
        arena.free(i)
    with pytest.raises(PagePinnedError):
        arena.close()
    mv.release()
    assert arena.pin_count(i) == 0
    arena.free(i)


def test_derived_objects_keep_the_pin(arena):
    i = arena.allocate()
    mv = arena.view(i)
    arr = np.frombuffer(mv, dtype=np.float32)   # like torch.frombuffer
    sub = mv[100:200]
    del mv
    gc.collect()
    assert arena.pin_count(i) == 1
    del arr
    assert arena.pin_count(i) == 1
    del sub
    gc.collect()
    assert arena.pin_count(i) == 0
    arena.free(i)


def test_readonly_view(arena):
    i = arena.allocate()
    arena.view(i)[:3] = b"abc"
    ro = arena.view(i, readonly=True)
    assert ro.readonly and bytes(ro[:3]) == b"abc"
    with pytest.raises(TypeError):
        ro[0] = 1
    arr = np.frombuffer(ro, dtype=np.uint8)
    assert not arr.flags.writeable
    del arr
    ro.release()
    gc.collect()
    assert arena.pin_count(i) == 0


def test_explicit_pins(arena):
    i = arena.allocate()
    arena.pin(i)
    arena.pin(i)
    mv = arena.view(i)
    assert arena.pin_count(i) == 3
    arena.unpin(i)
    arena.unpin(i)
    with pytest.raises(PagePinnedError):
        arena.free(i)
    mv.release()
    with pytest.raises(PageError):
        arena.unpin(i)
    arena.free(i)


def test_misuse(arena):
    with pytest.raises(PageError):
        arena.free(0)                       # never allocated
    i = arena.allocate()
    arena.free(i)
    with pytest.raises(PageError):
        arena.free(i)                       # double free
    with pytest.raises(PageError):
        arena.view(i)                       # view of a free page
    with pytest.raises(PageError):
        arena.pin(i)
    with pytest.raises(IndexError):
        arena.view(4)
    with pytest.raises(IndexError):
        arena.free(-1)
    with pytest.raises(TypeError):
        arena.free("0")
    with pytest.raises(TypeError):
        arena.view(1.0)


def test_discard_zeroes(arena):
    i = arena.allocate()
    mv = arena.view(i)
    mv[:4] = b"data"
    with pytest.raises(PagePinnedError):
        arena.discard(i)
    mv.release()
    arena.discard(i)
    mv = arena.view(i)
    assert bytes(mv[:4]) == b"\0\0\0\0"
    mv.release()


def test_closed_arena(impl):
    a = impl.PageArena(PS, 2)
    i = a.allocate()
    a.close()
    a.close()                               # idempotent
    assert a.closed
    for op in (a.allocate, lambda: a.view(i), lambda: a.free(i), lambda: a.fd):
        with pytest.raises(PageError):
            op()


def test_context_manager(impl):
    with impl.PageArena(PS, 2) as a:
        a.view(a.allocate())[:1] = b"x"
    assert a.closed


@pytest.mark.parametrize("args, exc", [
    ((0, 4), ValueError), ((-4096, 4), ValueError), ((1000, 4), ValueError),
    ((PS, 0), ValueError), ((PS, -1), ValueError), (("4096", 4), TypeError),
    ((PS, 2.0), TypeError), ((PS, 2**32), ValueError),
])
def test_bad_construction(impl, args, exc):
    with pytest.raises(exc):
        impl.PageArena(*args)


def test_large_pages(impl):
    with impl.PageArena(8 << 20, 3) as a:
        i = a.allocate()
        mv = a.view(i)
        arr = np.frombuffer(mv, dtype=np.uint64)
        arr[:] = np.arange(arr.size, dtype=np.uint64)
        assert int(arr[-1]) == arr.size - 1
        del arr
        mv.release()
