# objcache developer entry points. `make test` and `make demo` install what
# they need (system packages via scripts/install-system-deps.sh, Python
# packages into .venv) on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
VPY    := $(VENV)/bin/python
PYTEST := $(VPY) -m pytest

.PHONY: all deps build dev debug test test-ext-twin bench bench-smoke demo clean

all: build

# System packages + virtualenv + Python dependencies (+ an editable install,
# which builds the extensions). Re-runs when the project metadata changes.
$(VENV)/.deps: pyproject.toml setup.py scripts/install-system-deps.sh
	scripts/install-system-deps.sh
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q setuptools wheel 'Cython>=3.0.10,<4'
	$(VPY) -m pip install -q --no-build-isolation -e '.[test,models]'
	touch $@

deps: $(VENV)/.deps

# Release build of the extensions, in place.
build: deps
	$(VPY) setup.py -q build_ext --inplace --force

# Strict developer build: -Wall -Wextra -Werror, Cython warnings as errors.
dev: deps
	OBJCACHE_DEV=1 $(VPY) setup.py -q build_ext --inplace --force

# Debug build: -O0 -g and live-object counters that every test checks.
debug: deps
	OBJCACHE_DEBUG=1 OBJCACHE_DEV=1 $(VPY) setup.py -q build_ext --inplace --force

# Test layers by how they run: in this process (extensions, cache, Raft,
# RPC, state machines, engine harness: the debug build's live-object
# counters are asserted after each of their tests) or through real
# processes (S3 servers, `objcache server`, FUSE mounts, the demo: the
# counters cannot see inside those, and the -O0 build only slows them).
# Every directory under tests/ is in exactly one of the two.
TEST_DIRS         := $(filter-out tests/__pycache__,$(patsubst %/,%,$(wildcard tests/*/)))
IN_PROCESS_TESTS  := tests/ext tests/cache tests/ipc tests/raft tests/rpc tests/meta \
                     tests/txn tests/engine
PROCESS_TESTS     := $(filter-out $(IN_PROCESS_TESTS),$(TEST_DIRS)) $(wildcard tests/test_*.py)

# The test command (README):
# 1. the in-process layers on a strict debug build (warnings are errors;
#    every test asserts the live-object counters return to zero); compiled
#    extensions are required and the parity tests run each behaviour on
#    both implementations; then 300 seeded schedules of the Raft simulator
#    (thousands on demand: `python -m objcache.raft.sim --seeds 5000`);
# 2. the extension tests again with the twins forced (the selector path);
# 3. a release build: the process-level layers (real S3 servers, server
#    processes, FUSE mounts, the demo), then the micro-benchmarks once as a
#    smoke run (ratios printed, not asserted: `make bench` asserts them).
test: debug
	OBJCACHE_REQUIRE_EXT=1 $(PYTEST) $(IN_PROCESS_TESTS)
	$(VPY) -m objcache.raft.sim --seeds 300 --seed-start 100000
	OBJCACHE_REQUIRE_EXT=0 OBJCACHE_NO_EXT=1 $(PYTEST) -q tests/ext
	$(MAKE) build
	OBJCACHE_REQUIRE_EXT=1 $(PYTEST) $(PROCESS_TESTS)
	OBJCACHE_REQUIRE_EXT=1 OBJCACHE_BENCH_STRICT=0 $(PYTEST) -q -s bench/micro

# Benchmarks with their acceptance ratios asserted (see bench/RESULTS.md).
bench: build
	OBJCACHE_REQUIRE_EXT=1 $(PYTEST) -s bench/micro --benchmark-enable
	$(VPY) -m bench.macro.raft_commit

demo: build
	$(VENV)/bin/objcache demo

clean:
	rm -rf build *.egg-info objcache/_ext/*.so objcache/_ext/_*.c
