"""Eviction policies for the chunk cache: pure bookkeeping, no I/O, no clock.

A policy tracks the *resident* keys of one tier and picks victims. It never
frees anything itself: the tier asks ``evict()`` for a key, removes that key's
data, and tells the policy nothing more (``evict`` already forgot the key).

Interface (shared by ``S3FIFO`` and ``LRU``; the cache only uses these):

``insert(key, weight=1, now=0.0)``
    ``key`` became resident (after a miss). Must not be resident already.
``access(key, now=0.0) -> bool``
    A hit on a resident key; False (and nothing changes) if it is not resident.
``remove(key) -> bool``
    ``key`` left the tier for a reason other than eviction (superseded by a
    new version, discarded, became dirty). It is not remembered as a ghost.
``evict(can_evict=None) -> key | None``
    Choose a victim among resident keys with ``can_evict(key)`` true, forget
    it and return it; None when no resident key may be evicted. Keys that
    may not be evicted now (pinned pages, chunks being demoted) keep their
    counters and move to the back of their queue, as if just reinserted:
    they are in use, and rotating them keeps ``evict`` amortized O(1) when
    many keys are pinned.
``len(policy)``, ``key in policy``, ``policy.weight`` (sum of resident weights).

``now`` is a timestamp in seconds chosen by the caller (the cache passes its
event loop's monotonic clock; tests pass whatever they like). Only the
correlation window below uses it.

Why S3-FIFO (docs/cache.md has the measurements)
------------------------------------------------
S3-FIFO (Yang et al., "FIFO queues are all you need for cache eviction",
SOSP 2023): a small probationary FIFO ``S`` (~10% of the weight) in front of
a main FIFO ``M``, plus a ghost FIFO ``G`` of recently evicted keys (keys
only). New keys enter ``S``; when ``S`` is over its share, its oldest entry
moves to ``M`` if it was hit while in ``S``, else it is evicted (into ``G``).
A key found in ``G`` on insert goes straight to ``M``. ``M`` is a CLOCK-like
FIFO: its oldest entry is reinserted with ``freq - 1`` while ``freq > 0``,
else evicted. A hit costs one counter increment (no list surgery, unlike
LRU). The property the cache needs: a one-pass scan (a model read once)
flows through ``S`` and out, never touching ``M``, so the hot set survives.

Correlated references. The file system reads an 8 MiB chunk in many small
pieces (FUSE hands out 128 KiB reads), each a cache hit on the same chunk
within milliseconds. Counted naively, every chunk of a one-pass scan would
look "hit many times" and be promoted into ``M``, defeating the point. As in
LRU-K's *correlated reference period* (O'Neil et al., SIGMOD 1993), a hit
within ``correlation_window`` seconds of the entry's last counted access (or
its insertion) does not count as a new access. The window is 0 by default
(pure S3-FIFO); the cache sets it (ChunkCache ``correlation_window``).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Hashable, Iterable

__all__ = ["S3FIFO", "LRU", "make_policy", "simulate"]

Key = Hashable


class _Entry:
    __slots__ = ("weight", "freq", "last", "small")

    def __init__(self, weight: int, now: float, small: bool):
        self.weight = weight
        self.freq = 0          # counted accesses since insertion / last M pass
        self.last = now        # time of insertion or of the last counted access
        self.small = small     # in S (True) or M (False)


class S3FIFO:
    """S3-FIFO with weights, a ghost queue and a correlation window.

    ``small_ratio``: target share of the total resident weight held by ``S``.
    ``max_freq``: saturating access counter (2 bits in the paper: 3).
    ``promote_after``: hits in ``S`` needed to move to ``M`` instead of being
    evicted (1: "accessed again after insertion").
    ``ghost_factor``: ``G`` remembers up to this many times the number of
    resident keys (at least ``min_ghost``).
    ``correlation_window``: seconds; see the module docstring.

    Invariants: every resident key is in exactly one of ``S``/``M``; ``G``
    holds no resident key; ``weight == sum of resident weights``; all
    operations are O(1) except ``evict``, which is amortized O(1): every entry
    it passes over is rotated to the back of its queue (or has its counter
    decremented), and one call passes each unevictable entry at most once
    between two steps of progress.
    """

    def __init__(self, *, small_ratio: float = 0.1, max_freq: int = 3,
                 promote_after: int = 1, ghost_factor: float = 1.0,
                 min_ghost: int = 16, correlation_window: float = 0.0):
        if not 0.0 < small_ratio < 1.0:
            raise ValueError(f"small_ratio must be in (0, 1), got {small_ratio}")
        if max_freq < 1 or promote_after < 1 or promote_after > max_freq:
            raise ValueError("need 1 <= promote_after <= max_freq")
        if correlation_window < 0:
            raise ValueError("correlation_window must be >= 0")
        self.small_ratio = small_ratio
        self.max_freq = max_freq
        self.promote_after = promote_after
        self.ghost_factor = ghost_factor
        self.min_ghost = min_ghost
        self.correlation_window = correlation_window
        self._small: OrderedDict[Key, _Entry] = OrderedDict()   # oldest first
        self._main: OrderedDict[Key, _Entry] = OrderedDict()
        self._ghost: OrderedDict[Key, None] = OrderedDict()
        self._small_weight = 0
        self._main_weight = 0

    # -- queries -----------------------------------------------------------

    def __len__(self) -> int:
        return len(self._small) + len(self._main)

    def __contains__(self, key: Key) -> bool:
        return key in self._small or key in self._main

    @property
    def weight(self) -> int:
        return self._small_weight + self._main_weight

    def in_main(self, key: Key) -> bool:
        return key in self._main

    def in_ghost(self, key: Key) -> bool:
        return key in self._ghost

    def keys(self) -> list:
        """Resident keys, S then M, oldest first (for tests and debugging)."""
        return list(self._small) + list(self._main)

    # -- updates -----------------------------------------------------------

    def insert(self, key: Key, weight: int = 1, now: float = 0.0) -> None:
        if key in self:
            raise KeyError(f"{key!r} is already resident")
        if weight < 0:
            raise ValueError("weight must be >= 0")
        if key in self._ghost:                    # seen recently: straight to M
            del self._ghost[key]
            self._main[key] = _Entry(weight, now, small=False)
            self._main_weight += weight
        else:
            self._small[key] = _Entry(weight, now, small=True)
            self._small_weight += weight

    def access(self, key: Key, now: float = 0.0) -> bool:
        e = self._small.get(key) or self._main.get(key)
        if e is None:
            return False
        if now - e.last >= self.correlation_window:
            if e.freq < self.max_freq:
                e.freq += 1
            e.last = now
        return True

    def remove(self, key: Key) -> bool:
        e = self._small.pop(key, None)
        if e is not None:
            self._small_weight -= e.weight
            return True
        e = self._main.pop(key, None)
        if e is not None:
            self._main_weight -= e.weight
            return True
        return False

    def evict(self, can_evict: Callable[[Key], bool] | None = None) -> Key | None:
        small, main = self._small, self._main
        # Consecutive unevictable entries seen at the head of each queue
        # since the last progress; a queue is "blocked" once every entry in
        # it has been passed over without progress.
        s_skips = m_skips = 0
        while True:
            s_blocked = not small or s_skips >= len(small)
            m_blocked = not main or m_skips >= len(main)
            if s_blocked and m_blocked:
                return None
            use_small = not s_blocked and (
                m_blocked
                or self._small_weight > self.small_ratio * self.weight)
            if use_small:
                key, e = next(iter(small.items()))
                if can_evict is not None and not can_evict(key):
                    small.move_to_end(key)          # keep it in S, look further
                    s_skips += 1
                    continue
                del small[key]
                self._small_weight -= e.weight
                if e.freq >= self.promote_after:    # reused while on probation
                    e.freq = 0
                    e.small = False
                    main[key] = e
                    self._main_weight += e.weight
                    s_skips = 0
                    m_skips = 0
                    continue
                self._remember(key)
                return key
            key, e = next(iter(main.items()))
            if can_evict is not None and not can_evict(key):
                main.move_to_end(key)
                m_skips += 1
                continue
            if e.freq > 0:                          # second chance (CLOCK)
                e.freq -= 1
                main.move_to_end(key)
                m_skips = 0
                continue
            del main[key]
            self._main_weight -= e.weight
            return key

    def _remember(self, key: Key) -> None:
        ghost = self._ghost
        ghost[key] = None
        limit = max(self.min_ghost, int(self.ghost_factor * len(self)))
        while len(ghost) > limit:
            ghost.popitem(last=False)


class LRU:
    """Least recently used, same interface (the baseline S3-FIFO is measured
    against; also a fallback policy). ``correlation_window`` is accepted for
    interface parity and ignored: a hit always moves the key to the front."""

    def __init__(self, *, correlation_window: float = 0.0):
        self._d: OrderedDict[Key, int] = OrderedDict()   # least recent first
        self._weight = 0

    def __len__(self) -> int:
        return len(self._d)

    def __contains__(self, key: Key) -> bool:
        return key in self._d

    @property
    def weight(self) -> int:
        return self._weight

    def keys(self) -> list:
        return list(self._d)

    def insert(self, key: Key, weight: int = 1, now: float = 0.0) -> None:
        if key in self._d:
            raise KeyError(f"{key!r} is already resident")
        self._d[key] = weight
        self._weight += weight

    def access(self, key: Key, now: float = 0.0) -> bool:
        if key not in self._d:
            return False
        self._d.move_to_end(key)
        return True

    def remove(self, key: Key) -> bool:
        w = self._d.pop(key, None)
        if w is None:
            return False
        self._weight -= w
        return True

    def evict(self, can_evict: Callable[[Key], bool] | None = None) -> Key | None:
        for key in self._d:
            if can_evict is None or can_evict(key):
                self._weight -= self._d.pop(key)
                return key
        return None


def make_policy(name: str, **kwargs):
    """``"s3fifo"`` or ``"lru"``."""
    if name == "s3fifo":
        return S3FIFO(**kwargs)
    if name == "lru":
        return LRU(**{k: v for k, v in kwargs.items() if k == "correlation_window"})
    raise ValueError(f"unknown eviction policy {name!r} (s3fifo, lru)")


def simulate(policy, trace: Iterable, capacity: int, *,
             weights: Callable[[Key], int] | None = None,
             times: Iterable[float] | None = None) -> tuple[int, int]:
    """Replay ``trace`` (keys) through ``policy`` as a cache of ``capacity``
    weight units: a hit is ``access``, a miss is ``insert`` followed by
    evictions until the weight fits. Returns ``(hits, misses)``. Pure; used by
    the tests and for the numbers in docs/cache.md."""
    hits = misses = 0
    clock = iter(times) if times is not None else None
    for i, key in enumerate(trace):
        now = next(clock) if clock is not None else float(i)
        if policy.access(key, now):
            hits += 1
            continue
        misses += 1
        policy.insert(key, weights(key) if weights else 1, now)
        while policy.weight > capacity:
            if policy.evict() is None:
                break
    return hits, misses
