"""Bucket keys <-> file names, and what happens to keys that can't be names.

A directory with bucket prefix ``P`` (``""`` for the root, else ending in
``/``) lists ``P`` with delimiter ``/``:

* an object ``P + n`` is the file ``n``;
* an object ``P + n + "/"`` (a marker) or a common prefix ``P + n + "/"`` is
  the directory ``n``; the directory's own marker ``P`` is not an entry.

A key part ``n`` is shown as a name only if it is a valid POSIX file name
objcache can also write back unchanged: non-empty, not ``.`` or ``..``, no
NUL, at most 255 bytes in UTF-8. Everything else — ``a//b`` (an empty
part), ``./x``, ``../x``, over-long names — is **hidden**, with one warning
per directory listing naming how many keys were hidden and one example.
Hidden keys are never touched: objcache does not delete, rename or
overwrite them, and they can't escape the mount (no name resolves to
them). When a file ``n`` and a directory ``n/`` both exist, the directory
is shown and the file hidden (same warning). Keys are UTF-8 by the S3 API;
a name coming from the kernel that is not valid UTF-8 is refused with
EINVAL, since it could not be written back as the same key.
"""
from __future__ import annotations

import errno
import logging

from .model import Kind

log = logging.getLogger(__name__)

NAME_MAX = 255

# Where write-back parks an object that two renamed files both wait for
# (engine/writeback.py). A key starting with "/" is an empty first
# segment: never a name, so never shown or reachable; at the root listing
# it is skipped without a warning.
PARKING = "/.objcache-parked/"
# Where chunk owners spill dirty chunks of files larger than their cache
# (engine/spill.py): one object per chunk version, hidden the same way.
SPILL = "/.objcache-spill/"
HIDDEN = (PARKING, SPILL)


def name_problem(part: str) -> str | None:
    """Why ``part`` (a key segment) can't be a file name, or None."""
    if part == "":
        return "empty path segment"
    if part in (".", ".."):
        return f"{part!r} segment"
    if "\0" in part:
        return "NUL byte"
    if len(part.encode("utf-8", "surrogateescape")) > NAME_MAX:
        return "name longer than 255 bytes"
    return None


def check_new_name(name: bytes) -> str:
    """A name the kernel gave us for a new entry, as the key segment; raises
    OSError(EINVAL/ENAMETOOLONG) if it can't be one."""
    if len(name) > NAME_MAX:
        raise OSError(errno.ENAMETOOLONG, "file name longer than 255 bytes")
    if name in (b"", b".", b"..") or b"/" in name or b"\0" in name:
        raise OSError(errno.EINVAL, f"invalid file name {name!r}")
    try:
        return name.decode("utf-8")
    except UnicodeDecodeError:
        raise OSError(errno.EINVAL, f"file name {name!r} is not UTF-8; S3 keys "
                                    f"are UTF-8") from None


def entries_from_page(prefix: str, page, hidden: list[str]) -> list[list]:
    """Turn one ListPage of ``prefix`` into ``[name, kind, info]`` rows
    (``info`` = [size, etag, mtime] for files). Keys that can't be names
    are appended to ``hidden``."""
    rows: dict[bytes, list] = {}
    for cp in page.common_prefixes:
        if prefix == "" and cp == "/":
            continue                            # the parking area
        part = cp[len(prefix):-1]
        why = name_problem(part)
        if why:
            hidden.append(f"{cp!r} ({why})")
            continue
        rows[part.encode()] = [part.encode(), int(Kind.DIR), None]
    for obj in page.objects:
        rest = obj.key[len(prefix):]
        if rest == "":
            continue                            # the directory's own marker
        if rest.endswith("/"):
            part = rest[:-1]
            why = name_problem(part) or ("/" in part and "nested marker")
            if why:
                hidden.append(f"{obj.key!r} ({why})")
                continue
            rows[part.encode()] = [part.encode(), int(Kind.DIR), None]
            continue
        why = name_problem(rest)
        if why:
            hidden.append(f"{obj.key!r} ({why})")
            continue
        name = rest.encode()
        if name in rows and rows[name][1] == Kind.DIR:
            hidden.append(f"{obj.key!r} (a directory of the same name exists)")
            continue
        rows[name] = [name, int(Kind.FILE), [obj.size, obj.etag, obj.mtime]]
    return list(rows.values())


def warn_hidden(prefix: str, hidden: list[str]) -> None:
    if hidden:
        log.warning("listing %r: %d key(s) can't be shown as files and are hidden, "
                    "e.g. %s (see docs/namespace.md)", prefix or "/", len(hidden), hidden[0])
