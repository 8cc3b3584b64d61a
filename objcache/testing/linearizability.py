"""Linearizability checking for histories of read/write registers.

A history is a list of operations on independent registers (keys), each
``Op(kind, key, value, invoke, ret)`` with unique, totally ordered timestamps.
Every write writes a value no other write writes (tests use op ids), which
makes checking polynomial: a read's value names the write it observed.

Two checkers, cross-checked by tests/raft/test_linearizability.py:

* ``zones_ok`` — the zone characterization of Gibbons & Korach / Golab, Li
  & Shah: group each value's write with the reads that saw it (a cluster);
  a cluster whose earliest response precedes its latest invocation has a
  forward zone [min ret, max inv], otherwise a backward zone [max inv,
  min ret]. The history is linearizable iff no read returns before its
  write was invoked, no two forward zones overlap, and no backward zone lies
  inside another cluster's forward zone. O(n^2) here, fine for simulator
  histories.
* ``wgl_ok`` — Wing & Gong's search with Lowe's memoisation, exponential in
  the worst case; the reference for small histories.

Unanswered writes (the client gave up) may have taken effect at any time
after their invocation, or never. ``normalize`` reduces them first: one
whose value no read saw is dropped (taking effect could only constrain the
reads more); one whose value was read took effect before the earliest such
read returned, which becomes its response time.
"""
from __future__ import annotations

from dataclasses import dataclass

INF = float("inf")
INITIAL = object()          # cluster key of the register's initial value


@dataclass
class Op:
    kind: str               # "put" | "get"
    key: object
    value: object           # put: value written; get: value read (None = initial)
    invoke: float
    ret: float = INF        # INF: no response


def normalize(ops: list[Op]) -> list[Op]:
    """Drop unanswered reads and unobserved unanswered writes; give observed
    unanswered writes the response time of their earliest read."""
    first_read: dict[object, float] = {}
    for o in ops:
        if o.kind == "get" and o.ret != INF:
            first_read[o.value] = min(first_read.get(o.value, INF), o.ret)
    out = []
    for o in ops:
        if o.ret != INF:
            out.append(o)
        elif o.kind == "put" and o.value in first_read:
            out.append(Op("put", o.key, o.value, o.invoke, first_read[o.value]))
    return out


def check(ops: list[Op]) -> list[object]:
    """Keys whose history is not linearizable (empty: all good)."""
    by_key: dict[object, list[Op]] = {}
    for o in normalize(ops):
        by_key.setdefault(o.key, []).append(o)
    return [k for k, kops in by_key.items() if not zones_ok(kops)]


def zones_ok(ops: list[Op]) -> bool:
    """One register's normalized history (see the module docstring)."""
    writes: dict[object, Op] = {}
    for o in ops:
        if o.kind == "put":
            if o.value in writes or o.value is None:
                raise ValueError(f"write values must be unique and not None: {o.value!r}")
            writes[o.value] = o
    lo_hi: dict[object, list[float]] = {}      # cluster -> [min ret, max inv]
    for w in writes.values():
        lo_hi[w.value] = [w.ret, w.invoke]
    for r in ops:
        if r.kind != "get":
            continue
        if r.value is None:
            key = INITIAL
            z = lo_hi.setdefault(key, [-INF, -INF])   # the initial write at -inf
        else:
            w = writes.get(r.value)
            if w is None or r.ret < w.invoke:
                return False                    # read of a value never (yet) written
            key = r.value
            z = lo_hi[key]
        z[0] = min(z[0], r.ret)
        z[1] = max(z[1], r.invoke)
    forward, backward = [], []
    for min_ret, max_inv in lo_hi.values():
        if min_ret < max_inv:
            forward.append((min_ret, max_inv))
        else:
            backward.append((max_inv, min_ret))
    forward.sort()
    for (a_lo, a_hi), (b_lo, b_hi) in zip(forward, forward[1:]):
        if b_lo < a_hi:
            return False
    for lo, hi in backward:
        for f_lo, f_hi in forward:
            if f_lo < lo and hi < f_hi:
                return False
    return True


def wgl_ok(ops: list[Op]) -> bool:
    """Exhaustive search over one register's normalized history (small
    histories only)."""
    ops = sorted(ops, key=lambda o: o.invoke)
    n = len(ops)
    full = (1 << n) - 1
    seen: set = set()
    stack: list[tuple[int, object]] = [(0, None)]
    while stack:
        done, value = stack.pop()
        if done == full:
            return True
        if (done, value) in seen:
            continue
        seen.add((done, value))
        horizon = min(ops[i].ret for i in range(n) if not done >> i & 1)
        for i in range(n):
            if done >> i & 1:
                continue
            o = ops[i]
            if o.invoke > horizon:
                break
            if o.kind == "put":
                stack.append((done | 1 << i, o.value))
            elif o.value == value:
                stack.append((done | 1 << i, value))
    return False
