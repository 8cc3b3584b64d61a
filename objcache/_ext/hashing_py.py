"""CRC-32C and ring placement in pure Python: the twin of ``_hashing.pyx``.

Same API, same results, same exceptions; tested for parity. The CRC uses a
slicing-by-8 table; placement is a per-key loop over ``bisect`` — this module
is the readable reference, the compiled one is the fast one.
"""
from __future__ import annotations

import bisect

import numpy as np

_POLY = 0x82F63B78
_M64 = 0xFFFFFFFFFFFFFFFF


def _make_tables() -> list[list[int]]:
    t0 = []
    for n in range(256):
        crc = n
        for _ in range(8):
            crc = (crc >> 1) ^ _POLY if crc & 1 else crc >> 1
        t0.append(crc)
    tables = [t0]
    for k in range(1, 8):
        prev = tables[k - 1]
        tables.append([t0[prev[n] & 0xFF] ^ (prev[n] >> 8) for n in range(256)])
    return tables


_T = _make_tables()


def _buffer(data, name="data") -> memoryview:
    if isinstance(data, str):
        raise TypeError(f"crc32c() needs bytes-like {name}, not str")
    try:
        mv = memoryview(data)
    except TypeError:
        raise TypeError(f"a bytes-like object is required, not "
                        f"'{type(data).__name__}'") from None
    if not mv.c_contiguous:
        raise BufferError("crc32c() needs a C-contiguous buffer")
    return mv.cast("B") if mv.format != "B" or mv.ndim != 1 else mv


def crc32c(data, value=0):
    """CRC-32C of ``data`` continuing from ``value`` (see _hashing.crc32c)."""
    if not isinstance(value, int):
        raise TypeError(f"value must be an int, not {type(value).__name__}")
    if value < 0 or value > 0xFFFFFFFF:
        raise ValueError(f"value must be in [0, 2**32), got {value}")
    mv = _buffer(data)
    t0, t1, t2, t3, t4, t5, t6, t7 = _T
    crc = value ^ 0xFFFFFFFF
    n = len(mv)
    whole = n - n % 8
    words = mv[:whole].cast("Q") if whole else ()
    for w in words:
        w ^= crc
        crc = (t7[w & 0xFF] ^ t6[(w >> 8) & 0xFF] ^ t5[(w >> 16) & 0xFF]
               ^ t4[(w >> 24) & 0xFF] ^ t3[(w >> 32) & 0xFF]
               ^ t2[(w >> 40) & 0xFF] ^ t1[(w >> 48) & 0xFF] ^ t0[w >> 56])
    for b in mv[whole:]:
        crc = t0[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


crc32c_software = crc32c


def crc32c_backend():
    return "python"


def _mix64(x: int) -> int:
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & _M64
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & _M64
    x ^= x >> 31
    return x


def _hash64(a: int, b: int) -> int:
    return _mix64(_mix64((a + 0x9E3779B97F4A7C15) & _M64) ^ b)


def _u64(v, name: str) -> int:
    if not isinstance(v, (int, np.integer)) or isinstance(v, bool):
        raise TypeError(f"{name} must be an int, not {type(v).__name__}")
    v = int(v)
    if v < 0 or v > _M64:
        raise ValueError(f"{name} must be in [0, 2**64), got {v}")
    return v


def hash64(a, b):
    """The 64-bit ring hash of the key (a, b) (see _hashing.hash64)."""
    return _hash64(_u64(a, "a"), _u64(b, "b"))


def _as_u64_array(obj, name: str) -> np.ndarray:
    arr = np.asarray(obj)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array, got {arr.ndim}-D")
    if arr.dtype == np.uint64:
        return np.ascontiguousarray(arr)
    if arr.dtype.kind == "i":
        if arr.size and arr.min() < 0:
            raise ValueError(f"{name} has negative values")
        return np.ascontiguousarray(arr, dtype=np.uint64)
    if arr.dtype.kind == "u" or (arr.size == 0 and arr.dtype.kind == "f"):
        return np.ascontiguousarray(arr, dtype=np.uint64)
    raise TypeError(f"{name} must be an unsigned or signed integer array, "
                    f"not {arr.dtype}")


class RingTable:
    """A validated ring (see _hashing.RingTable)."""

    def __init__(self, points, owners):
        p = _as_u64_array(points, "points")
        if p.shape[0] == 0:
            raise ValueError("a ring needs at least one point")
        o = np.asarray(owners)
        if o.ndim != 1 or o.dtype.kind not in "iu":
            raise TypeError("owners must be a 1-D integer array")
        o = np.ascontiguousarray(o, dtype=np.int64)
        if o.shape[0] != p.shape[0]:
            raise ValueError(f"points has {p.shape[0]} entries but owners has "
                             f"{o.shape[0]}")
        if p.shape[0] > 1 and not bool(np.all(p[1:] > p[:-1])):
            raise ValueError("points must be strictly increasing")
        p.flags.writeable = False
        o.flags.writeable = False
        self.points = p
        self.owners = o
        self._points = [int(x) for x in p]
        self._owners = [int(x) for x in o]

    def _owner(self, h: int) -> int:
        i = bisect.bisect_left(self._points, h)
        return self._owners[0 if i == len(self._points) else i]

    def place(self, inodes, chunks):
        ino = _as_u64_array(inodes, "inodes")
        chk = _as_u64_array(chunks, "chunks")
        if ino.shape[0] != chk.shape[0]:
            raise ValueError(f"inodes has {ino.shape[0]} entries but chunks "
                             f"has {chk.shape[0]}")
        owner, h = self._owner, _hash64
        return np.array([owner(h(a, b)) for a, b in zip(ino.tolist(), chk.tolist())],
                        dtype=np.int64)

    def place_one(self, inode, chunk):
        return self._owner(_hash64(_u64(inode, "inode"), _u64(chunk, "chunk")))

    def __len__(self):
        return len(self._points)


def ring_place(points, owners, inodes, chunks):
    """Owners of the keys (inodes[i], chunks[i]) (see _hashing.ring_place)."""
    return RingTable(points, owners).place(inodes, chunks)


def debug_counters():
    return None
