"""Suite-wide fixtures.

* Every test runs with the debug live-object counters checked, when the
  extensions are a debug build (``make debug``): a test that leaks a page view,
  an arena or a pending log append fails.
* Slow soak/fuzz/benchmark tests (marked ``slow``) run only with
  ``OBJCACHE_SLOW=1``.
"""
import gc
import os
import subprocess

import pytest

from objcache import _ext

pytest_plugins = ["objcache.testing.pytest_plugin"]


def pytest_collection_modifyitems(config, items):
    if os.environ.get("OBJCACHE_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow test: set OBJCACHE_SLOW=1 to run it")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _no_leaked_extension_objects():
    yield
    if _ext.live_objects() is None:
        return
    gc.collect()
    live = {k: v for k, v in _ext.live_objects().items() if v}
    assert not live, f"extension objects leaked by this test: {live}"


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 1 MiB tmpfs for full-disk tests (root only), unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("full-disk test needs root to mount a tmpfs")
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here: "
                    f"{res.stderr.strip() or res.returncode}")
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)]).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)])
