"""The handler side of a call: what a handler receives and may return.

A handler is ``async def handler(ctx, fields, payload)`` (a plain function
works too) registered under a method name in ``RpcServer(handlers=...)``:

* ``ctx``: a CallContext (peer address, method, request id; ``cancelled``
  turns true when the caller cancelled or the connection dropped; the
  handler's task is then cancelled too);
* ``fields``: the request's msgpack map (a dict with str keys);
* ``payload``: None or a memoryview over a buffer the handler now owns
  (keep it, slice it, hand it on; nobody else references it).

It returns ``None``, a fields dict, or ``(fields, payload)`` with payload a
bytes-like object (bytes, bytearray, memoryview, numpy array) that is
written to the socket as it is: do not modify it after returning. Raising
``HandlerError(code, message, details)``/``BadRequest`` answers with that
error code; any other exception answers ``handler_error`` with the
exception's type and message. The same handlers serve notifications; their
result is ignored and their exceptions are only logged.

``@expects(name=type, ...)`` declares the fields a handler needs; requests
whose fields don't match get a ``bad_request`` error response without the
handler running.
"""
from __future__ import annotations

from typing import Any, Awaitable, Callable, Union

Payload = Union[bytes, bytearray, memoryview]
Result = Union[None, dict, "tuple[dict | None, Payload | None]"]
Handler = Callable[["CallContext", dict, "memoryview | None"],
                   Union[Awaitable[Result], Result]]


class CallContext:
    """Per-call information handed to a handler."""

    __slots__ = ("peer", "method", "request_id", "_cancelled")

    def __init__(self, peer: str, method: str, request_id: int | None):
        self.peer = peer                  # "host:port" of the caller
        self.method = method
        self.request_id = request_id      # None for a notification
        self._cancelled = False

    @property
    def cancelled(self) -> bool:
        """True once the caller cancelled (or timed out) or the connection
        closed; the handler's task is being cancelled."""
        return self._cancelled

    @property
    def oneway(self) -> bool:
        return self.request_id is None

    def __repr__(self):
        return (f"CallContext({self.method!r} #{self.request_id} from "
                f"{self.peer})")


_FieldSpec = Union[type, "tuple[type | None, ...]"]


def expects(**spec: _FieldSpec):
    """Declare a handler's fields: ``@expects(inode=int, name=str,
    hint=(int, None))``. Each value is a type or a tuple of types; ``None``
    in a tuple makes the field optional (absent or nil). ``int`` does not
    accept bool; ``float`` accepts int. Extra fields are allowed (newer
    callers may send more)."""
    for name, want in spec.items():
        types = want if isinstance(want, tuple) else (want,)
        if not types or not all(t is None or isinstance(t, type)
                                for t in types):
            raise TypeError(f"expects({name}=...): give a type or a tuple "
                            f"of types/None, not {want!r}")

    def mark(fn):
        fn.__rpc_fields__ = spec
        return fn
    return mark


def _type_ok(value: Any, types: tuple) -> bool:
    for t in types:
        if t is None:
            if value is None:
                return True
        elif t is int:
            if type(value) is int:      # not bool
                return True
        elif t is float:
            if type(value) in (float, int):
                return True
        elif isinstance(value, t):
            return True
    return False


def _type_names(types: tuple) -> str:
    return " or ".join("nil" if t is None else t.__name__ for t in types)


def check_fields(handler: Handler, fields: Any) -> str | None:
    """Why ``fields`` are unacceptable for ``handler``, or None if fine."""
    if type(fields) is not dict:
        return f"fields must be a map, not {type(fields).__name__}"
    for key in fields:
        if type(key) is not str:
            return f"field names must be strings, not {type(key).__name__}"
    spec = getattr(handler, "__rpc_fields__", None)
    if spec:
        for name, want in spec.items():
            types = want if isinstance(want, tuple) else (want,)
            if name not in fields:
                if None in types:
                    continue
                return f"missing field {name!r}"
            value = fields[name]
            if not _type_ok(value, types):
                return (f"field {name!r}: expected {_type_names(types)}, got "
                        f"{type(value).__name__}")
    return None


def normalize_result(result: Any) -> tuple[dict, Any]:
    """A handler's return value as (fields, payload or None). TypeError if
    it is not None, a dict or a (dict|None, bytes-like|None) pair."""
    if result is None:
        return {}, None
    if type(result) is dict:
        return result, None
    if type(result) is tuple and len(result) == 2:
        fields, payload = result
        if fields is None:
            fields = {}
        if type(fields) is dict:
            return fields, payload
    raise TypeError(f"handler returned {type(result).__name__}; expected "
                    f"None, a dict, or (dict, payload)")
