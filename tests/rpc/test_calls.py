"""Calls end to end on loopback: round trips, payloads, concurrency,
timeouts, cancellation, error responses, notifications."""
import asyncio
import logging

import numpy as np
import pytest

from objcache.rpc import (BadRequest, CallContext, FrameError, HandlerError,
                          RemoteError, RpcClient, RpcServer, RpcTimeout,
                          Unavailable, expects)
from objcache.rpc.framing import payload_buffer

from . import SECRET, WAIT, client_of, echo, run, serving

LOOPS = ["uvloop", "asyncio"]


@pytest.mark.parametrize("loop", LOOPS)
def test_round_trip_fields_and_payload(loop):
    async def body():
        async with serving() as server, client_of(server) as client:
            r = await client.call("echo", {"n": 1, "s": "x", "b": b"\x00",
                                           "l": [1, {"k": None}]}, b"data")
            assert r.fields == {"n": 1, "s": "x", "b": b"\x00",
                                "l": [1, {"k": None}]}
            assert isinstance(r.payload, memoryview)
            assert bytes(r.payload) == b"data"
            r = await client.call("echo")
            assert r.fields == {} and r.payload is None
            fields, payload = await client.call("echo", {"z": 0})
            assert fields == {"z": 0} and payload is None
    run(body, loop=loop)


@pytest.mark.parametrize("loop", LOOPS)
def test_8mib_payload_both_directions(loop):
    size = 8 << 20
    data = np.random.default_rng(3).bytes(size)
    got = {}

    async def put(ctx, fields, payload):
        got["type"] = type(payload)
        got["data"] = payload
        return {"n": payload.nbytes}

    async def get(ctx, fields, payload):
        return {}, data

    async def body():
        async with serving({"put": put, "get": get}) as server, \
                client_of(server) as client:
            r = await client.call("put", {}, memoryview(data))
            assert r.fields == {"n": size}
            assert got["type"] is memoryview and bytes(got["data"]) == data
            r = await client.call("get")
            assert r.payload.nbytes == size and bytes(r.payload) == data
            # The received buffer is the caller's: writable and independent.
            r.payload[:4] = b"mine"
            assert bytes(r.payload[:4]) == b"mine" and data[:4] != b"mine"
    run(body, loop=loop)


def test_payload_objects_reach_the_transport_uncopied(monkeypatch):
    """The sender hands the caller's own buffer object to the transport
    (writelines of [prefix+header, payload]), never a concatenation."""
    from objcache.rpc import connection
    written = []
    orig = connection.Connection._write

    def spy(self, head, body):
        if not self._is_server and body is not None:
            written.append(body)
        return orig(self, head, body)
    monkeypatch.setattr(connection.Connection, "_write", spy)
    big = bytearray(1 << 20)
    view = memoryview(big)
    arr = np.zeros(1 << 18, dtype=np.float32)

    async def body():
        async with serving() as server, client_of(server) as client:
            await client.call("echo", {}, big)
            await client.call("echo", {}, view)
            await client.call("echo", {}, arr)
    run(body)
    assert written[0] is big and written[1] is view
    assert isinstance(written[2], memoryview) and written[2].obj is arr


class _FakeTransport:
    """Records what a connection hands to its transport."""
    __module__ = "uvloop.fake"       # counts as vectored, like uvloop's

    def __init__(self):
        self.calls = []

    def get_extra_info(self, name, default=None):
        return ("127.0.0.1", 1) if name == "peername" else default

    def set_write_buffer_limits(self, high, low):
        pass

    def is_closing(self):
        return False

    def write(self, data):
        self.calls.append(("write", data))

    def writelines(self, bufs):
        self.calls.append(("writelines", tuple(bufs)))


def test_large_payload_goes_out_as_writelines_of_head_and_payload():
    from objcache.rpc.connection import Connection, Limits, _OPEN

    async def body():
        conn = Connection("client", SECRET, Limits())
        t = _FakeTransport()
        conn.connection_made(t)
        conn._state = _OPEN                 # skip the handshake
        conn._cancel_handshake_timer()
        payload = bytes(1 << 20)
        await conn.notify("m", {}, payload, None)
        kind, (head, body) = t.calls[-1]
        assert kind == "writelines" and body is payload
        assert head[:4] == b"OCR\x01"
        # Small frames are corked until the end of the loop iteration, then
        # written together in one write.
        await conn.notify("m", {}, b"small", None)
        await conn.notify("m", {}, b"small2", None)
        assert t.calls[-1][0] == "writelines"
        await asyncio.sleep(0)
        kind, data = t.calls[-1]
        assert kind == "write" and data.count(b"OCR\x01") == 2
        assert data.endswith(b"small2")
    run(body)


