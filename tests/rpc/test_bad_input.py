"""Bad input from an authenticated peer: each case is rejected (error
response, connection kept) or closes that connection, with a log line; the
server keeps serving everyone else."""
import asyncio
import logging
import struct

import pytest

from objcache.rpc import expects, framing
from objcache.rpc.framing import MAGIC, REQUEST

from . import RawPeer, client_of, echo, frame_bytes, run, serving


@expects(n=int)
async def typed(ctx, fields, payload):
    return {"n": fields["n"] + 1}


async def boom(ctx, fields, payload):
    raise KeyError("chunk 9")


HANDLERS = {"echo": echo, "typed": typed, "boom": boom}


def _prefix(hlen, plen, magic=MAGIC):
    return struct.pack(">4sII", magic, hlen, plen)


CLOSING = {
    "bad_magic": b"\x00" * 12,
    "other_version": _prefix(5, 0, b"OCR\x07") + b"\x94\x00\x01\xa0\x80",
    "oversize_header": _prefix((1 << 20) + 1, 0),
    "oversize_payload": _prefix(5, (64 << 20) + 1),
    "undecodable_header": _prefix(2, 0) + b"\xc1\xc1",
    "header_not_array": _prefix(1, 0) + b"\x07",
    "unknown_kind": _prefix(5, 0) + b"\x94\x63\x01\xa0\x80",   # kind 99
    "response_from_client": frame_bytes(framing.RESPONSE, 1, "", {}),
    "hello_after_auth": frame_bytes(framing.HELLO, 0, "", {}),
    "random_garbage": bytes(range(256)) * 8,
}


@pytest.mark.parametrize("case", sorted(CLOSING))
def test_malformed_frames_close_the_connection(case, caplog):
    async def body():
        async with serving(HANDLERS) as server, \
                client_of(server) as bystander:
            await bystander.call("echo")
            peer = await RawPeer.connect(server.port)
            peer.send(CLOSING[case])
            assert await peer.closed_by_peer()
            r = await bystander.call("echo", {"still": "up"})
            assert r.fields == {"still": "up"} and bystander.connects == 1
    with caplog.at_level(logging.WARNING, logger="objcache.rpc"):
        run(body)
    assert "closing the connection with 127.0.0.1:" in caplog.text


def test_truncated_frame_then_disconnect_is_logged(caplog):
    async def body():
        async with serving(HANDLERS) as server:
            peer = await RawPeer.connect(server.port)
            (raw_conn,) = server._connections
            data = frame_bytes(REQUEST, 1, "echo", {}, b"x" * 1000)
            peer.send(data[:-10])
            await peer.close()
            await asyncio.wait_for(asyncio.shield(raw_conn.closed), 10)
            async with client_of(server) as c:
                await c.call("echo")
    with caplog.at_level(logging.WARNING, logger="objcache.rpc"):
        run(body)
    assert "in the middle of a frame" in caplog.text


def test_truncated_frame_stalls_nothing_else():
    """A peer that sends half a frame and waits holds only its own
    connection: other clients are served meanwhile."""
    async def body():
        async with serving(HANDLERS) as server:
            peer = await RawPeer.connect(server.port)
            peer.send(frame_bytes(REQUEST, 1, "echo", {}, b"x" * 100_000)[:5000])
            async with client_of(server) as c:
                for i in range(10):
                    assert (await c.call("echo", {"i": i})).fields == {"i": i}
            # The rest arrives: the frame completes and is answered.
            peer.send(frame_bytes(REQUEST, 1, "echo", {}, b"x" * 100_000)[5000:])
            f = await peer.read_frame()
            assert f.kind == framing.RESPONSE and f.payload.nbytes == 100_000
            await peer.close()
    run(body)


def test_rejections_keep_the_connection(caplog):
    """Unknown method, bad field types, fields that are not a map, a
    raising handler: error responses on the same connection, which then
    carries on."""
    async def body():
        async with serving(HANDLERS) as server:
            peer = await RawPeer.connect(server.port)
            peer.request(1, "nope", {})
            peer.request(2, "typed", {"n": "seven"})
            peer.request(3, "typed", {})
            peer.send(frame_bytes(REQUEST, 4, "typed", [1, 2]))
            peer.send(frame_bytes(REQUEST, 5, "typed", {1: 2}))
            peer.request(6, "boom", {})
            peer.request(7, "typed", {"n": 41})
            answers = {}
            for _ in range(7):
                f = await peer.read_frame()
                answers[f.id] = f
            await peer.close()
            return answers
    with caplog.at_level(logging.WARNING, logger="objcache.rpc"):
        answers = run(body)
    codes = {i: (f.name if f.kind == framing.ERROR else "ok")
             for i, f in answers.items()}
    assert codes == {1: "unknown_method", 2: "bad_request", 3: "bad_request",
                     4: "bad_request", 5: "bad_request", 6: "handler_error",
                     7: "ok"}
    assert answers[2].fields["message"] == "field 'n': expected int, got str"
    assert answers[6].fields["type"] == "KeyError"
    assert "chunk 9" in answers[6].fields["message"]
    assert answers[7].fields == {"n": 42}
    for what in ("unknown method 'nope'", "bad request 'typed'",
                 "handler 'boom'"):
        assert what in caplog.text


def test_duplicate_in_flight_request_id_closes(caplog):
    started = {}

    async def hang(ctx, fields, payload):
        started["ev"].set()
        await asyncio.Event().wait()

    async def body():
        started["ev"] = asyncio.Event()
        async with serving({"hang": hang}) as server:
            peer = await RawPeer.connect(server.port)
            peer.request(5, "hang", {})
            await asyncio.wait_for(started["ev"].wait(), 10)
            peer.request(5, "hang", {})
            assert await peer.closed_by_peer()
    with caplog.at_level(logging.WARNING, logger="objcache.rpc"):
        run(body)
    assert "request id 5 is already in flight" in caplog.text


def test_cancel_for_unknown_id_is_ignored():
    async def body():
        async with serving(HANDLERS) as server:
            peer = await RawPeer.connect(server.port)
            peer.send(frame_bytes(framing.CANCEL, 12345, "", {}))
            peer.request(1, "echo", {"a": 1})
            f = await peer.read_frame()
            assert f.id == 1 and f.fields == {"a": 1}
            await peer.close()
    run(body)


def test_garbage_answers_from_a_server_fail_only_the_client_connection():
    """The client side too: a malformed frame from the server closes the
    connection and the calls in flight fail with ConnectionLost."""
    from objcache.rpc import ConnectionLost, RpcClient
    from objcache.rpc.auth import ServerHandshake

    from . import SECRET

    async def evil(reader, writer):
        hs = ServerHandshake(SECRET)
        writer.write(frame_bytes(framing.HELLO, 0, "", hs.hello()))
        peer = RawPeer(reader, writer)
        auth = await peer.read_frame()
        writer.write(frame_bytes(framing.AUTH_OK, 0, "",
                                 hs.on_auth(auth.fields)))
        await peer.read_frame()             # the request
        writer.write(b"\xff" * 64)          # garbage instead of an answer
        await peer.closed_by_peer()
        writer.close()

    async def body():
        srv = await asyncio.start_server(evil, "127.0.0.1", 0)
        port = srv.sockets[0].getsockname()[1]
        client = RpcClient("127.0.0.1", port, SECRET)
        try:
            with pytest.raises(ConnectionLost, match="protocol error"):
                await client.call("echo", timeout=10)
        finally:
            await client.close()
            srv.close()
            await srv.wait_closed()
    run(body)
