"""MemoryStore: listing semantics against a reference model and against a
real server, and the behaviours only it can show cheaply."""
from __future__ import annotations

import os
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from objcache.backend import InvalidRequest, MemoryServer, MemoryStore
from tests.backend import MiB, collect, put_many, run, s3backend  # noqa: F401


def reference_listing(keys: list[str], prefix: str, delimiter: str | None,
                      start_after: str | None) -> tuple[list[str], list[str]]:
    """ListObjectsV2 semantics, written the obvious way."""
    objects, prefixes = [], []
    for k in sorted(set(keys), key=lambda k: k.encode()):
        if not k.startswith(prefix) or (start_after and k <= start_after):
            continue
        rest = k[len(prefix):]
        if delimiter and delimiter in rest:
            cp = prefix + rest[:rest.index(delimiter) + len(delimiter)]
            # a prefix is an entry like a key: listed only after start_after
            if cp not in prefixes and not (start_after and cp <= start_after):
                prefixes.append(cp)
        else:
            objects.append(k)
    return objects, prefixes


key_text = st.text(alphabet="ab/.\u00e9", min_size=1, max_size=6)


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(keys=st.lists(key_text, max_size=30), prefix=st.text(alphabet="ab/", max_size=3),
       delimiter=st.sampled_from([None, "/", ".", "ab"]),
       start_after=st.one_of(st.none(), key_text), page_size=st.integers(1, 5))
def test_listing_matches_the_reference_model(keys, prefix, delimiter, start_after,
                                             page_size):
    async def body():
        store = MemoryStore("b")
        await put_many(store, keys)
        got_keys, got_prefixes, pages = await collect(
            store, prefix, delimiter=delimiter, start_after=start_after,
            page_size=page_size)
        want_keys, want_prefixes = reference_listing(keys, prefix, delimiter,
                                                     start_after)
        assert (got_keys, got_prefixes) == (want_keys, want_prefixes)
        assert all(0 < len(p.objects) + len(p.common_prefixes) <= page_size
                   for p in pages)
    run(body, loop="asyncio")


def test_listing_is_identical_on_a_real_server(s3backend):
    """Random trees listed page by page on MemoryStore and on the server:
    the same pages (entries per page included)."""
    rng = random.Random(7)
    parts = ["a", "b", "a b", "\u00e9", "z", "", ".", "x+y"]
    keys = sorted({"/".join(rng.choice(parts) for _ in range(rng.randint(1, 4))) or "k"
                   for _ in range(150)})
    keys = [k for k in keys if k]

    async def body():
        memory = MemoryStore("b")
        async with s3backend.make() as s3:
            await put_many(memory, keys)
            await put_many(s3, keys)
            for prefix, start_after in [("", None), ("a", None), ("a/", None),
                                        ("a b/", None), ("\u00e9/", None),
                                        ("", "a/b"), ("a/", "a/a b/z")]:
                for delimiter in ["/", None, " "]:
                    for page_size in (1, 3, 1000):
                        kw = dict(delimiter=delimiter, page_size=page_size,
                                  start_after=start_after)
                        want = await collect(memory, prefix, **kw)
                        got = await collect(s3, prefix, **kw)
                        shape = lambda pages: [(  # noqa: E731
                            [o.key for o in p.objects], p.common_prefixes) for p in pages]
                        assert shape(got[2]) == shape(want[2]), (prefix, kw)
    run(body)


def test_copy_falls_back_to_multipart_when_the_server_refuses_a_big_copy():
    data = os.urandom(12 * MiB)

    async def body():
        # The "server" accepts single copies up to 8 MiB (S3: 5 GiB).
        store = MemoryStore("b", max_copy_bytes=8 * MiB,
                            multipart_copy_threshold=8 * MiB, copy_part_size=5 * MiB)
        await store.put("src", data)
        etag = await store.copy("src", "dst")      # size unknown: try, then parts
        assert etag.endswith("-3") and await store.get("dst") == data
        assert store.stats["requests"]["CopyObject"] == 1
        assert store.stats["requests"]["UploadPartCopy"] == 3
        await store.put("small", b"x")
        assert await store.copy("small", "dst2") == (await store.head("small")).etag
    run(body)


def test_shared_server_and_missing_bucket():
    server = MemoryServer()
    server.create_bucket("one")

    async def body():
        a = MemoryStore("one", "a", server=server)
        b = MemoryStore("one", "b", server=server)
        await a.put("k", b"from a")
        assert await b.head("k") is None
        assert server.get_object("one", "a/k") == b"from a"
        from objcache.backend import NoSuchBucket
        with pytest.raises(NoSuchBucket):
            await MemoryStore("two", server=server).put("k", b"x")
    run(body)


def test_bad_arguments():
    with pytest.raises(ValueError):
        MemoryStore("b", max_concurrency=0)

    async def body():
        store = MemoryStore("b")
        with pytest.raises(InvalidRequest):
            await collect(store, "", page_size=0)
        with pytest.raises(InvalidRequest):
            await store.put("k", "text is not bytes")
        with pytest.raises(InvalidRequest):
            await store.multipart_upload("k", [b"x"], part_size=5 * MiB, concurrency=0)
    run(body)
