"""Frames: the byte layout of everything on an RPC connection (docs/rpc.md).

    offset  size  field
    0       4     magic        b"OCR" + protocol version byte (1)
    4       4     header_len   big-endian u32, 1 .. max_header (1 MiB)
    8       4     payload_len  big-endian u32, 0 .. max_payload (64 MiB default)
    12      H     header       msgpack array [kind, id, name, fields]
    12+H    P     payload      raw bytes, never msgpack-encoded

The header is small and structured; the payload (up to a whole 8 MiB chunk)
is opaque: the sender hands its buffer to the transport untouched and the
receiver reads it straight into one buffer allocated for that frame.

This module is sans-I/O: ``encode_head`` builds the bytes in front of a
payload, ``FrameDecoder`` turns received bytes into ``Frame`` objects and
plugs into ``asyncio.BufferedProtocol`` (``get_buffer``/``buffer_updated``).
"""
from __future__ import annotations

import struct

import msgpack
import numpy as np

from .errors import FrameError

MAGIC = b"OCR\x01"                  # "objcache RPC", version 1
PREFIX = struct.Struct(">4sII")     # magic, header_len, payload_len
PREFIX_LEN = PREFIX.size            # 12
MAX_HEADER = 1 << 20                # hard ceiling for header_len
DEFAULT_MAX_PAYLOAD = 64 << 20
PAYLOAD_LEN_CEILING = 0xFFFFFFFF    # what the u32 length can express
MAX_REQUEST_ID = (1 << 64) - 1

# Frame kinds (header[0]). Plain ints: compared on every frame.
REQUEST = 0     # [0, id, method, fields]      expects RESPONSE or ERROR
RESPONSE = 1    # [1, id, "", fields]
ERROR = 2       # [2, id, code, {"message", "type", "details"}]
NOTIFY = 3      # [3, 0, method, fields]       one-way, never answered
CANCEL = 4      # [4, id, "", {}]              client gave up on request id
HELLO = 5       # [5, 0, "", {"nonce"}]        handshake: server -> client
AUTH = 6        # [6, 0, "", {"nonce", "mac"}] handshake: client -> server
AUTH_OK = 7     # [7, 0, "", {"mac"}]          handshake: server -> client
KIND_NAMES = {REQUEST: "request", RESPONSE: "response", ERROR: "error",
              NOTIFY: "notify", CANCEL: "cancel", HELLO: "hello",
              AUTH: "auth", AUTH_OK: "auth_ok"}

_unpackb = msgpack.unpackb
_DIRECT_NUMPY_MIN = 256 << 10


def new_packer():
    """A header packer: ``new_packer()(obj) -> bytes``. About twice as fast
    as ``msgpack.packb`` (no Packer per call), but NOT thread-safe: keep one
    per connection (a connection lives on one event loop)."""
    return msgpack.Packer(use_bin_type=True).pack


def _alloc(size: int) -> memoryview:
    """A fresh writable buffer for one incoming payload. Large ones come from
    numpy.empty: no memset (bytearray zero-fills, ~40 us per MiB), the pages
    are first touched by the kernel's copy from the socket."""
    if size >= _DIRECT_NUMPY_MIN:
        return memoryview(np.empty(size, dtype=np.uint8))
    return memoryview(bytearray(size))


class Frame:
    """One received frame. ``payload`` is None or a memoryview over a buffer
    that belongs to this frame alone: the decoder never touches it again, so
    whoever receives the frame owns it (may keep it, slice it, write it)."""

    __slots__ = ("kind", "id", "name", "fields", "payload")

    def __init__(self, kind: int, id: int, name: str, fields,
                 payload: memoryview | None):
        self.kind = kind
        self.id = id
        self.name = name
        self.fields = fields        # whatever msgpack decoded; see Connection
        self.payload = payload

    def __repr__(self):
        plen = 0 if self.payload is None else self.payload.nbytes
        return (f"Frame({KIND_NAMES.get(self.kind, self.kind)} id={self.id} "
                f"{self.name!r} payload={plen}B)")


