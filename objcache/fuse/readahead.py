"""The kernel's readahead window for a FUSE mount.

FUSE sends buffered reads in requests no larger than the mount's
readahead window, 128 KiB by default (``/sys/class/bdi/<dev>/read_ahead_kb``;
libfuse already lets a request carry up to 256 pages, 1 MiB). The init
reply can only lower the window, so a mount raises it after mounting
through sysfs, which needs root, and only once the kernel has the init
reply (which would lower it again): ``after_init``, called from the
filesystem's ``init()``. Measured on the 2-core VM with a minimal
pyfuse3 filesystem serving from memory: 0.95 GB/s at 128 KiB, 1.6 GB/s at
1 MiB (docs/fuse.md has the objcache figures).
"""
from __future__ import annotations

import asyncio
import logging
import os
import re

log = logging.getLogger(__name__)

DEFAULT_READAHEAD_KIB = 1024


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash as octal escapes."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mount_device(mountpoint: str) -> str | None:
    """``major:minor`` of the filesystem mounted on ``mountpoint``, read
    from /proc/self/mountinfo (never stats the mount: its own process may
    be the one that has to answer)."""
    target = os.path.abspath(mountpoint)   # realpath would stat the mount
    found = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if _unescape(fields[4]) == target:
                found = fields[2]                    # the last mount on top wins
    return found


def set_readahead(mountpoint: str, kib: int) -> bool:
    """Set the mount's readahead window to ``kib`` KiB; False (logged)
    where the kernel or permissions do not allow it."""
    dev = mount_device(mountpoint)
    if dev is None:
        log.warning("readahead: %s is not a mount point", mountpoint)
        return False
    path = f"/sys/class/bdi/{dev}/read_ahead_kb"
    try:
        with open(path, "w") as f:
            f.write(str(int(kib)))
    except OSError as exc:
        log.info("readahead stays at the kernel default: %s: %s", path, exc.strerror)
        return False
    return True


def after_init(mountpoint: str, kib: int) -> None:
    """From ``Operations.init()`` (called while libfuse builds the init
    reply): set the window on the next loop turn, after the reply is written
    and the kernel has applied it."""
    asyncio.get_running_loop().call_soon(set_readahead, mountpoint, kib)
