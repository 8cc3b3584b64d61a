"""Small durable-filesystem helpers shared by the storage modules."""
from __future__ import annotations

import os


def fsync_dir(path: str) -> None:
    """fsync a directory, making the names created or removed in it durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