def encode_head(kind: int, rid: int, name: str, fields, payload_len: int = 0,
                max_header: int = MAX_HEADER, pack=msgpack.packb) -> bytes:
    """The prefix and header of a frame: the bytes that precede a payload.

    ``pack`` is a msgpack packing function (a connection passes its own
    ``new_packer()``). Raises FrameError if the header is over
    ``max_header``; TypeError (from msgpack) if ``fields`` holds something
    msgpack cannot encode."""
    header = pack([kind, rid, name, fields])
    if len(header) > max_header:
        raise FrameError(f"header of {len(header)} bytes exceeds the "
                         f"{max_header}-byte limit")
    return PREFIX.pack(MAGIC, len(header), payload_len) + header


def payload_buffer(payload) -> tuple[object, int]:
    """(object to hand to the transport, its length in bytes).

    bytes/bytearray and 1-D byte memoryviews are returned as they are, so the
    transport writes the caller's own buffer (no copy); any other
    C-contiguous buffer (numpy array, typed memoryview) is cast to a byte
    view of the same memory."""
    t = type(payload)
    if t is bytes or t is bytearray:
        return payload, len(payload)
    try:
        mv = payload if t is memoryview else memoryview(payload)
    except TypeError:
        raise TypeError(f"payload must be a bytes-like object, not "
                        f"{t.__name__}") from None
    if mv.format not in ("B", "b", "c") or mv.ndim != 1:
        if not mv.c_contiguous:
            raise FrameError("payload buffer must be C-contiguous")
        mv = mv.cast("B")
    elif not mv.contiguous:
        raise FrameError("payload buffer must be contiguous")
    return mv, mv.nbytes


