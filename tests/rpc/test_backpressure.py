"""Flow control: a peer that stops reading makes the other side wait, not
buffer without bound (docs/rpc.md, "Backpressure")."""
import asyncio

import pytest

from objcache.rpc import framing
from objcache.rpc.connection import Connection

from . import (WAIT, RawPeer, client_of, flow_events, frame_bytes, run,
               serving)

KiB = 1024


def _server_conn(server):
    (conn,) = server._connections
    return conn


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_notify_waits_while_the_server_is_not_reading(loop):
    """Notification handlers block -> the server stops reading at
    max_concurrent -> kernel buffers fill -> the client's transport passes
    high-water -> notify() waits. The client's buffered bytes stay under
    high-water + one frame; nothing is lost once the server catches up."""
    chunk = b"n" * (64 * KiB)
    high = 128 * KiB
    state = {"received": 0}

    async def hold(ctx, fields, payload):
        await state["release"].wait()
        state["received"] += 1
        if state["received"] == state.get("target"):
            state["all_in"].set()

    async def body():
        state["release"], state["all_in"] = asyncio.Event(), asyncio.Event()
        sent = 0
        with flow_events() as ev:
            async with serving({"hold": hold}, max_concurrent_per_conn=2) \
                    as server, client_of(server,
                                         write_buffer_high=high) as client:
                stop = asyncio.Event()

                peak = 0

                async def sender():
                    nonlocal sent, peak
                    while not stop.is_set():
                        await client.notify("hold", {}, chunk, timeout=None)
                        sent += 1
                        peak = max(peak,
                                   client.connection.write_buffer_size())

                async def until_stalled():
                    # Kernel buffers take a moment to fill after the pauses;
                    # then the sender must make no progress at all.
                    while True:
                        before = sent
                        done, _ = await asyncio.wait({task}, timeout=0.2)
                        assert not done
                        if sent == before:
                            return before

                task = asyncio.ensure_future(sender())
                await asyncio.wait_for(ev["read_paused"].wait(), WAIT)
                await asyncio.wait_for(ev["write_paused"].wait(), WAIT)
                stalled_at = await asyncio.wait_for(until_stalled(), WAIT)
                sconn, cconn = _server_conn(server), client.connection
                assert sconn.reading_paused and sconn.in_flight == 2
                # The sender is parked in notify(), the client's buffer is
                # bounded by high-water + one frame.
                assert cconn.write_paused
                assert max(peak, cconn.write_buffer_size()) <= \
                    high + len(chunk) + 64
                # Server memory: two admitted payloads + one partial frame.
                assert sconn._inflight_bytes == 2 * len(chunk)
                assert sconn._decoder.pending_bytes() <= \
                    (256 * KiB) + len(chunk) + 64
                # Let the server catch up: the sender continues.
                stop.set()
                state["release"].set()
                await asyncio.wait_for(task, WAIT)
                state["target"] = sent
                if state["received"] < sent:
                    await asyncio.wait_for(state["all_in"].wait(), WAIT)
                assert state["received"] == sent > stalled_at > 10
                assert ev["read_resumed"].is_set() and \
                    ev["write_resumed"].is_set()
    run(body, loop=loop)


def test_server_runs_at_most_max_concurrent_handlers_per_connection():
    state = {"running": 0, "peak": 0}

    async def hold(ctx, fields, payload):
        state["running"] += 1
        state["peak"] = max(state["peak"], state["running"])
        if state["running"] == 4:
            state["full"].set()
        await state["release"].wait()
        state["running"] -= 1
        return {"i": fields["i"]}

    async def body():
        state["release"], state["full"] = asyncio.Event(), asyncio.Event()
        with flow_events() as ev:
            async with serving({"hold": hold}, max_concurrent_per_conn=4) \
                    as server, client_of(server) as client:
                calls = [asyncio.ensure_future(client.call("hold", {"i": i}))
                         for i in range(40)]
                await asyncio.wait_for(state["full"].wait(), WAIT)
                await asyncio.wait_for(ev["read_paused"].wait(), WAIT)
                assert _server_conn(server).in_flight == 4
                state["release"].set()
                results = await asyncio.wait_for(asyncio.gather(*calls), WAIT)
                assert [r.fields["i"] for r in results] == list(range(40))
    run(body)
    assert state["peak"] == 4


def test_inflight_payload_bytes_bound_admission():
    state = {"running": 0, "peak": 0}

    async def hold(ctx, fields, payload):
        state["running"] += 1
        state["peak"] = max(state["peak"], state["running"])
        if state["running"] == 3:
            state["full"].set()
        await state["release"].wait()
        state["running"] -= 1

    async def body():
        state["release"], state["full"] = asyncio.Event(), asyncio.Event()
        async with serving({"hold": hold}, max_concurrent_per_conn=100,
                           max_inflight_bytes_per_conn=300 * KiB) as server, \
                client_of(server) as client:
            calls = [asyncio.ensure_future(
                client.call("hold", {}, bytes(100 * KiB))) for _ in range(10)]
            await asyncio.wait_for(state["full"].wait(), WAIT)
            # 3 x 100 KiB reach the limit; the rest waits in the socket.
            assert _server_conn(server)._inflight_bytes == 300 * KiB
            state["release"].set()
            await asyncio.wait_for(asyncio.gather(*calls), WAIT)
    run(body)
    assert state["peak"] == 3


def test_client_that_does_not_read_answers_stops_the_server_reading():
    """A raw client sends many requests for large answers and reads nothing:
    the server's output passes high-water, handlers park holding their
    slots, the server stops taking requests (they wait in the decoder and
    the socket). At every flow-control transition and every handler start,
    the server's output buffer is within high-water + max_concurrent
    answers. Reading everything afterwards yields every answer."""
    answer = bytes(256 * KiB)
    high, conc, n = 64 * KiB, 4, 200
    bound = high + conc * (len(answer) + 64)
    samples = []

    async def big(ctx, fields, payload):
        samples.append(_server_conn(state["server"]).write_buffer_size())
        return {"i": fields["i"]}, answer

    state = {}

    def observer(conn, event):
        samples.append(conn.write_buffer_size())
        if conn.write_paused and conn.reading_paused:
            state["both"].set()

    async def body():
        state["both"] = asyncio.Event()
        old, Connection.flow_observer = Connection.flow_observer, observer
        try:
            async with serving({"big": big}, max_concurrent_per_conn=conc,
                               write_buffer_high=high) as server:
                state["server"] = server
                peer = await RawPeer.connect(server.port)
                peer.send(b"".join(frame_bytes(framing.REQUEST, i + 1, "big",
                                               {"i": i}) for i in range(n)))
                # Output backed up AND input paused, at the same time.
                await asyncio.wait_for(state["both"].wait(), WAIT)
                assert _server_conn(server).in_flight <= conc
                got = []
                for _ in range(n):
                    f = await peer.read_frame()
                    assert f.kind == framing.RESPONSE
                    assert f.payload.nbytes == len(answer)
                    got.append(f.fields["i"])
                assert sorted(got) == list(range(n))
                await peer.close()
        finally:
            Connection.flow_observer = old
    run(body)
    assert samples and max(samples) <= bound
