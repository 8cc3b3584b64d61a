"""The mutual HMAC handshake: sans-I/O and on live connections."""
import asyncio
import hashlib
import hmac
import logging

import pytest

from objcache.rpc import AuthenticationFailed, RpcClient, framing
from objcache.rpc.auth import NONCE_LEN, ClientHandshake, ServerHandshake

from . import SECRET, WAIT, RawPeer, client_of, frame_bytes, run, serving

OTHER = b"some-other-cluster-secret-xyz"


# -- sans-I/O -----------------------------------------------------------------

def test_handshake_succeeds_with_the_same_secret():
    s, c = ServerHandshake(SECRET), ClientHandshake(SECRET)
    ok = s.on_auth(c.on_hello(s.hello()))
    c.on_auth_ok(ok)
    assert s.done and c.done


def test_server_rejects_a_client_with_another_secret():
    s, c = ServerHandshake(SECRET), ClientHandshake(OTHER)
    with pytest.raises(AuthenticationFailed, match="client proof"):
        s.on_auth(c.on_hello(s.hello()))
    assert not s.done


def test_client_rejects_a_server_with_another_secret():
    """A server that skips verifying the client (an impostor) still can't
    produce a valid server proof without the secret."""
    impostor, c = ServerHandshake(OTHER), ClientHandshake(SECRET)
    auth = c.on_hello(impostor.hello())
    # The impostor does not check the client's proof; it answers with a
    # proof made the right way but from its own secret.
    reply = {"mac": hmac.new(OTHER, b"objcache-rpc/1 server\0" + auth["nonce"]
                             + impostor._nonce, hashlib.sha256).digest()}
    with pytest.raises(AuthenticationFailed, match="server proof"):
        c.on_auth_ok(reply)
    with pytest.raises(AuthenticationFailed, match="server proof"):
        c.on_auth_ok({"mac": b"\0" * 32})
    assert not c.done


def test_proofs_cannot_be_replayed_or_reflected():
    s1, c1 = ServerHandshake(SECRET), ClientHandshake(SECRET)
    auth1 = c1.on_hello(s1.hello())
    s1.on_auth(auth1)
    # Replaying an old AUTH to a new server (fresh nonce) fails.
    with pytest.raises(AuthenticationFailed):
        ServerHandshake(SECRET).on_auth(auth1)
    # A client echoing the server's nonce is refused outright.
    s2 = ServerHandshake(SECRET)
    with pytest.raises(AuthenticationFailed, match="echoed"):
        s2.on_auth({"nonce": s2._nonce, "mac": b"\0" * 32})


@pytest.mark.parametrize("fields", [
    None, [], {}, {"nonce": b"short", "mac": b"\0" * 32},
    {"nonce": "x" * NONCE_LEN, "mac": b"\0" * 32},
    {"nonce": b"n" * NONCE_LEN}, {"nonce": b"n" * NONCE_LEN, "mac": 5},
    {"nonce": b"n" * NONCE_LEN, "mac": b"\0" * 31},
])
def test_malformed_auth_fields(fields):
    with pytest.raises(AuthenticationFailed):
        ServerHandshake(SECRET).on_auth(fields)


@pytest.mark.parametrize("fields", [
    None, [], {}, {"nonce": b"short"}, {"nonce": "x" * NONCE_LEN}])
def test_malformed_hello_fields(fields):
    with pytest.raises(AuthenticationFailed):
        ClientHandshake(SECRET).on_hello(fields)


def test_out_of_order_handshake_frames():
    c = ClientHandshake(SECRET)
    with pytest.raises(AuthenticationFailed, match="before HELLO"):
        c.on_auth_ok({"mac": b"\0" * 32})
    c.on_hello(ServerHandshake(SECRET).hello())
    with pytest.raises(AuthenticationFailed, match="second HELLO"):
        c.on_hello(ServerHandshake(SECRET).hello())


def test_empty_secret_is_refused():
    with pytest.raises(ValueError):
        ServerHandshake(b"")
    with pytest.raises(ValueError):
        ClientHandshake("text")


# -- live ----------------------------------------------------------------------

def _no_secret_material(text):
    assert SECRET.decode() not in text and OTHER.decode() not in text
    assert "mac" not in text.lower().replace("machine", "")