def test_many_concurrent_calls_are_multiplexed():
    order = []

    async def slow_echo(ctx, fields, payload):
        # Answer in reverse arrival order: responses overtake each other.
        await asyncio.sleep(0.001 * (200 - fields["i"]) / 10)
        order.append(fields["i"])
        return fields, payload

    async def body():
        async with serving({"echo": slow_echo}) as server, \
                client_of(server) as client:
            results = await asyncio.gather(*(
                client.call("echo", {"i": i}, str(i).encode())
                for i in range(200)))
            for i, r in enumerate(results):
                assert r.fields == {"i": i} and bytes(r.payload) == \
                    str(i).encode()
            assert client.connects == 1          # one connection for all
    run(body)
    assert order != sorted(order)


def test_timeout_cancels_the_handler():
    started, cancelled = asyncio.Event(), []

    async def hang(ctx, fields, payload):
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.append(ctx.cancelled)
            done.set()
            raise

    async def body():
        nonlocal started, done
        started, done = asyncio.Event(), asyncio.Event()
        async with serving({"hang": hang, "echo": echo}) as server, \
                client_of(server) as client:
            with pytest.raises(RpcTimeout) as ei:
                await client.call("hang", timeout=0.2)
            assert isinstance(ei.value, TimeoutError)
            assert "hang" in str(ei.value)
            await asyncio.wait_for(done.wait(), WAIT)
            assert cancelled == [True]
            # The connection is still fine.
            assert (await client.call("echo", {"a": 1})).fields == {"a": 1}
    done = None
    run(body)


def test_caller_cancellation_reaches_the_handler():
    state = {}

    async def hang(ctx, fields, payload):
        state["ctx"] = ctx
        state["started"].set()
        try:
            await asyncio.Event().wait()
        finally:
            state["cancelled"].set()

    async def body():
        state["started"], state["cancelled"] = asyncio.Event(), asyncio.Event()
        async with serving({"hang": hang, "echo": echo}) as server, \
                client_of(server) as client:
            task = asyncio.ensure_future(client.call("hang", timeout=None))
            await asyncio.wait_for(state["started"].wait(), WAIT)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await asyncio.wait_for(state["cancelled"].wait(), WAIT)
            assert state["ctx"].cancelled
            assert client.connection.in_flight == 0
            assert (await client.call("echo")).fields == {}
    run(body)


def test_late_answer_to_a_timed_out_call_is_dropped():
    release = {}

    async def stubborn(ctx, fields, payload):
        # Ignores cancellation once, then answers anyway.
        try:
            await release["ev"].wait()
        except asyncio.CancelledError:
            pass
        return {"late": True}

    async def body():
        release["ev"] = asyncio.Event()
        async with serving({"stubborn": stubborn, "echo": echo}) as server, \
                client_of(server) as client:
            with pytest.raises(RpcTimeout):
                await client.call("stubborn", timeout=0.1)
            # The late RESPONSE for the retired id is ignored; later calls
            # get their own answers.
            for i in range(5):
                assert (await client.call("echo", {"i": i})).fields == {"i": i}
    run(body)


def test_unknown_method_is_an_error_response(caplog):
    async def body():
        async with serving() as server, client_of(server) as client:
            with pytest.raises(RemoteError) as ei:
                await client.call("nope", {})
            assert ei.value.code == "unknown_method"
            assert (await client.call("echo", {"ok": 1})).fields == {"ok": 1}
            assert client.connects == 1
    with caplog.at_level(logging.WARNING, logger="objcache.rpc"):
        run(body)
    assert "unknown method 'nope'" in caplog.text


def test_handler_exception_is_an_error_response_and_server_stays_up(caplog):
    async def boom(ctx, fields, payload):
        raise ValueError("no such chunk 7")

    async def body():
        async with serving({"boom": boom, "echo": echo}) as server, \
                client_of(server) as client:
            for _ in range(3):
                with pytest.raises(RemoteError) as ei:
                    await client.call("boom")
                e = ei.value
                assert (e.code, e.remote_type, e.message) == \
                    ("handler_error", "ValueError", "no such chunk 7")
            assert (await client.call("echo")).fields == {}
            assert client.connects == 1
    with caplog.at_level(logging.WARNING, logger="objcache.rpc"):
        run(body)
    assert "handler 'boom'" in caplog.text and "ValueError" in caplog.text


def test_handler_error_codes_and_details():
    async def not_owner(ctx, fields, payload):
        raise HandlerError("not_owner", "group 3 owns it", {"owner": 3})

    async def bad(ctx, fields, payload):
        raise BadRequest("index out of range")

    async def body():
        async with serving({"a": not_owner, "b": bad}) as server, \
                client_of(server) as client:
            with pytest.raises(RemoteError) as ei:
                await client.call("a")
            assert ei.value.code == "not_owner"
            assert ei.value.details == {"owner": 3}
            with pytest.raises(RemoteError) as ei:
                await client.call("b")
            assert ei.value.code == "bad_request"
    run(body)


