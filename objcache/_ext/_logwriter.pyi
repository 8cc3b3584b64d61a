"""Type stub for objcache._ext._logwriter (and its twin, logwriter_py).

Contract: docs/logwriter.md.
"""
import asyncio
import os
from typing_extensions import Buffer  # collections.abc.Buffer from 3.12
from types import TracebackType
from typing import Literal

IOV_MAX: int
#: Bytes one batch can hold (compiled module only); a larger single record
#: is refused with ValueError.
MAX_BATCH_BYTES: int

def debug_counters() -> dict[str, int] | None:
    """{"log_appends": n, "log_writers": n} in a debug build, else None."""

class LogWriter:
    def __init__(
        self,
        path: str | bytes | os.PathLike[str] | os.PathLike[bytes],
        *,
        backend: Literal["io_uring", "pwritev"] | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None: ...
    @property
    def path(self) -> str | bytes: ...
    @property
    def backend(self) -> Literal["io_uring", "pwritev"]: ...
    @property
    def offset(self) -> int:
        """End of the acknowledged (durable) data; where the next batch goes."""
    @property
    def closed(self) -> bool: ...
    @property
    def stats(self) -> dict[str, int]:
        """{"batches": n, "appends": n, "syncs": n}."""
    def append(self, data: Buffer) -> asyncio.Future[int]:
        """Queue `data` now; the future resolves to its file offset once it
        is durable. Not a coroutine: the record's place is fixed by the call.
        Raises LogWriterClosed / TypeError / ValueError / RuntimeError
        immediately."""
    async def flush(self) -> None: ...
    async def close(self) -> None: ...
    async def __aenter__(self) -> LogWriter: ...
    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...
