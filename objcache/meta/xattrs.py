"""Extended attributes in S3 user metadata, in s3fs's format.

s3fs keeps a file's xattrs in ONE metadata entry, ``xattr``: the text
``{"name":"<base64 of the value>",...}``, percent-encoded. objcache writes
and reads the same, so xattrs set by either tool are seen by the other.

S3 allows 2 KiB of user metadata per object in all: a set of xattrs whose
encoding exceeds ``MAX_ENCODED`` is not written to the bucket (it stays in
the cluster's inode; one warning per upload). A name that the format cannot
carry (``"``, ``,`` or ``:`` in it, or not UTF-8) is left out the same way.
A malformed entry read from the bucket is ignored with a warning: the
file still opens.
"""
from __future__ import annotations

import base64
import binascii
import logging
from urllib.parse import quote, unquote

log = logging.getLogger(__name__)

METADATA_KEY = "xattr"
MAX_ENCODED = 1536          # of S3's 2 KiB user metadata; mode/uid/gid/mtime use < 100


def _representable(name: bytes) -> bool:
    try:
        text = name.decode()
    except UnicodeDecodeError:
        return False
    return not any(c in text for c in '",:')


def encode(xattrs: dict[bytes, bytes]) -> str | None:
    """The ``xattr`` metadata value for ``xattrs``; None when there is
    nothing to write or it does not fit (see the module docstring)."""
    kept = {n: v for n, v in sorted(xattrs.items()) if _representable(n)}
    if len(kept) < len(xattrs):
        log.warning("xattrs %s cannot be stored in S3 metadata (name format)",
                    sorted(set(xattrs) - set(kept)))
    if not kept:
        return None
    text = "{" + ",".join(f'"{n.decode()}":"{base64.b64encode(v).decode()}"'
                          for n, v in kept.items()) + "}"
    encoded = quote(text, safe="")
    if len(encoded) > MAX_ENCODED:
        log.warning("xattrs of %d bytes encoded exceed S3's metadata room: kept in "
                    "the cluster only", len(encoded))
        return None
    return encoded


def decode(value: str | None) -> dict[bytes, bytes]:
    """The xattrs an ``xattr`` metadata value carries ({} if none or malformed)."""
    if not value:
        return {}
    text = unquote(value).strip()
    out: dict[bytes, bytes] = {}
    try:
        if not (text.startswith("{") and text.endswith("}")):
            raise ValueError("not {...}")
        body = text[1:-1].strip()
        for pair in filter(None, (p.strip() for p in body.split(","))):
            name, sep, val = pair.partition(":")
            if not sep:
                raise ValueError(f"no ':' in {pair!r}")
            name, val = name.strip().strip('"'), val.strip().strip('"')
            out[name.encode()] = base64.b64decode(val, validate=True)
    except (ValueError, binascii.Error) as exc:
        log.warning("ignoring malformed xattr metadata %r: %s", value[:100], exc)
        return {}
    return out