def test_field_type_checks_answer_bad_request():
    calls = []

    @expects(inode=int, name=str, hint=(int, None))
    async def lookup(ctx, fields, payload):
        calls.append(fields)
        return {"ok": True}

    async def body():
        async with serving({"lookup": lookup}) as server, \
                client_of(server) as client:
            for fields, why in [({"inode": "7", "name": "a"}, "expected int"),
                                ({"inode": True, "name": "a"}, "expected int"),
                                ({"name": "a"}, "missing field 'inode'"),
                                ({"inode": 1, "name": "a", "hint": "x"},
                                 "expected int or nil")]:
                with pytest.raises(RemoteError) as ei:
                    await client.call("lookup", fields)
                assert ei.value.code == "bad_request"
                assert why in ei.value.message
            r = await client.call("lookup", {"inode": 1, "name": "a"})
            assert r.fields == {"ok": True}
            assert len(calls) == 1
    run(body)


def test_bad_handler_results_are_handler_errors():
    async def wrong(ctx, fields, payload):
        return 42

    async def unencodable(ctx, fields, payload):
        return {"x": object()}

    def sync_handler(ctx, fields, payload):        # plain functions work too
        return {"sync": True}

    async def body():
        async with serving({"wrong": wrong, "unenc": unencodable,
                            "sync": sync_handler}) as server, \
                client_of(server) as client:
            for m in ("wrong", "unenc"):
                with pytest.raises(RemoteError) as ei:
                    await client.call(m)
                assert ei.value.code == "handler_error"
                assert ei.value.remote_type == "TypeError"
            assert (await client.call("sync")).fields == {"sync": True}
    run(body)


def test_notifications_run_handlers_and_are_not_answered():
    got = []

    async def note(ctx, fields, payload):
        assert ctx.oneway and ctx.request_id is None
        got.append((fields["i"], bytes(payload)))
        if len(got) == 100:
            done.set()
        return {"ignored": True}

    async def boom(ctx, fields, payload):
        raise RuntimeError("logged, not answered")

    async def body():
        nonlocal done
        done = asyncio.Event()
        async with serving({"note": note, "boom": boom, "echo": echo}) \
                as server, client_of(server) as client:
            await client.notify("boom", {})
            await client.notify("nope", {})            # unknown: dropped
            for i in range(100):
                await client.notify("note", {"i": i}, b"p%d" % i)
            await asyncio.wait_for(done.wait(), WAIT)
            assert got == [(i, b"p%d" % i) for i in range(100)]
            assert (await client.call("echo")).fields == {}
    done = None
    run(body)


def test_send_side_limits_raise_before_sending():
    async def body():
        async with serving(max_payload=1000) as server, \
                client_of(server, max_payload=1000) as client:
            with pytest.raises(FrameError):
                await client.call("echo", {}, b"x" * 1001)
            with pytest.raises(TypeError):
                await client.call("echo", {"x": object()})
            with pytest.raises(TypeError):
                await client.call("echo", ["not", "a", "dict"])
            assert (await client.call("echo", {}, b"x" * 1000)).payload \
                .nbytes == 1000
    run(body)


def test_oversize_payload_from_peer_closes_only_that_connection():
    async def body():
        async with serving(max_payload=1000) as server, \
                client_of(server) as big, client_of(server) as small:
            from objcache.rpc import ConnectionLost
            with pytest.raises(ConnectionLost):
                await big.call("echo", {}, b"x" * 5000)
            assert (await small.call("echo", {}, b"y")).fields == {}
    run(body)


def test_closed_client_is_unavailable():
    async def body():
        async with serving() as server:
            client = RpcClient("127.0.0.1", server.port, SECRET)
            await client.call("echo")
            await client.close()
            with pytest.raises(Unavailable):
                await client.call("echo")
    run(body)


def test_context_fields():
    seen = []

    async def who(ctx: CallContext, fields, payload):
        seen.append((ctx.method, ctx.request_id, ctx.peer, ctx.cancelled))

    async def body():
        async with serving({"who": who}) as server, \
                client_of(server) as client:
            await client.call("who")
            await client.call("who")
    run(body)
    (m1, id1, peer, c), (_, id2, _, _) = seen
    assert m1 == "who" and id2 == id1 + 1 and peer.startswith("127.0.0.1:")
    assert not c


def test_server_rejects_bad_configuration():
    with pytest.raises(ValueError):
        RpcServer({}, b"")
    with pytest.raises(TypeError):
        RpcServer({"x": 3}, SECRET)
    with pytest.raises(ValueError):
        RpcClient("h", 1, b"")
    assert payload_buffer(b"")[1] == 0
