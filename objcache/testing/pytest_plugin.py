"""pytest fixtures for real S3 servers on loopback.

Loaded by ``tests/conftest.py`` (``pytest_plugins = [...]``).

Session-scoped servers, each started the first time a test asks for it:

* ``moto_s3`` -- a :class:`~objcache.testing.s3servers.MotoServer`.
* ``rgw_s3``  -- a :class:`~objcache.testing.s3servers.RgwServer` (a one-node
  Ceph cluster, ~2-3 s to start) in a session temporary directory. If the Ceph
  binaries are missing the fixture FAILS (CI installs them), naming the
  Debian packages; it never skips silently.

Function-scoped buckets, fresh and uniquely named per test, deleted with
their contents afterwards (keeps memstore's RAM bounded over a session):

* ``moto_bucket`` / ``rgw_bucket`` -- yield ``(server, bucket_name)``.

Tests that use an rgw fixture get the ``rgw`` marker (and moto ones ``moto``)
automatically, so ``-m "not rgw"`` deselects them; marking them explicitly
is still good documentation.

Environment: ``OBJCACHE_RGW_KEEP=1`` keeps the cluster directory (its logs)
after the session and prints where it is.
"""
from __future__ import annotations

import os
import re
import uuid
from typing import Iterator

import pytest

from objcache.testing.s3servers import (
    CEPH_DEBIAN_PACKAGES, MotoServer, RgwServer, S3Server, rgw_available)

_RGW_FIXTURES = {"rgw_s3", "rgw_bucket"}
_MOTO_FIXTURES = {"moto_s3", "moto_bucket"}


def pytest_configure(config: pytest.Config) -> None:
    # Also registered in pyproject.toml; repeated here so that the plugin works
    # under --strict-markers when loaded on its own (-p).
    config.addinivalue_line(
        "markers", "rgw: needs the Ceph RGW S3 server on loopback")
    config.addinivalue_line(
        "markers", "moto: needs the moto S3 server on loopback")


def pytest_collection_modifyitems(config: pytest.Config,
                                  items: list[pytest.Item]) -> None:
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        if names & _RGW_FIXTURES:
            item.add_marker(pytest.mark.rgw)
        if names & _MOTO_FIXTURES:
            item.add_marker(pytest.mark.moto)


@pytest.fixture(scope="session")
def moto_s3() -> Iterator[MotoServer]:
    with MotoServer() as server:
        yield server


@pytest.fixture(scope="session")
def rgw_s3(tmp_path_factory: pytest.TempPathFactory,
           request: pytest.FixtureRequest) -> Iterator[RgwServer]:
    if not rgw_available():
        pytest.fail(
            "the rgw_s3 fixture needs Ceph (ceph-mon, ceph-osd, radosgw, "
            "radosgw-admin, monmaptool, ceph) on PATH. Install the Debian "
            f"packages: apt-get install --no-install-recommends "
            f"{CEPH_DEBIAN_PACKAGES}", pytrace=False)
    keep = os.environ.get("OBJCACHE_RGW_KEEP", "") not in ("", "0")
    server = RgwServer(tmp_path_factory.mktemp("rgw"), keep=keep)
    server.start()
    try:
        yield server
    finally:
        server.stop()
        if keep:
            _tell(request.config,
                  f"objcache: kept the RGW cluster directory {server.directory}")


def _tell(config: pytest.Config, line: str) -> None:
    """Write a line on the terminal, past pytest's output capture."""
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    capman = config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or capman is None:
        return
    with capman.global_and_fixture_disabled():
        reporter.write_line("")
        reporter.write_line(line)


def unique_bucket_name(hint: str = "") -> str:
    """A valid, unique S3 bucket name (3-63 chars of a-z 0-9 -)."""
    hint = re.sub(r"[^a-z0-9]+", "-", hint.lower()).strip("-")[:40].strip("-")
    suffix = uuid.uuid4().hex[:12]
    return f"{hint}-{suffix}" if hint else f"t-{suffix}"


def _bucket(server: S3Server, request: pytest.FixtureRequest
            ) -> Iterator[tuple[S3Server, str]]:
    name = server.create_bucket(unique_bucket_name(request.node.name))
    yield server, name
    try:
        server.delete_bucket(name)
    except Exception:  # noqa: BLE001 -- a test may have broken it; not our failure
        pass


@pytest.fixture
def moto_bucket(moto_s3: MotoServer, request: pytest.FixtureRequest
                ) -> Iterator[tuple[MotoServer, str]]:
    yield from _bucket(moto_s3, request)  # type: ignore[misc]


@pytest.fixture
def rgw_bucket(rgw_s3: RgwServer, request: pytest.FixtureRequest
               ) -> Iterator[tuple[RgwServer, str]]:
    yield from _bucket(rgw_s3, request)  # type: ignore[misc]