def test_client_with_wrong_secret_fails_and_is_logged(caplog):
    async def body():
        async with serving() as server:
            async with client_of(server, OTHER) as bad:
                with pytest.raises(AuthenticationFailed, match="rejected"):
                    await bad.call("echo", timeout=WAIT)
            async with client_of(server) as good:
                assert (await good.call("echo", {"a": 1})).fields == {"a": 1}
            return server.port
    with caplog.at_level(logging.INFO, logger="objcache.rpc"):
        run(body)
    server_lines = [r.getMessage() for r in caplog.records
                    if "authentication failed for" in r.getMessage()]
    assert server_lines and "127.0.0.1:" in server_lines[0]
    _no_secret_material(caplog.text)


def test_client_detects_a_server_without_the_secret(caplog):
    """An impostor server that accepts any client and answers with a proof
    made from the wrong secret: the client refuses it, sends no request."""
    received = []

    async def impostor(reader, writer):
        hs = ServerHandshake(OTHER)
        writer.write(frame_bytes(framing.HELLO, 0, "", hs.hello()))
        peer = RawPeer(reader, writer)
        auth = await peer.read_frame()
        # A server proof made from the wrong secret.
        mac = hmac.new(OTHER, b"objcache-rpc/1 server\0" + auth.fields["nonce"]
                       + hs._nonce, hashlib.sha256).digest()
        writer.write(frame_bytes(framing.AUTH_OK, 0, "", {"mac": mac}))
        while (f := await peer.read_frame()) is not None:
            received.append(f)
        writer.close()

    async def body():
        srv = await asyncio.start_server(impostor, "127.0.0.1", 0)
        port = srv.sockets[0].getsockname()[1]
        client = RpcClient("127.0.0.1", port, SECRET)
        try:
            with pytest.raises(AuthenticationFailed, match="server proof"):
                await client.call("echo", {"secret_stuff": 1}, timeout=WAIT)
        finally:
            await client.close()
            srv.close()
            await srv.wait_closed()
    with caplog.at_level(logging.WARNING, logger="objcache.rpc"):
        run(body)
    assert received == []           # no request went to the impostor
    assert "server proof does not match" in caplog.text
    _no_secret_material(caplog.text)


def test_garbage_before_auth_is_dropped_and_logged(caplog):
    async def body():
        async with serving() as server:
            peer = await RawPeer.connect(server.port, secret=None)
            hello = await peer.read_frame()
            assert hello.kind == framing.HELLO
            peer.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert await peer.closed_by_peer()
            async with client_of(server) as good:
                assert (await good.call("echo")).fields == {}
    with caplog.at_level(logging.WARNING, logger="objcache.rpc"):
        run(body)
    assert "bad magic" in caplog.text and "127.0.0.1:" in caplog.text


@pytest.mark.parametrize("what", ["request", "payload", "big_header"])
def test_nothing_but_auth_is_accepted_before_auth(what, caplog):
    ran = []

    async def handler(ctx, fields, payload):
        ran.append(1)

    async def body():
        async with serving({"x": handler}) as server:
            peer = await RawPeer.connect(server.port, secret=None)
            await peer.read_frame()                         # HELLO
            if what == "request":
                peer.request(1, "x", {})
            elif what == "payload":
                peer.send(frame_bytes(framing.AUTH, 0, "", {}, b"p"))
            else:
                peer.send(frame_bytes(framing.AUTH, 0, "", {"n": b"a" * 5000}))
            reply = await peer.read_frame()
            assert reply is None or (reply.kind == framing.ERROR
                                     and reply.name == "auth_failed")
            assert await peer.closed_by_peer()
    with caplog.at_level(logging.WARNING, logger="objcache.rpc"):
        run(body)
    assert ran == []
    assert "127.0.0.1:" in caplog.text


def test_silent_peer_is_dropped_after_the_handshake_timeout(caplog):
    async def body():
        async with serving(handshake_timeout=0.2) as server:
            peer = await RawPeer.connect(server.port, secret=None)
            assert (await peer.read_frame()).kind == framing.HELLO
            assert await peer.closed_by_peer()
            assert server.connections == 0
    with caplog.at_level(logging.WARNING, logger="objcache.rpc"):
        run(body)
    assert "no handshake within 0.2s" in caplog.text


def test_garbage_after_auth_closes_only_that_connection(caplog):
    async def body():
        async with serving() as server, client_of(server) as good:
            await good.call("echo")
            peer = await RawPeer.connect(server.port)       # authenticated
            peer.request(1, "echo", {"a": 1})
            assert (await peer.read_frame()).fields == {"a": 1}
            peer.send(bytes(range(256)) * 4)
            assert await peer.closed_by_peer()
            assert (await good.call("echo", {"b": 2})).fields == {"b": 2}
            assert good.connects == 1
    with caplog.at_level(logging.WARNING, logger="objcache.rpc"):
        run(body)
    assert "protocol error" in caplog.text
