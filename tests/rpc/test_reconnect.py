"""Connection loss, reconnection with backoff, the client pool."""
import asyncio
import socket

import pytest

from objcache.rpc import (ClientPool, ConnectionLost, RpcClient, RpcServer,
                          Unavailable)

from . import SECRET, WAIT, client_of, echo, run, serving


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_in_flight_calls_fail_with_connection_lost_when_the_server_goes():
    state = {}

    async def hang(ctx, fields, payload):
        state["n"] += 1
        if state["n"] == 5:
            state["all_started"].set()
        await asyncio.Event().wait()

    async def body():
        state["n"], state["all_started"] = 0, asyncio.Event()
        server = RpcServer({"hang": hang}, SECRET)
        await server.start("127.0.0.1", 0)
        async with client_of(server) as client:
            calls = [asyncio.ensure_future(client.call("hang", timeout=None))
                     for _ in range(5)]
            await asyncio.wait_for(state["all_started"].wait(), WAIT)
            await server.close()
            results = await asyncio.wait_for(
                asyncio.gather(*calls, return_exceptions=True), WAIT)
            assert all(isinstance(r, ConnectionLost) for r in results), results
            assert "may or may not have run" in str(results[0])
    run(body)


def test_reconnects_after_a_server_restart():
    port = _free_port()

    async def body():
        server = RpcServer({"echo": echo}, SECRET)
        await server.start("127.0.0.1", port)
        client = RpcClient("127.0.0.1", port, SECRET, backoff_initial=0.01,
                           backoff_max=0.1)
        try:
            assert (await client.call("echo", {"gen": 1})).fields == {"gen": 1}
            first = client.connection
            await server.close()
            await asyncio.wait_for(asyncio.shield(first.closed), WAIT)
            assert not client.connected
            # Down: calls fail fast with Unavailable (never sent).
            with pytest.raises(Unavailable, match="ConnectionRefused|"
                               "Connect call failed|refused"):
                await client.call("echo", timeout=0.3)
            # Back up on the same port. A call may still land in the backoff
            # window (Unavailable: not sent); connect() waits it out.
            server = RpcServer({"echo": echo}, SECRET)
            await server.start("127.0.0.1", port)
            await client.connect(timeout=WAIT)
            r = await client.call("echo", {"gen": 2}, timeout=WAIT)
            assert r.fields == {"gen": 2}
            assert client.connects == 2 and client.connection is not first
        finally:
            await client.close()
            await server.close()
    run(body)


def test_calls_fail_fast_while_backing_off():
    port = _free_port()         # nothing listens here

    async def body():
        client = RpcClient("127.0.0.1", port, SECRET, backoff_initial=5.0,
                           backoff_max=5.0)
        try:
            with pytest.raises(Unavailable, match="cannot connect"):
                await client.call("echo", timeout=WAIT)
            assert client._failures == 1
            # Within the backoff: no new attempt, an immediate Unavailable.
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            with pytest.raises(Unavailable, match="next attempt in"):
                await client.call("echo", timeout=WAIT)
            assert loop.time() - t0 < 1.0 and client._failures == 1
        finally:
            await client.close()
    run(body)


def test_connect_waits_through_backoff_until_the_server_appears():
    port = _free_port()

    async def body():
        client = RpcClient("127.0.0.1", port, SECRET, backoff_initial=0.02,
                           backoff_max=0.05)
        server = RpcServer({"echo": echo}, SECRET)
        try:
            connecting = asyncio.ensure_future(client.connect(timeout=WAIT))
            # Let at least one attempt fail (refused) before starting.
            while client._failures == 0:
                attempt = client._connector
                if attempt is None:
                    await asyncio.sleep(0)     # (a yield: let it start)
                else:
                    await asyncio.shield(attempt)
            assert not connecting.done()
            await server.start("127.0.0.1", port)
            await connecting
            assert client.connected and client._failures == 0
            assert (await client.call("echo", {"x": 1})).fields == {"x": 1}
        finally:
            await client.close()
            await server.close()
    run(body)


def test_backoff_grows_exponentially_with_jitter_and_is_capped():
    port = _free_port()         # nothing listens here

    async def body():
        client = RpcClient("127.0.0.1", port, SECRET, backoff_initial=0.01,
                           backoff_max=0.08, backoff_jitter=0.5)
        loop = asyncio.get_running_loop()
        delays = []
        try:
            for _ in range(7):
                with pytest.raises(Unavailable, match="cannot connect"):
                    await client.call("echo", timeout=WAIT)
                delay = client._next_attempt - loop.time()
                delays.append(delay)
                # Until the next attempt is allowed (timers are ms-granular).
                await asyncio.sleep(delay + 0.005)
        finally:
            await client.close()
        return client._failures, delays
    failures, delays = run(body)
    assert failures == 7
    # Attempt n waits in [b*(1-jitter), b] with b = 0.01 * 2**(n-1) <= 0.08.
    for n, d in enumerate(delays):
        base = min(0.08, 0.01 * 2 ** n)
        assert base * 0.5 - 0.005 <= d <= base, (n, d)


def test_fresh_client_unreachable_is_unavailable_quickly():
    async def body():
        client = RpcClient("127.0.0.1", _free_port(), SECRET)
        try:
            with pytest.raises(Unavailable, match="cannot connect"):
                await client.call("echo", timeout=WAIT)
        finally:
            await client.close()
    run(body)


def test_client_close_fails_in_flight_calls():
    started = {}

    async def hang(ctx, fields, payload):
        started["ev"].set()
        await asyncio.Event().wait()

    async def body():
        started["ev"] = asyncio.Event()
        async with serving({"hang": hang}) as server:
            client = RpcClient("127.0.0.1", server.port, SECRET)
            call = asyncio.ensure_future(client.call("hang", timeout=None))
            await asyncio.wait_for(started["ev"].wait(), WAIT)
            await client.close()
            with pytest.raises(ConnectionLost):
                await call
    run(body)


def test_client_pool_shares_one_client_per_address():
    async def body():
        async with serving() as s1, serving() as s2:
            async with ClientPool(SECRET, call_timeout=WAIT) as pool:
                a = pool.get("127.0.0.1", s1.port)
                assert pool.get("127.0.0.1", str(s1.port)) is a
                b = pool.get("127.0.0.1", s2.port)
                assert a is not b and len(pool) == 2
                r1, r2 = await asyncio.gather(a.call("echo", {"s": 1}),
                                              b.call("echo", {"s": 2}))
                assert (r1.fields, r2.fields) == ({"s": 1}, {"s": 2})
                await pool.discard("127.0.0.1", s2.port)
                assert ("127.0.0.1", s2.port) not in pool
                with pytest.raises(Unavailable):
                    await b.call("echo")
            with pytest.raises(Unavailable):
                pool.get("127.0.0.1", s1.port)
    run(body)
