"""Exceptions shared by the compiled extensions and their pure-Python twins.

Both implementations raise exactly these classes, so callers and parity tests
never need to know which one is loaded.
"""


class PageError(RuntimeError):
    """Misuse of a page arena: bad index, double free, unpin of an unpinned
    page, use of a closed arena."""


class PagePinnedError(PageError):
    """The page (or arena) is pinned by a live view or an explicit pin and
    cannot be freed, reused or closed."""


class ArenaFullError(PageError):
    """allocate() found no free page. Not misuse: the caller evicts and
    retries."""


class LogWriterClosed(RuntimeError):
    """An append was made to (or was pending on) a closed log writer."""
