"""Byte formats of the Raft storage: log records and snapshot files.

Pure codecs, no file handling (that is ``storage.py``). The formats are
specified in docs/raft-storage.md; this module is their only implementation.

Log record (little-endian header)::

    [u32 length][u32 crc32c][u8 type][body]
     length = len(type byte + body)        (the bytes the CRC covers)
     crc32c = CRC-32C of (type byte + body)
     body   = msgpack

    ENTRY          [term, index, entry type, data (bin)]
    HARD_STATE     [term, vote, commit]
    SNAPSHOT_MARK  [index, term, voters | nil, learners | nil]

ENTRY bodies are written with a fixed-width msgpack encoding (uint64 term and
index, bin32 data), so the encoder can hand the entry's data buffer to the log
writer as its own iovec without copying it into the record. Any msgpack
decoder reads them; the decoder here accepts any valid msgpack encoding.

Snapshot file (little-endian)::

    magic "OCRSNAP\\0" | u32 version=1 | u64 index | u64 term
    | u32 n_voters | u32 n_learners | u64 id * (n_voters + n_learners)
    | u64 data length | u32 crc32c(every header byte before it + data) | data
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

import msgpack

from objcache._ext import crc32c

from .types import ConfState, Entry, EntryType, HardState, SnapshotMeta

# ---------------------------------------------------------------- log records

REC_ENTRY = 1
REC_HARD_STATE = 2
REC_SNAPSHOT_MARK = 3
RECORD_NAMES = {REC_ENTRY: "ENTRY", REC_HARD_STATE: "HARD_STATE",
                REC_SNAPSHOT_MARK: "SNAPSHOT_MARK"}

RECORD_HEADER = struct.Struct("<II")            # length, crc32c
HEADER_SIZE = RECORD_HEADER.size                # 8
MAX_PAYLOAD = 0xFFFFFFFF                        # the u32 length field

# type byte, fixarray(4), uint64 term, uint64 index, positive fixint entry
# type, bin32 length. msgpack is big-endian.
_ENTRY_HEAD = struct.Struct(">BBBQBQBBI")
ENTRY_OVERHEAD = HEADER_SIZE + _ENTRY_HEAD.size  # bytes of a record besides data
MAX_ENTRY_DATA = MAX_PAYLOAD - _ENTRY_HEAD.size

_packb = msgpack.Packer(use_bin_type=True).pack


@dataclass(frozen=True, slots=True)
class Mark:
    """A SNAPSHOT_MARK: the log is replaced up to ``index`` by the snapshot
    file at (index, term). Index 0 means "no snapshot"; its ``conf`` is then
    the bootstrap membership (None if it was never given)."""
    index: int
    term: int
    conf: ConfState | None


def _record(rtype: int, body: bytes) -> bytes:
    payload = bytes((rtype,)) + body
    return RECORD_HEADER.pack(len(payload), crc32c(payload)) + payload


def encode_entry(e: Entry) -> tuple[bytes, object]:
    """(head, data): the record is ``head + data``. ``head`` holds the record
    header and the body up to the data; the CRC already covers ``data``.
    The caller must not mutate ``data`` until it is written."""
    data = e.data
    n = len(data)
    head = _ENTRY_HEAD.pack(REC_ENTRY, 0x94, 0xCF, e.term, 0xCF, e.index,
                            int(e.type), 0xC6, n)
    crc = crc32c(data, crc32c(head)) if n else crc32c(head)
    return RECORD_HEADER.pack(len(head) + n, crc) + head, data


def encode_hard_state(hs: HardState) -> bytes:
    return _record(REC_HARD_STATE, _packb([hs.term, hs.vote, hs.commit]))


def _ids(ids) -> list[int]:
    return sorted(ids)


def encode_mark(mark: Mark) -> bytes:
    c = mark.conf
    body = [mark.index, mark.term,
            None if c is None else _ids(c.voters),
            None if c is None else _ids(c.learners)]
    return _record(REC_SNAPSHOT_MARK, _packb(body))


class BadRecord(Exception):
    """The bytes at an offset are not a valid record; ``args[0]`` says why."""


def _is_uint(x) -> bool:
    return type(x) is int and x >= 0


_ENTRY_TYPES = {int(t): t for t in EntryType}


def _conf(voters, learners) -> ConfState | None:
    if voters is None and learners is None:
        return None
    if not (isinstance(voters, list) and isinstance(learners, list)
            and all(_is_uint(i) for i in voters) and all(_is_uint(i) for i in learners)):
        raise BadRecord("malformed membership in SNAPSHOT_MARK")
    try:
        return ConfState(frozenset(voters), frozenset(learners))
    except ValueError as exc:
        raise BadRecord(f"invalid membership in SNAPSHOT_MARK: {exc}") from None


def decode_record(buf, off: int, end: int):
    """Decode the record at ``buf[off:]`` (``buf`` a bytes object, ``end`` its
    usable length). Returns (record type, value, offset after the record),
    value being an Entry, a HardState or a Mark. Raises BadRecord."""
    left = end - off
    if left < HEADER_SIZE:
        raise BadRecord(f"incomplete record header ({left} of {HEADER_SIZE} bytes)")
    length, crc = RECORD_HEADER.unpack_from(buf, off)
    if length == 0:
        raise BadRecord("zero record length")
    stop = off + HEADER_SIZE + length
    if stop > end:
        raise BadRecord(f"record of {length} bytes runs past the end of the "
                        f"file ({left - HEADER_SIZE} bytes left)")
    payload = memoryview(buf)[off + HEADER_SIZE:stop]
    if crc32c(payload) != crc:
        raise BadRecord("CRC mismatch")
    rtype = payload[0]
    if rtype == REC_ENTRY and length >= _ENTRY_HEAD.size:
        # Fast path: the fixed-width layout encode_entry writes.
        _, a, b, term, c, index, etype, d, n = _ENTRY_HEAD.unpack_from(buf, off + HEADER_SIZE)
        if (a, b, c, d) == (0x94, 0xCF, 0xCF, 0xC6) and n == length - _ENTRY_HEAD.size \
                and index > 0 and etype in _ENTRY_TYPES:
            return rtype, Entry(term, index, _ENTRY_TYPES[etype],
                                buf[off + HEADER_SIZE + _ENTRY_HEAD.size:stop]), stop
    try:
        body = msgpack.unpackb(payload[1:], raw=False, strict_map_key=True)
    except Exception as exc:  # noqa: BLE001 - any decode failure is "malformed"
        raise BadRecord(f"malformed {RECORD_NAMES.get(rtype, 'record')} body: "
                        f"{type(exc).__name__}: {exc}") from None
    if rtype == REC_ENTRY:
        if not (isinstance(body, list) and len(body) == 4 and _is_uint(body[0])
                and _is_uint(body[1]) and body[1] > 0 and _is_uint(body[2])
                and isinstance(body[3], bytes)):
            raise BadRecord("malformed ENTRY body")
        etype = _ENTRY_TYPES.get(body[2])
        if etype is None:
            raise BadRecord(f"unknown entry type {body[2]}")
        return rtype, Entry(body[0], body[1], etype, body[3]), stop
    if rtype == REC_HARD_STATE:
        if not (isinstance(body, list) and len(body) == 3 and all(_is_uint(x) for x in body)):
            raise BadRecord("malformed HARD_STATE body")
        return rtype, HardState(*body), stop
    if rtype == REC_SNAPSHOT_MARK:
        if not (isinstance(body, list) and len(body) == 4 and _is_uint(body[0])
                and _is_uint(body[1])):
            raise BadRecord("malformed SNAPSHOT_MARK body")
        return rtype, Mark(body[0], body[1], _conf(body[2], body[3])), stop
    raise BadRecord(f"unknown record type {rtype}")


class ScanBudgetExceeded(Exception):
    """find_valid_record gave up: too many plausible candidates to check."""


def _plausible(buf, p: int, length: int) -> bool:
    """Cheap checks of a candidate record whose payload starts at ``p``
    (before its CRC is computed)."""
    rtype = buf[p]
    if rtype == REC_ENTRY:          # the fixed layout encode_entry writes
        return (length >= _ENTRY_HEAD.size and buf[p + 2] == 0xCF
                and buf[p + 11] == 0xCF and buf[p + 21] == 0xC6
                and int.from_bytes(buf[p + 22:p + 26], "big") == length - _ENTRY_HEAD.size)
    if rtype == REC_HARD_STATE:
        return length <= 1 + 1 + 3 * 9
    return length <= 1 << 20        # SNAPSHOT_MARK


# Every record this module writes starts its payload with one of these
# (type byte, first msgpack byte): used to look for valid records after a bad
# one without trying a CRC at every offset.
_RECORD_STARTS = (bytes((REC_ENTRY, 0x94)), bytes((REC_HARD_STATE, 0x93)),
                  bytes((REC_SNAPSHOT_MARK, 0x94)))


def find_valid_record(buf, start: int, end: int, budget: int | None = None) -> int | None:
    """Offset of the first valid record (as written by this module) that
    begins at or after ``start`` (before ``end``), or None. Used to tell a
    torn tail (nothing valid after the first bad record) from damage in the
    middle of the log.

    Candidates are found by their first payload bytes and filtered by
    cheap checks; at most ``budget`` bytes (default: 4x the scanned range,
    at least 64 MiB) are CRC'ed before ScanBudgetExceeded is raised, so
    adversarial entry data cannot make recovery quadratic."""
    if budget is None:
        budget = max(64 << 20, 4 * (end - start))
    best = None
    for pat in _RECORD_STARTS:
        pos = start + HEADER_SIZE
        while True:
            p = buf.find(pat, pos, end)
            if p < 0 or (best is not None and p - HEADER_SIZE >= best):
                break
            pos = p + 1
            length = RECORD_HEADER.unpack_from(buf, p - HEADER_SIZE)[0]
            if not length or p + length > end or not _plausible(buf, p, length):
                continue
            budget -= length
            if budget < 0:
                raise ScanBudgetExceeded(
                    f"too many plausible records after offset {start} to check")
            try:
                decode_record(buf, p - HEADER_SIZE, end)
            except BadRecord:
                continue
            best = p - HEADER_SIZE
            break
    return best


# ---------------------------------------------------------------- snapshot files

SNAP_MAGIC = b"OCRSNAP\0"
SNAP_VERSION = 1
_SNAP_FIXED = struct.Struct("<8sIQQII")         # magic, version, index, term, nv, nl
_SNAP_TAIL = struct.Struct("<QI")               # data length, crc32c
MAX_CONF_IDS = 1 << 16                          # sanity bound when parsing


def snapshot_header(meta: SnapshotMeta, data_len: int, data) -> bytes:
    """The header of a snapshot file holding ``data`` (whose CRC it includes)."""
    voters, learners = _ids(meta.conf.voters), _ids(meta.conf.learners)
    head = _SNAP_FIXED.pack(SNAP_MAGIC, SNAP_VERSION, meta.index, meta.term,
                            len(voters), len(learners))
    head += struct.pack(f"<{len(voters) + len(learners)}Q", *voters, *learners)
    head += struct.pack("<Q", data_len)
    return head + struct.pack("<I", crc32c(data, crc32c(head)))


class BadSnapshot(Exception):
    """A snapshot file is damaged; ``args[0]`` says how."""


@dataclass(frozen=True, slots=True)
class SnapshotHeader:
    meta: SnapshotMeta
    data_offset: int
    data_len: int
    crc: int
    head_crc: int           # CRC-32C of the header bytes before the crc field


def read_snapshot_header(f) -> SnapshotHeader:
    """Parse the header at the start of the open binary file ``f``."""
    fixed = f.read(_SNAP_FIXED.size)
    if len(fixed) < _SNAP_FIXED.size:
        raise BadSnapshot("file shorter than a snapshot header")
    magic, version, index, term, nv, nl = _SNAP_FIXED.unpack(fixed)
    if magic != SNAP_MAGIC:
        raise BadSnapshot("bad magic")
    if version != SNAP_VERSION:
        raise BadSnapshot(f"unsupported version {version}")
    if nv + nl > MAX_CONF_IDS:
        raise BadSnapshot(f"implausible membership size {nv + nl}")
    ids_raw = f.read(8 * (nv + nl))
    tail = f.read(_SNAP_TAIL.size)
    if len(ids_raw) < 8 * (nv + nl) or len(tail) < _SNAP_TAIL.size:
        raise BadSnapshot("truncated header")
    ids = struct.unpack(f"<{nv + nl}Q", ids_raw)
    data_len, crc = _SNAP_TAIL.unpack(tail)
    try:
        conf = ConfState(frozenset(ids[:nv]), frozenset(ids[nv:]))
    except ValueError as exc:
        raise BadSnapshot(f"invalid membership: {exc}") from None
    head = fixed + ids_raw + tail[:8]
    return SnapshotHeader(SnapshotMeta(index, term, conf), len(head) + 4,
                          data_len, crc, crc32c(head))


def read_snapshot_file(path, *, load: bool) -> tuple[SnapshotMeta, bytes | None]:
    """Verify a whole snapshot file (header, length, CRC); return its meta and,
    with ``load``, its data. Raises BadSnapshot or OSError."""
    with open(path, "rb") as f:
        h = read_snapshot_header(f)
        size = f.seek(0, 2)
        if size != h.data_offset + h.data_len:
            raise BadSnapshot(f"file is {size} bytes, header says "
                              f"{h.data_offset + h.data_len}")
        f.seek(h.data_offset)
        crc = h.head_crc
        if load:
            data = f.read(h.data_len)
            crc = crc32c(data, crc)
        else:
            data = None
            buf = bytearray(1 << 20)
            while True:
                n = f.readinto(buf)
                if not n:
                    break
                crc = crc32c(memoryview(buf)[:n], crc)
        if crc != h.crc:
            raise BadSnapshot("CRC mismatch")
    return h.meta, data
