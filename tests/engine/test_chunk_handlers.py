"""The owner's chunk handlers, which clients now call directly (reads and
writes skip the coordinating node): an errno failure reaches the client as
that errno, a leadership lost during the call as "not_leader" (retried at
the new leader), and an owner's errno passed on by a node keeps its errno."""
import asyncio
import errno

import pytest

from objcache.engine.node import _chunk_handler, _errno
from objcache.raft.types import NotLeader, ProposalDropped
from objcache.rpc import HandlerError, RemoteError


def call(handler):
    return asyncio.run(handler(None, {}, None))


@pytest.mark.parametrize("exc, code, details", [
    (OSError(errno.ENOSPC, "disk tier full of dirty data"), "errno", {"errno": errno.ENOSPC}),
    (NotLeader(3), "not_leader", {"leader": 3}),
    (ProposalDropped("leadership transfer"), "not_leader", {"leader": 0}),
])
def test_chunk_handler_maps_failures(exc, code, details):
    async def handler(ctx, fields, payload):
        raise exc
    with pytest.raises(HandlerError) as e:
        call(_chunk_handler(handler))
    assert (e.value.code, e.value.details) == (code, details)


def test_an_owners_errno_passes_through_a_node():
    async def handler(ctx, fields, payload):
        raise RemoteError("errno", "no space", details={"errno": errno.ENOSPC})
    with pytest.raises(HandlerError) as e:
        call(_errno(handler))
    assert (e.value.code, e.value.details) == ("errno", {"errno": errno.ENOSPC})

    async def other(ctx, fields, payload):
        raise RemoteError("handler_error", "boom")
    with pytest.raises(RemoteError):
        call(_errno(other))
