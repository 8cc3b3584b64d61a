"""Parity fixtures: run a behaviour against both implementations.

``impl`` is parametrized over the compiled extensions and the pure-Python
twins (objcache._ext.load). The compiled side is required when
``OBJCACHE_REQUIRE_EXT=1`` (as in CI); otherwise, if it is not built, its
parametrization is skipped with that exact reason.
"""
import os

import pytest

from objcache import _ext


def _load(name):
    try:
        return _ext.load(name)
    except ImportError as exc:
        if name == "c" and os.environ.get("OBJCACHE_REQUIRE_EXT") != "1":
            pytest.skip(f"compiled extensions not built: {exc}")
        raise


@pytest.fixture(scope="session", params=["c", "python"])
def impl(request):
    return _load(request.param)


@pytest.fixture(scope="session")
def c_impl():
    return _load("c")


@pytest.fixture(scope="session")
def py_impl():
    return _load("python")