class FrameDecoder:
    """Incremental frame parser with a receive buffer a BufferedProtocol
    reads into.

    Buffers and ownership:

    * a fixed scratch buffer (``scratch_size``) receives prefixes, headers
      and small payloads; many small frames arrive in one read. A payload
      that is complete in the scratch is copied out (one memcpy) into its
      own buffer, because the scratch is reused.
    * a payload NOT complete in the scratch (any large payload) gets a
      dedicated buffer of exactly ``payload_len`` bytes; the part already
      in the scratch is copied in, and ``get_buffer`` then returns the
      rest of that dedicated buffer, so the transport receives the payload
      straight into it. The same goes for a header larger than the scratch.
    * once a frame is returned by ``next_frame`` its payload buffer belongs
      to the caller.

    Memory: scratch + at most one partially received frame (bounded by
    ``max_header`` and ``max_payload``). The caller bounds how many complete
    frames it keeps (see Connection's read pausing).

    Errors: ``next_frame`` raises FrameError for bad magic/version, lengths
    over the limits and undecodable or malformed headers; the decoder is
    then unusable and the connection must be closed (the stream is no
    longer trusted to be in sync).
    """

    _PREFIX, _HEADER, _PAYLOAD = 0, 1, 2
    _MIN_FREE = 16 << 10        # compact the scratch below this much room

    def __init__(self, max_header: int = MAX_HEADER,
                 max_payload: int = DEFAULT_MAX_PAYLOAD,
                 scratch_size: int = 256 << 10):
        self.set_limits(max_header, max_payload)
        self._buf = bytearray(scratch_size)
        self._view = memoryview(self._buf)
        self._start = 0             # first unparsed byte in the scratch
        self._end = 0               # end of received bytes in the scratch
        self._stage = self._PREFIX
        self._hlen = 0
        self._plen = 0
        self._header = None         # decoded header, while its payload comes
        # The dedicated buffer being filled directly (an oversize header or a
        # payload), else None; ``_big_filled`` bytes of it are received.
        self._big: memoryview | None = None
        self._big_filled = 0

    def set_limits(self, max_header: int, max_payload: int) -> None:
        """Limits for frames whose prefix has not been parsed yet (a
        connection raises them once the peer has authenticated)."""
        if not 1 <= max_header <= MAX_HEADER:
            raise ValueError(f"max_header must be in 1..{MAX_HEADER}")
        if not 0 <= max_payload <= PAYLOAD_LEN_CEILING:
            raise ValueError(f"max_payload must be in 0..{PAYLOAD_LEN_CEILING}")
        self.max_header = max_header
        self.max_payload = max_payload

    # -- BufferedProtocol side ---------------------------------------------

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        """Where the next received bytes go (never empty)."""
        if self._big is not None:
            return self._big[self._big_filled:]
        if self._start == self._end:
            self._start = self._end = 0
        elif len(self._buf) - self._end < self._MIN_FREE:
            # Move the partial frame to the front. It is shorter than the
            # scratch (prefix, or a header that fits; bigger parts go to a
            # dedicated buffer), so this always frees room.
            n = self._end - self._start
            self._buf[:n] = self._buf[self._start:self._end]
            self._start, self._end = 0, n
        return self._view[self._end:]

    def buffer_updated(self, nbytes: int) -> None:
        if self._big is not None:
            self._big_filled += nbytes
        else:
            self._end += nbytes

    # -- parsing -------------------------------------------------------------

    def pending_bytes(self) -> int:
        """Bytes received that are not part of a returned frame yet (non-zero
        at connection close means the peer sent a truncated frame)."""
        n = self._end - self._start + self._big_filled
        if self._stage != self._PREFIX:
            n += PREFIX_LEN
            if self._stage == self._PAYLOAD:
                n += self._hlen
        return n

    def next_frame(self) -> Frame | None:
        """The next complete frame, or None until more bytes arrive."""
        if self._stage == self._PREFIX:
            if self._end - self._start < PREFIX_LEN:
                return None
            magic, hlen, plen = PREFIX.unpack_from(self._buf, self._start)
            if magic != MAGIC:
                if magic[:3] == MAGIC[:3]:
                    raise FrameError(f"unsupported protocol version "
                                     f"{magic[3]} (we speak {MAGIC[3]})")
                raise FrameError(f"bad magic {magic.hex()} (not an objcache "
                                 f"RPC peer, or the stream is out of sync)")
            if not 0 < hlen <= self.max_header:
                raise FrameError(f"header length {hlen} outside 1.."
                                 f"{self.max_header}")
            if plen > self.max_payload:
                raise FrameError(f"payload length {plen} exceeds the "
                                 f"{self.max_payload}-byte limit")
            self._start += PREFIX_LEN
            self._hlen, self._plen = hlen, plen
            self._stage = self._HEADER

        if self._stage == self._HEADER:
            hlen = self._hlen
            if self._big is None:
                avail = self._end - self._start
                if avail < hlen:
                    if hlen > len(self._buf):
                        self._go_direct(hlen, avail)
                    return None
                self._header = _check_header(
                    self._view[self._start:self._start + hlen])
                self._start += hlen
            else:
                if self._big_filled < hlen:
                    return None
                self._header = _check_header(self._big)
                self._drop_direct()
            self._stage = self._PAYLOAD

        # self._stage == self._PAYLOAD
        plen = self._plen
        if plen == 0:
            payload = None
        elif self._big is None:
            avail = self._end - self._start
            if avail < plen:
                self._go_direct(plen, avail)
                return None
            payload = memoryview(self._buf[self._start:self._start + plen])
            self._start += plen
        else:
            if self._big_filled < plen:
                return None
            payload = self._big             # ownership passes to the caller
            self._drop_direct()
        kind, rid, name, fields = self._header
        self._header = None
        self._stage = self._PREFIX
        return Frame(kind, rid, name, fields, payload)

    def _go_direct(self, size: int, avail: int) -> None:
        """Continue the current header/payload in a dedicated buffer."""
        big = _alloc(size)
        big[:avail] = self._view[self._start:self._end]
        self._big, self._big_filled = big, avail
        self._start = self._end = 0

    def _drop_direct(self) -> None:
        self._big = None
        self._big_filled = 0


def _check_header(data: memoryview):
    """Decode a header and check its shape: [kind, id, name, fields] with a
    known kind, an id in u64 range and a str name. ``fields`` is checked by
    the connection (a request with bad fields gets an error response, not a
    closed connection)."""
    try:
        h = _unpackb(data, raw=False, strict_map_key=False, use_list=True)
    except Exception as exc:    # msgpack raises many types (ValueError, ...)
        raise FrameError(f"undecodable header ({type(exc).__name__}: "
                         f"{exc})") from None
    if type(h) is not list or len(h) != 4:
        raise FrameError("header is not a 4-element array")
    kind, rid, name, _ = h
    if type(kind) is not int or kind not in KIND_NAMES:
        raise FrameError(f"unknown frame kind {kind!r:.40}")
    if type(rid) is not int or not 0 <= rid <= MAX_REQUEST_ID:
        raise FrameError(f"bad request id {rid!r:.40}")
    if type(name) is not str:
        raise FrameError(f"frame name is {type(name).__name__}, not str")
    return h
