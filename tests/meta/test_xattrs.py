"""xattrs in s3fs's S3 metadata format (objcache/meta/xattrs.py), and
through the engine: written back, read from objects other tools wrote."""
import asyncio
import base64
from urllib.parse import quote

from objcache.meta import xattrs
from objcache.meta.model import ROOT

from tests.engine.harness import Engine
from tests.engine.test_writeback import drain, writebacks


def test_round_trip_and_the_s3fs_text():
    attrs = {b"user.a": b"\x00\xffbinary", b"user.empty": b"", b"user.t": "é".encode()}
    enc = xattrs.encode(attrs)
    assert xattrs.decode(enc) == attrs
    # What s3fs writes: {"name":"base64",...}, percent-encoded.
    s3fs_text = '{"user.k":"' + base64.b64encode(b"v1").decode() + '"}'
    assert xattrs.decode(quote(s3fs_text)) == {b"user.k": b"v1"}


def test_malformed_or_unfit_values_lose_nothing_else():
    assert xattrs.decode("%7Bnot-json") == {}
    assert xattrs.decode('{"user.k":"!!notbase64"}') == {}
    assert xattrs.decode(None) == {} and xattrs.decode("") == {}
    assert xattrs.encode({b"user.big": b"x" * 4096}) is None          # over S3's room
    assert xattrs.decode(xattrs.encode({b'user.q"uote': b"1", b"user.ok": b"2"})) == \
        {b"user.ok": b"2"}


def test_xattrs_reach_the_bucket_and_come_back(tmp_path):
    async def main():
        e = Engine(tmp_path)
        # An object written by another tool with s3fs xattrs.
        await e.store.put("other", b"data", metadata={
            "xattr": quote('{"user.k":"' + base64.b64encode(b"v").decode() + '"}')})
        await e.start()
        f = await e.ns.create(ROOT, b"f", 0o644, 1000, 1000)
        wbs = await writebacks(e)
        await drain(wbs)
        # A clean file's new xattr makes it owed again: the object gets it.
        await e.ns.setattr(f.id, {"xattrs": [[b"user.color", b"blue"]]})
        await drain(wbs)
        head = await e.store.head("f")
        assert xattrs.decode(head.metadata["xattr"]) == {b"user.color": b"blue"}
        # chmod of a clean file reaches the bucket too.
        await e.ns.setattr(f.id, {"mode": 0o600})
        await drain(wbs)
        assert int((await e.store.head("f")).metadata["mode"]) & 0o777 == 0o600
        node = await e.ns.lookup(ROOT, b"other")
        assert node.xattrs == {b"user.k": b"v"}
        await e.close()
    asyncio.run(asyncio.wait_for(main(), 60))
