"""Hot-path extensions, each with a pure-Python twin of the same API.

Which implementation is used is decided once, at import:

* ``OBJCACHE_NO_EXT=1``       use the pure-Python twins.
* ``OBJCACHE_REQUIRE_EXT=1``  a compiled module that fails to import is an
                              error (ImportError), never a silent fallback.
* otherwise                   compiled modules when importable, else the twins
                              (with one warning).

``IMPL`` is ``"c"`` or ``"python"``. ``load(impl)`` returns the namespace of
either implementation explicitly; parity tests use it to run one behaviour
against both in the same process.
"""
from __future__ import annotations

import importlib
import logging
import os
import types

__all__ = [
    "IMPL", "load", "live_objects",
    "crc32c", "crc32c_backend", "hash64", "ring_place", "RingTable",
    "PageArena", "PageError", "PagePinnedError", "ArenaFullError",
    "LogWriter", "LogWriterClosed",
]

_log = logging.getLogger(__name__)

# Module name of each piece: (compiled, twin).
_MODULES = {
    "hashing": ("objcache._ext._hashing", "objcache._ext.hashing_py"),
    "pages": ("objcache._ext._pages", "objcache._ext.pages_py"),
    "logwriter": ("objcache._ext._logwriter", "objcache._ext.logwriter_py"),
}

_EXPORTS = {
    "hashing": ("crc32c", "crc32c_backend", "hash64", "ring_place", "RingTable"),
    "pages": ("PageArena",),
    "logwriter": ("LogWriter",),
}


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip() not in ("", "0", "false", "no")


def load(impl: str) -> types.SimpleNamespace:
    """Import every piece of one implementation (``"c"`` or ``"python"``)."""
    if impl not in ("c", "python"):
        raise ValueError(f"impl must be 'c' or 'python', not {impl!r}")
    ns = types.SimpleNamespace(IMPL=impl)
    for piece, (compiled, twin) in _MODULES.items():
        mod = importlib.import_module(compiled if impl == "c" else twin)
        for name in _EXPORTS[piece]:
            setattr(ns, name, getattr(mod, name))
        setattr(ns, piece, mod)
    return ns


def _select() -> types.SimpleNamespace:
    if _truthy("OBJCACHE_NO_EXT"):
        if _truthy("OBJCACHE_REQUIRE_EXT"):
            raise ImportError(
                "OBJCACHE_NO_EXT and OBJCACHE_REQUIRE_EXT are both set")
        return load("python")
    try:
        return load("c")
    except ImportError as exc:
        if _truthy("OBJCACHE_REQUIRE_EXT"):
            raise ImportError(
                f"OBJCACHE_REQUIRE_EXT=1 but a compiled extension failed to "
                f"import: {exc}. Build them with `make build` (needs the system "
                f"packages from scripts/install-system-deps.sh).") from exc
        _log.warning("compiled extensions unavailable (%s); using the "
                     "pure-Python twins", exc)
        return load("python")


_impl = _select()
IMPL: str = _impl.IMPL

from .errors import ArenaFullError, LogWriterClosed, PageError, PagePinnedError  # noqa: E402

crc32c = _impl.crc32c
hash64 = _impl.hash64
ring_place = _impl.ring_place
RingTable = _impl.RingTable
crc32c_backend = _impl.crc32c_backend
PageArena = _impl.PageArena
LogWriter = _impl.LogWriter


def live_objects() -> dict[str, int] | None:
    """Live-object counters of a debug build (``make debug``), else None.

    Keys: ``page_views`` (exported page buffers), ``arenas`` (open arenas),
    ``log_appends`` (appends not yet resolved), ``log_writers`` (open log
    writers). Tests assert they all return to zero.
    """
    if IMPL != "c":
        return None
    totals: dict[str, int] = {}
    for piece in _MODULES:
        counts = getattr(_impl, piece).debug_counters()
        if counts is None:
            return None
        for key, value in counts.items():
            totals[key] = totals.get(key, 0) + value
    return totals
